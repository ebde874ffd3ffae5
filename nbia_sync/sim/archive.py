"""The simulator's data: deterministic synthetic collections of real DICOM files.

Nothing big is held in memory: an instance keeps its small DICOM header (built on first
need) and a seed from which its pixel bytes are regenerated on every read; its MD5 and CRC
are computed once, on first need, and cached.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta

from nbia_sync.sim._dicom import (
    SECONDARY_CAPTURE,
    SOP_CLASSES,
    UID_PREFIX,
    ImageAttributes,
    build_header,
)
from nbia_sync.sim._pixels import iter_pixels

_MODALITIES = ("CT", "MR", "PT")
_BODY_PARTS = ("CHEST", "HEAD", "ABDOMEN", "PELVIS", "BREAST", "LUNG")
_MANUFACTURERS = ("SIEMENS", "GE MEDICAL SYSTEMS", "Philips", "TOSHIBA")
_FIRST_RELEASE = datetime(2019, 1, 1)
_RELEASE_SPAN_DAYS = 6 * 365  # initial releases spread over 2019-2024
LICENSE_NAME = "Creative Commons Attribution 4.0 International License"
LICENSE_URI = "https://creativecommons.org/licenses/by/4.0/"


@dataclass(eq=False)
class SimInstance:
    """One DICOM file. Its bytes are regenerated from the seed on every read."""

    sop_uid: str
    attrs: ImageAttributes
    target_size: int
    seed: int
    _header: bytes | None = field(default=None, repr=False)
    _pixel_bytes: int = field(default=0, repr=False)
    _digests: tuple[str, int] | None = field(default=None, repr=False)

    def _built(self) -> tuple[bytes, int]:
        if self._header is None:
            self._header, self._pixel_bytes = build_header(self.attrs, self.target_size)
        return self._header, self._pixel_bytes

    @property
    def size(self) -> int:
        header, pixels = self._built()
        return len(header) + pixels

    def iter_bytes(self) -> Iterator[bytes]:
        """The file's bytes: the header, then pixel units of at most 1 MiB."""
        header, pixels = self._built()
        yield header
        yield from iter_pixels(self.seed, pixels)

    def read(self) -> bytes:
        """The whole file (for small images and tests)."""
        return b"".join(self.iter_bytes())

    @property
    def digests_cached(self) -> bool:
        return self._digests is not None

    def digests(self) -> tuple[str, int]:
        """(MD5 hex, CRC-32). CPU-heavy on first call for big files: call it in a thread."""
        if self._digests is None:
            md5 = hashlib.md5(usedforsecurity=False)
            crc = 0
            for chunk in self.iter_bytes():
                md5.update(chunk)
                crc = zlib.crc32(chunk, crc)
            self._digests = (md5.hexdigest(), crc)
        return self._digests

    @property
    def md5(self) -> str:
        return self.digests()[0]

    @property
    def crc32(self) -> int:
        return self.digests()[1]


@dataclass(frozen=True, slots=True)
class SimPatient:
    collection: str
    patient_id: str
    patient_name: str
    patient_sex: str
    age: str  # e.g. "064Y"


@dataclass(frozen=True, slots=True)
class SimStudy:
    study_uid: str
    patient: SimPatient
    study_date: date
    description: str


@dataclass(eq=False)
class SimSeries:
    """One series as the archive lists it; `instances` are its files in download order."""

    uid: str
    study: SimStudy
    modality: str
    body_part: str | None
    manufacturer: str | None
    description: str
    series_number: int
    date_released: datetime
    timestamp: datetime
    image_size: int
    license: bool
    # Deterministic quirk: this series' numbers are sent as strings on v1/v2.
    numbers_as_strings: bool
    instances: list[SimInstance] = field(default_factory=list)

    @property
    def collection(self) -> str:
        return self.study.patient.collection

    @property
    def patient_id(self) -> str:
        return self.study.patient.patient_id

    @property
    def study_uid(self) -> str:
        return self.study.study_uid

    @property
    def image_count(self) -> int:
        return len(self.instances)

    @property
    def file_size(self) -> int:
        return sum(i.size for i in self.instances)

    @property
    def sop_class_uid(self) -> str:
        return SOP_CLASSES.get(self.modality, SECONDARY_CAPTURE)

    def instance(self, sop_uid: str) -> SimInstance | None:
        for inst in self.instances:
            if inst.sop_uid == sop_uid:
                return inst
        return None


class SimArchive:
    """Collections -> patients -> studies -> series -> instances, all deterministic.

    The same seed and the same sequence of calls give the same UIDs and bytes.
    """

    def __init__(self, seed: int = 0, image_size: int = 4096) -> None:
        self.seed = seed
        self.image_size = image_size
        self._rng = random.Random(seed)
        self._uid_counter = 0
        self.collections: list[str] = []
        self.patients: list[SimPatient] = []
        self.studies: list[SimStudy] = []
        self.series: dict[str, SimSeries] = {}

    @classmethod
    def generate(
        cls,
        seed: int = 0,
        collections: Iterable[str] = ("SIM-CT", "SIM-MR"),
        patients: int = 2,
        studies: int = 1,
        series: int = 2,
        images: int = 3,
        image_size: int = 4096,
    ) -> SimArchive:
        """`patients` per collection, `studies` per patient, `series` per study,
        `images` per series of about `image_size` bytes each; releases in 2019-2024."""
        archive = cls(seed=seed, image_size=image_size)
        for name in collections:
            archive._ensure_collection(name)
            for _ in range(patients):
                archive._new_patient(name, studies, series, images, released=None)
        return archive

    # ---- mutations -------------------------------------------------------------------

    def add_patient(
        self,
        collection: str,
        studies: int = 1,
        series: int = 2,
        images: int = 3,
        released: datetime | None = None,
    ) -> list[SimSeries]:
        """A new patient with fresh series, released now unless `released` is given."""
        self._ensure_collection(collection)
        return self._new_patient(collection, studies, series, images, released or _now())

    def update_series(
        self, uid: str, images: int | None = None, released: datetime | None = None
    ) -> SimSeries:
        """Replace a series' files (new SOP UIDs and bytes) and re-release it."""
        s = self.series[uid]
        count = s.image_count if images is None else images
        s.instances = [self._new_instance(s, n + 1) for n in range(count)]
        s.date_released = released or _now()
        return s

    def move_series(
        self,
        uid: str,
        *,
        collection: str | None = None,
        patient_id: str | None = None,
        study_uid: str | None = None,
        released: datetime | None = None,
    ) -> SimSeries:
        """Re-file a series (same SeriesInstanceUID) under another collection, patient
        and/or study, as a curator's correction does; its release date stays unless
        ``released`` is given.

        The patient (``patient_id`` in ``collection``, both defaulting to the series'
        own) and the study (a fresh UID unless ``study_uid`` is given) are created when
        absent; an existing ``study_uid`` alone moves the series to that study's patient.
        The files are regenerated, as in :meth:`update_series`, so their DICOM headers
        name the new patient and study.
        """
        s = self.series[uid]
        coll = collection or s.collection
        pid = patient_id or s.patient_id
        study = next((st for st in self.studies if st.study_uid == study_uid), None)
        if (
            study is not None
            and (collection or patient_id)
            and (study.patient.collection, study.patient.patient_id) != (coll, pid)
        ):
            raise ValueError(f"study {study_uid} belongs to another patient")
        if study is None:
            self._ensure_collection(coll)
            patient = next(
                (p for p in self.patients if (p.collection, p.patient_id) == (coll, pid)), None
            )
            if patient is None:
                old = s.study.patient
                patient = dataclasses.replace(
                    old, collection=coll, patient_id=pid, patient_name=pid
                )
                self.patients.append(patient)
            study = SimStudy(
                study_uid=study_uid or self._uid(),
                patient=patient,
                study_date=s.study.study_date,
                description=s.study.description,
            )
            self.studies.append(study)
        s.study = study
        return self.update_series(uid, released=released or s.date_released)

    # ---- queries ---------------------------------------------------------------------

    def truth(self) -> dict[str, dict[str, str]]:
        """series UID -> {SOP instance UID: MD5}: what a correct mirror holds."""
        return {uid: {i.sop_uid: i.md5 for i in s.instances} for uid, s in self.series.items()}

    def in_collection(self, collection: str) -> list[SimSeries]:
        return [s for s in self.series.values() if s.collection == collection]

    # ---- generation ------------------------------------------------------------------

    def _uid(self) -> str:
        self._uid_counter += 1
        return f"{UID_PREFIX}{self.seed}.{self._uid_counter}"

    def _ensure_collection(self, name: str) -> None:
        if name not in self.collections:
            self.collections.append(name)

    def _modality_for(self, collection: str) -> str:
        suffix = collection.rsplit("-", 1)[-1].upper()
        return suffix if suffix in SOP_CLASSES else self._rng.choice(_MODALITIES)

    def _new_patient(
        self,
        collection: str,
        studies: int,
        series: int,
        images: int,
        released: datetime | None,
    ) -> list[SimSeries]:
        rng = self._rng
        number = sum(1 for p in self.patients if p.collection == collection) + 1
        patient = SimPatient(
            collection=collection,
            patient_id=f"{collection}-{number:04d}",
            patient_name=f"{collection}-{number:04d}",
            patient_sex=rng.choice("MF"),
            age=f"{rng.randint(20, 90):03d}Y",
        )
        self.patients.append(patient)
        created: list[SimSeries] = []
        for _ in range(studies):
            study = SimStudy(
                study_uid=self._uid(),
                patient=patient,
                study_date=date(2000, 1, 1) + timedelta(days=rng.randrange(7000)),
                description=rng.choice(("BASELINE", "FOLLOW-UP", "PRE-OP", "")),
            )
            self.studies.append(study)
            modality = self._modality_for(collection)
            for n in range(series):
                when = released or _FIRST_RELEASE + timedelta(
                    days=rng.randrange(_RELEASE_SPAN_DAYS), seconds=rng.randrange(86400)
                )
                s = SimSeries(
                    uid=self._uid(),
                    study=study,
                    modality=modality,
                    # Some series omit attributes, as the archive does when unpopulated.
                    body_part=None if rng.random() < 0.25 else rng.choice(_BODY_PARTS),
                    manufacturer=None if rng.random() < 0.2 else rng.choice(_MANUFACTURERS),
                    description=f"{modality} series {n + 1}",
                    series_number=n + 1,
                    date_released=when,
                    timestamp=when - timedelta(days=rng.randrange(1, 60)),
                    image_size=self.image_size,
                    license=rng.random() >= 0.1,
                    numbers_as_strings=len(self.series) % 3 == 1,
                )
                s.instances = [self._new_instance(s, i + 1) for i in range(images)]
                self.series[s.uid] = s
                created.append(s)
        return created

    def _new_instance(self, s: SimSeries, number: int) -> SimInstance:
        sop_uid = self._uid()
        patient = s.study.patient
        attrs = ImageAttributes(
            sop_class_uid=s.sop_class_uid,
            sop_uid=sop_uid,
            study_uid=s.study.study_uid,
            series_uid=s.uid,
            patient_id=patient.patient_id,
            patient_name=patient.patient_name,
            patient_sex=patient.patient_sex,
            modality=s.modality,
            study_date=s.study.study_date.strftime("%Y%m%d"),
            series_description=s.description,
            series_number=s.series_number,
            instance_number=number,
            manufacturer=s.manufacturer,
            body_part=s.body_part,
        )
        seed = int.from_bytes(hashlib.blake2b(sop_uid.encode(), digest_size=8).digest(), "little")
        return SimInstance(sop_uid=sop_uid, attrs=attrs, target_size=s.image_size, seed=seed)


def _now() -> datetime:
    return datetime.now().replace(microsecond=0)
