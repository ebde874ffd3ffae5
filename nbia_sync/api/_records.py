"""Turning NBIA's JSON bodies into the typed records of api/models.py.

The archive omits unpopulated attributes, sends numbers as strings ("1234", "1234.0"),
answers "no results" with an empty body, and v4 renames a column or two. All of that is
absorbed here. Two failures are not:
  * a body that is not JSON (or not objects) -> RetryableError: in practice it is a
    truncated answer or a proxy's error page sent with 200, and the next try usually works;
  * a record without its identifying key -> PermanentError: asking again returns the same
    record, and guessing an identity would put files in the wrong place.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
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


def json_records(body: bytes, what: str) -> list[Record]:
    """The objects of a JSON body; an empty body means no results."""
    if not body.strip():
        return []
    try:
        data: Any = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RetryableError(f"{what}: the answer is not valid JSON ({exc})") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
        raise RetryableError(f"{what}: the answer is not a JSON list of objects")
    return data


def text(value: object) -> str | None:
    """A non-empty string, or None for absent/blank values."""
    if value is None or isinstance(value, dict | list):
        return None
    result = str(value).strip()
    return result or None


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


def _patient_id(record: Record, what: str, index: int) -> str:
    # v1/v2 say PatientID, v4's getPatient says PatientId.
    return required(record, ("PatientID", "PatientId"), what, index)


def _collection(record: Record, default: str | None, what: str, index: int) -> str:
    value = text(record.get("Collection")) or default
    if value is None:
        raise PermanentError(f"{what}: record {index} has no Collection")
    return value


def collection_name(record: Record, what: str, index: int) -> str:
    return required(record, ("Collection",), what, index)


def patient_info(record: Record, what: str, index: int, collection: str) -> PatientInfo:
    return PatientInfo(
        collection=_collection(record, collection, what, index),
        patient_id=_patient_id(record, what, index),
        patient_name=text(record.get("PatientName")),
        patient_sex=text(record.get("PatientSex")),
    )


def study_info(record: Record, what: str, index: int, collection: str | None) -> StudyInfo:
    return StudyInfo(
        collection=_collection(record, collection, what, index),
        patient_id=_patient_id(record, what, index),
        study_uid=required(record, ("StudyInstanceUID",), what, index),
        study_date=parse_date(record.get("StudyDate")),
        study_description=text(record.get("StudyDescription")),
        series_count=integer(record.get("SeriesCount")),
    )


def series_info(record: Record, what: str, index: int, collection: str | None) -> SeriesInfo:
    return SeriesInfo(
        series_uid=required(record, ("SeriesInstanceUID",), what, index),
        study_uid=required(record, ("StudyInstanceUID",), what, index),
        collection=_collection(record, collection, what, index),
        patient_id=_patient_id(record, what, index),
        modality=text(record.get("Modality")),
        body_part=text(record.get("BodyPartExamined")),
        series_description=text(record.get("SeriesDescription")),
        series_number=integer(record.get("SeriesNumber")),
        manufacturer=text(record.get("Manufacturer")),
        image_count=integer(record.get("ImageCount")),
        file_size=integer(record.get("FileSize")),
        date_released=parse_datetime(record.get("DateReleased")),
        license_name=text(record.get("LicenseName")),
        license_uri=text(record.get("LicenseURI")),
        extra={
            key: value
            for key, raw in record.items()
            if key not in _SERIES_KEYS and (value := text(raw)) is not None
        },
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
