"""The query endpoints: parameter rules and the rows each one returns, per API version.

Pure functions of the archive; HTTP (status codes, bodies, auth) lives in server.py.
Rows mimic the archive's quirks: unpopulated attributes omitted, some numbers as strings,
`YYYY-MM-DD HH:MM:SS.0` timestamps, per-version date formats and column sets.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from nbia_sync.sim.archive import LICENSE_NAME, LICENSE_URI, SimArchive, SimSeries, SimStudy

Row = dict[str, Any]
Visible = Callable[[str], bool]

VERSIONS = ("v1", "v2", "v4")

_SERIES_FILTERS: dict[str, Callable[[SimSeries], str | None]] = {
    "Collection": lambda s: s.collection,
    "PatientID": lambda s: s.patient_id,
    "StudyInstanceUID": lambda s: s.study_uid,
    "Modality": lambda s: s.modality,
    "SeriesInstanceUID": lambda s: s.uid,
    "BodyPartExamined": lambda s: s.body_part,
    "Manufacturer": lambda s: s.manufacturer,
    "ManufacturerModelName": lambda s: _model_name(s),
}


class BadRequest(Exception):
    """Answered with HTTP 400 and this message as a text body."""


@dataclass(frozen=True, slots=True)
class EndpointSpec:
    params: frozenset[str]
    required: frozenset[str] = frozenset()


def _spec(*params: str, required: tuple[str, ...] = ()) -> EndpointSpec:
    return EndpointSpec(frozenset((*params, "format")), frozenset(required))


_SERIES_UID = _spec("SeriesInstanceUID", required=("SeriesInstanceUID",))
_COMMON: dict[str, EndpointSpec] = {
    "getCollectionValues": _spec(),
    "getModalityValues": _spec("Collection", "BodyPartExamined"),
    "getBodyPartValues": _spec("Collection", "Modality"),
    "getManufacturerValues": _spec("Collection", "Modality", "BodyPartExamined"),
    "getPatient": _spec("Collection"),
    "getPatientStudy": _spec("Collection", "PatientID", "StudyInstanceUID"),
    "getSeries": _spec(*_SERIES_FILTERS),
    "getUpdatedSeries": _spec("fromDate", required=("fromDate",)),
    "getSeriesMetaData": _SERIES_UID,
    "getSeriesSize": _SERIES_UID,
    "getSOPInstanceUIDs": _SERIES_UID,
    "getSingleImage": _spec(
        "SeriesInstanceUID", "SOPInstanceUID", required=("SeriesInstanceUID", "SOPInstanceUID")
    ),
    "getImageWithMD5Hash": _SERIES_UID,
    "getImage": _spec(
        "SeriesInstanceUID", "NewFileNames", "IncludeMD5", required=("SeriesInstanceUID",)
    ),
}
# v1/v2 take `Date=yyyy/MM/dd`; v4 takes `fromDate=MM-DD-YYYY`.
_NEW_V2 = {
    "NewPatientsInCollection": _spec("Collection", "Date", required=("Collection", "Date")),
    "NewStudiesInPatientCollection": _spec(
        "Collection", "Date", "PatientID", required=("Collection", "Date")
    ),
}
_NEW_V4 = {
    "NewPatientsInCollection": _spec("Collection", "fromDate", required=("Collection", "fromDate")),
    "NewStudiesInPatientCollection": _spec(
        "Collection", "fromDate", "PatientID", required=("Collection", "fromDate")
    ),
}
SPECS: dict[str, dict[str, EndpointSpec]] = {
    "v1": {**_COMMON, **_NEW_V2},
    "v2": {**_COMMON, **_NEW_V2},
    "v4": {**_COMMON, **_NEW_V4},
}
DOWNLOADS = frozenset({"getImageWithMD5Hash", "getImage", "getSingleImage"})


def check_params(version: str, endpoint: str, params: dict[str, str]) -> None:
    spec = SPECS[version][endpoint]
    unknown = sorted(set(params) - spec.params)
    if unknown:
        raise BadRequest("Invalid query parameter")
    missing = sorted(spec.required - {k for k, v in params.items() if v})
    if missing:
        raise BadRequest(f"Missing required parameter: {', '.join(missing)}")


# ---- dates ---------------------------------------------------------------------------

_DMY_SLASH = re.compile(r"^(\d{1,2})/(\d{1,2})/(\d{4})$")  # dd/MM/yyyy
_YMD_SLASH = re.compile(r"^(\d{4})/(\d{1,2})/(\d{1,2})$")  # yyyy/MM/dd
_MDY_DASH = re.compile(r"^(\d{1,2})-(\d{1,2})-(\d{4})$")  # MM-DD-YYYY


def _parse(value: str, pattern: re.Pattern[str], order: tuple[int, int, int]) -> date:
    match = pattern.match(value)
    if not match:
        raise BadRequest(f"Invalid date: {value}")
    parts = [int(g) for g in match.groups()]
    try:
        return date(parts[order[0]], parts[order[1]], parts[order[2]])
    except ValueError:
        raise BadRequest(f"Invalid date: {value}") from None


def updated_since(version: str, value: str) -> date:
    if version == "v4":
        return _parse(value, _MDY_DASH, (2, 0, 1))
    return _parse(value, _DMY_SLASH, (2, 1, 0))


def new_since(version: str, params: dict[str, str]) -> date:
    if version == "v4":
        return _parse(params["fromDate"], _MDY_DASH, (2, 0, 1))
    return _parse(params["Date"], _YMD_SLASH, (0, 1, 2))


def _timestamp(when: datetime) -> str:
    return f"{when:%Y-%m-%d %H:%M:%S}.0"


# ---- rows ----------------------------------------------------------------------------


def _model_name(s: SimSeries) -> str | None:
    return None if s.manufacturer is None else f"{s.manufacturer.split()[0]} SIM-{s.modality}"


def _collection_uri(collection: str) -> str:
    return f"https://doi.org/10.0000/SIM.{collection}"


def _drop_none(row: Row) -> Row:
    return {k: v for k, v in row.items() if v is not None and v != ""}


def series_row(s: SimSeries, version: str) -> Row:
    strings = s.numbers_as_strings
    row: Row = {
        "SeriesInstanceUID": s.uid,
        "StudyInstanceUID": s.study_uid,
        "Modality": s.modality,
        "SeriesDate": _timestamp(datetime.combine(s.study.study_date, datetime.min.time())),
        "SeriesDescription": s.description,
        "BodyPartExamined": s.body_part,
        "SeriesNumber": str(s.series_number) if strings else s.series_number,
        "Collection": s.collection,
        "PatientID": s.patient_id,
        "Manufacturer": s.manufacturer,
        "ManufacturerModelName": _model_name(s),
        "ImageCount": s.image_count,
    }
    if version == "v4":
        patient = s.study.patient
        row |= {
            "Site": "SIM-SITE",
            "PatientSex": patient.patient_sex,
            "PatientAge": patient.age,
            "MaxSubmissionTimestamp": _timestamp(s.timestamp),
            "DataDescriptionURI": _collection_uri(s.collection),
            "ReleasedStatus": "Released",
            "StudyDesc": s.study.description,
            "StudyDate": s.study.study_date.strftime("%m-%d-%Y"),
            "ThirdPartyAnalysis": "NO",
            "Authorized": "YES",
            "FileSize": str(s.file_size),
        }
    else:
        row |= {
            "TimeStamp": _timestamp(s.timestamp),
            "CollectionURI": _collection_uri(s.collection),
            "FileSize": str(s.file_size) if strings else s.file_size,
        }
    row["DateReleased"] = _timestamp(s.date_released)
    if s.license:
        row |= {"LicenseName": LICENSE_NAME, "LicenseURI": LICENSE_URI}
    return _drop_none(row)


def _patient_row(patient_id: str, archive: SimArchive, version: str) -> Row:
    p = next(p for p in archive.patients if p.patient_id == patient_id)
    key = "PatientId" if version == "v4" else "PatientID"
    return {
        key: p.patient_id,
        "PatientName": p.patient_name,
        "PatientSex": p.patient_sex,
        "Collection": p.collection,
        "Phantom": "NO",
        "SpeciesCode": "337915000",
        "SpeciesDescription": "Homo sapiens",
    }


def _study_row(study: SimStudy, series_count: int) -> Row:
    p = study.patient
    return _drop_none(
        {
            "StudyInstanceUID": study.study_uid,
            "StudyDate": study.study_date.isoformat(),
            "StudyDescription": study.description,
            "PatientAge": p.age,
            "PatientID": p.patient_id,
            "PatientName": p.patient_name,
            "PatientSex": p.patient_sex,
            "Collection": p.collection,
            "SeriesCount": series_count,
        }
    )


def _metadata_row(s: SimSeries) -> Row:
    return _drop_none(
        {
            "Series UID": s.uid,
            "Collection": s.collection,
            "3rd Party Analysis": "NO",
            "Data Description URI": _collection_uri(s.collection),
            "Subject ID": s.patient_id,
            "Study UID": s.study_uid,
            "Study Description": s.study.description,
            "Study Date": s.study.study_date.strftime("%m-%d-%Y"),
            "Series Description": s.description,
            "Manufacturer": s.manufacturer,
            "Modality": s.modality,
            "SOP Class UID": s.sop_class_uid,
            "Number of Images": str(s.image_count),
            "File Size": str(s.file_size),
            "Series Number": str(s.series_number),
            "License Name": LICENSE_NAME if s.license else None,
            "License URL": LICENSE_URI if s.license else None,
            "Date Released": s.date_released.strftime("%m-%d-%Y"),
        }
    )


def _distinct(values: list[str | None], column: str) -> list[Row]:
    seen = sorted({v for v in values if v})
    return [{column: v} for v in seen]


def _studies_rows(series: list[SimSeries]) -> list[Row]:
    counts: dict[str, int] = {}
    studies: dict[str, SimStudy] = {}
    for s in series:
        counts[s.study_uid] = counts.get(s.study_uid, 0) + 1
        studies[s.study_uid] = s.study
    return [_study_row(st, counts[uid]) for uid, st in studies.items()]


def run_query(
    archive: SimArchive, version: str, endpoint: str, params: dict[str, str], visible: Visible
) -> list[Row]:
    """Rows for one query endpoint; BadRequest for bad dates or forbidden collections."""
    collection = params.get("Collection")
    if collection and not visible(collection):
        # The archive answers "no access" with 400, not 403.
        raise BadRequest(f"Access to collection {collection} is not authorized")
    pool = [s for s in archive.series.values() if visible(s.collection)]

    def where(*names: str) -> list[SimSeries]:
        out = pool
        for name in names:
            if params.get(name):
                getter = _SERIES_FILTERS[name]
                out = [s for s in out if getter(s) == params[name]]
        return out

    if endpoint == "getCollectionValues":
        return [{"Collection": c} for c in archive.collections if visible(c)]
    if endpoint == "getModalityValues":
        return _distinct([s.modality for s in where("Collection", "BodyPartExamined")], "Modality")
    if endpoint == "getBodyPartValues":
        chosen = where("Collection", "Modality")
        return _distinct([s.body_part for s in chosen], "BodyPartExamined")
    if endpoint == "getManufacturerValues":
        chosen = where("Collection", "Modality", "BodyPartExamined")
        return _distinct([s.manufacturer for s in chosen], "Manufacturer")
    if endpoint == "getPatient":
        ids = dict.fromkeys(s.patient_id for s in where("Collection"))
        return [_patient_row(pid, archive, version) for pid in ids]
    if endpoint == "getPatientStudy":
        return _studies_rows(where("Collection", "PatientID", "StudyInstanceUID"))
    if endpoint == "getSeries":
        return [series_row(s, version) for s in where(*_SERIES_FILTERS)]
    if endpoint == "getUpdatedSeries":
        since = updated_since(version, params["fromDate"])
        return [series_row(s, version) for s in pool if s.date_released.date() > since]
    if endpoint == "NewPatientsInCollection":
        since = new_since(version, params)
        fresh = [s for s in where("Collection") if s.date_released.date() >= since]
        ids = dict.fromkeys(s.patient_id for s in fresh)
        return [_patient_row(pid, archive, version) for pid in ids]
    if endpoint == "NewStudiesInPatientCollection":
        since = new_since(version, params)
        chosen = where("Collection", "PatientID")
        return _studies_rows([s for s in chosen if s.date_released.date() >= since])
    series = archive.series.get(params.get("SeriesInstanceUID", ""))
    if series is not None and not visible(series.collection):
        raise BadRequest("Access to this series is not authorized")
    if series is None:
        return []
    if endpoint == "getSeriesMetaData":
        return [_metadata_row(series)]
    if endpoint == "getSeriesSize":
        return [{"TotalSizeInBytes": f"{series.file_size}.0", "ObjectCount": series.image_count}]
    if endpoint == "getSOPInstanceUIDs":
        return [{"SOPInstanceUID": i.sop_uid} for i in series.instances]
    raise BadRequest(f"Not a query endpoint: {endpoint}")
