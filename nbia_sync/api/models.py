"""Typed records for what the archive returns.

The archive omits attributes that are not populated and sends numbers and dates as
strings in several formats; the client normalises all of that into these records.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime


@dataclass(frozen=True, slots=True)
class PatientInfo:
    collection: str
    patient_id: str
    patient_name: str | None = None
    patient_sex: str | None = None
    problem: str | None = field(default=None, compare=False)  # as SeriesInfo.problem


@dataclass(frozen=True, slots=True)
class StudyInfo:
    collection: str
    patient_id: str
    study_uid: str
    study_date: date | None = None
    study_description: str | None = None
    series_count: int | None = None
    problem: str | None = field(default=None, compare=False)  # as SeriesInfo.problem


@dataclass(frozen=True, slots=True)
class SeriesInfo:
    """One series as the archive describes it (getSeries / getUpdatedSeries)."""

    series_uid: str
    study_uid: str
    collection: str
    patient_id: str
    modality: str | None = None
    body_part: str | None = None
    series_description: str | None = None
    series_number: int | None = None
    manufacturer: str | None = None
    image_count: int | None = None
    file_size: int | None = None  # bytes
    date_released: datetime | None = None
    license_name: str | None = None
    license_uri: str | None = None
    # Everything else the archive sent, as received (kept for the catalog's record).
    extra: dict[str, str] = field(default_factory=dict, compare=False, hash=False)
    # Why the record cannot be stored (api/_records.py): the catalog skips it, counted.
    problem: str | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class SeriesSize:
    total_bytes: int
    object_count: int
