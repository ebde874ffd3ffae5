"""Turning NBIA's JSON bodies into the typed records of api/models.py.

The archive omits unpopulated attributes, sends numbers as strings ("1234", "1234.0"),
answers "no results" with an empty body, and v4 renames a column or two. All of that is
absorbed here. Two failures are not:
  * a body that is not JSON (or not objects) -> RetryableError: in practice it is a
    truncated answer or a proxy's error page sent with 200, and the next try usually works;
  * a record without its identifying key -> PermanentError: asking again returns the same
    record, and guessing an identity would put files in the wrong place.
Series, patient and study records are the exception: one bad record must not cost the
rest of the listing, so :func:`series_info`, :func:`patient_info` and :func:`study_info`
never raise. A record the catalog cannot store (an identity
missing, holding a NUL or a lone surrogate, or longer than its column; a FileSize or
ImageCount out of range) comes back with ``problem`` set and is skipped, counted, by the
catalog. Cosmetic text is cleaned instead (NUL dropped, lone surrogates replaced) and an
absurd DateReleased is ignored, so the series itself is kept.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from nbia_sync.api.dates import parse_date, parse_datetime
from nbia_sync.api.models import PatientInfo, SeriesInfo, SeriesSize, StudyInfo
from nbia_sync.errors import PermanentError, RetryableError

Record = Mapping[str, Any]

_SERIES_KEYS = frozenset(
    {
        "SeriesInstanceUID",
        "StudyInstanceUID",
        "Collection",
        "PatientID",
        "PatientId",
        "Modality",
        "BodyPartExamined",
        "SeriesDescription",
        "SeriesNumber",
        "Manufacturer",
        "ImageCount",
        "FileSize",
        "DateReleased",
        "LicenseName",
        "LicenseURI",
    }
)


# Bounds of what the catalog can store (catalog/models.py column types and widths).
MAX_UID_CHARS = 128  # series/study UID columns (DICOM allows 64; path parts hash beyond)
MAX_NAME_CHARS = 200  # collection and patient ID columns
MAX_FILE_SIZE = 2**63 - 1  # BIGINT
MAX_IMAGE_COUNT = 2**31 - 1  # INTEGER
# DateReleased outside these is ignored (taken as unknown): NBIA started releasing long
# after 1970, and a year-1 date would break the watermark's arithmetic.
EARLIEST_RELEASE = datetime(1970, 1, 1, tzinfo=UTC)
LATEST_RELEASE = datetime(2200, 1, 1, tzinfo=UTC)
_COLUMN_WIDTHS = {"modality": 32, "body_part": 200}


def json_records(body: bytes, what: str) -> list[Record]:
    """The objects of a JSON body; an empty body means no results."""
    if not body.strip():
        return []
    try:
        data: Any = json.loads(body)
    except (ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError, bad UTF-8 and a number past Python's digit
        # limit; RecursionError a body nested thousands deep.
        raise RetryableError(f"{what}: the answer is not valid JSON ({exc})") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
        raise RetryableError(f"{what}: the answer is not a JSON list of objects")
    return data


def text(value: object) -> str | None:
    """A non-empty string, or None for absent/blank values."""
    if isinstance(value, str):  # nearly every value of a listing: no str() copy
        return value.strip() or None
    if value is None or isinstance(value, dict | list):
        return None
    try:
        result = str(value).strip()
    except ValueError:  # an int past Python's 4300-digit str() limit
        return None
    return result or None


def clean(value: str | None) -> str | None:
    """Text any catalog accepts: NUL dropped (PostgreSQL refuses it), lone surrogates
    (no UTF-8 form) replaced by U+FFFD."""
    if value is None:
        return None
    if "\x00" in value:
        value = value.replace("\x00", "")
    if not value.isascii() and _has_surrogate(value):  # ASCII has none: no encode
        value = value.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return value.strip() or None


def _has_surrogate(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _clipped(value: object, width: int | None = None) -> str | None:
    result = clean(text(value))
    return result[:width] if result is not None and width is not None else result


def integer(value: object) -> int | None:
    """An int from 12, 12.0, "12" or "12.0"; None when absent or not a number."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    try:
        number = float(str(value).strip())
    except ValueError:
        return None
    return int(number) if number == number and abs(number) != float("inf") else None


def required(record: Record, keys: tuple[str, ...], what: str, index: int) -> str:
    for key in keys:
        value = text(record.get(key))
        if value is not None:
            return value
    raise PermanentError(f"{what}: record {index} has no {keys[0]}")


def collection_name(record: Record, what: str, index: int) -> str:
    # Cleaned and clipped to the collections column, which a NUL or an overlong name
    # would otherwise break for the whole pass.
    name = clean(required(record, ("Collection",), what, index))
    if name is None:
        raise PermanentError(f"{what}: record {index} has no Collection")
    return name[:MAX_NAME_CHARS]


class _Problems:
    """The first reason a record cannot be stored (later ones add nothing)."""

    def __init__(self, what: str, index: int) -> None:
        self.where = f"{what}: record {index}"
        self.first: str | None = None

    def add(self, reason: str) -> None:
        if self.first is None:
            self.first = f"{self.where} {reason}"

    def identity(self, value: str | None, key: str, limit: int) -> str:
        """An identifying value as given, or "" with a problem noted (an empty or blank
        value names nothing: it is missing too)."""
        if value is None or not value.strip():
            self.add(f"has no {key}")
            return ""
        if "\x00" in value or _has_surrogate(value):
            self.add(f"has a NUL or an invalid character in {key}")
            return clean(value) or ""
        if len(value) > limit:
            self.add(f"has a {key} of {len(value)} characters (at most {limit})")
            return value[:limit]
        return value

    def count(self, value: object, key: str, limit: int) -> int | None:
        number = integer(value)
        if number is not None and not 0 <= number <= limit:
            self.add(f"has {key} {number}, outside 0..{limit}")
            return None
        return number


def _who(record: Record, bad: _Problems, collection: str | None) -> tuple[str, str]:
    name = bad.identity(text(record.get("Collection")) or collection, "Collection", MAX_NAME_CHARS)
    # v1/v2 say PatientID, v4's getPatient says PatientId.
    patient = text(record.get("PatientID")) or text(record.get("PatientId"))
    return name, bad.identity(patient, "PatientID", MAX_NAME_CHARS)


def patient_info(record: Record, what: str, index: int, collection: str) -> PatientInfo:
    """Never raises: a record that cannot be used comes back with ``problem`` set."""
    bad = _Problems(what, index)
    name, patient_id = _who(record, bad, collection)
    return PatientInfo(
        collection=name,
        patient_id=patient_id,
        patient_name=_clipped(record.get("PatientName")),
        patient_sex=_clipped(record.get("PatientSex")),
        problem=bad.first,
    )


def study_info(record: Record, what: str, index: int, collection: str | None) -> StudyInfo:
    """Never raises: a record that cannot be used comes back with ``problem`` set."""
    bad = _Problems(what, index)
    name, patient_id = _who(record, bad, collection)
    study_uid = text(record.get("StudyInstanceUID"))
    return StudyInfo(
        collection=name,
        patient_id=patient_id,
        study_uid=bad.identity(study_uid, "StudyInstanceUID", MAX_UID_CHARS),
        study_date=parse_date(record.get("StudyDate")),
        study_description=_clipped(record.get("StudyDescription")),
        series_count=integer(record.get("SeriesCount")),
        problem=bad.first,
    )


def _release_date(value: object) -> datetime | None:
    released = parse_datetime(value)
    if released is None or not EARLIEST_RELEASE <= released < LATEST_RELEASE:
        return None
    return released


def series_info(record: Record, what: str, index: int, collection: str | None) -> SeriesInfo:
    """The series a record describes; never raises (see the module doc: ``problem``)."""
    bad = _Problems(what, index)
    series_uid = bad.identity(
        text(record.get("SeriesInstanceUID")), "SeriesInstanceUID", MAX_UID_CHARS
    )
    study_uid = bad.identity(
        text(record.get("StudyInstanceUID")), "StudyInstanceUID", MAX_UID_CHARS
    )
    name, patient_id = _who(record, bad, collection)
    image_count = bad.count(record.get("ImageCount"), "ImageCount", MAX_IMAGE_COUNT)
    file_size = bad.count(record.get("FileSize"), "FileSize", MAX_FILE_SIZE)
    number = integer(record.get("SeriesNumber"))
    return SeriesInfo(
        series_uid=series_uid,
        study_uid=study_uid,
        collection=name,
        patient_id=patient_id,
        modality=_clipped(record.get("Modality"), _COLUMN_WIDTHS["modality"]),
        body_part=_clipped(record.get("BodyPartExamined"), _COLUMN_WIDTHS["body_part"]),
        series_description=_clipped(record.get("SeriesDescription")),
        series_number=number if number is not None and abs(number) <= MAX_IMAGE_COUNT else None,
        manufacturer=_clipped(record.get("Manufacturer")),
        image_count=image_count,
        file_size=file_size,
        date_released=_release_date(record.get("DateReleased")),
        license_name=_clipped(record.get("LicenseName")),
        license_uri=_clipped(record.get("LicenseURI")),
        extra={
            key: value
            for raw_key, raw in record.items()
            if raw_key not in _SERIES_KEYS
            and (key := clean(str(raw_key))) is not None
            and (value := _clipped(raw)) is not None
        },
        problem=bad.first,
    )


def series_size(records: list[Record], what: str) -> SeriesSize:
    if not records:
        raise PermanentError(f"{what}: the archive has no such series")
    record = records[0]
    total = integer(record.get("TotalSizeInBytes"))
    count = integer(record.get("ObjectCount"))
    if total is None or count is None:
        raise PermanentError(f"{what}: the answer has no TotalSizeInBytes/ObjectCount")
    return SeriesSize(total_bytes=total, object_count=count)


def flat_strings(record: Record) -> dict[str, str]:
    return {key: value for key, raw in record.items() if (value := text(raw)) is not None}
