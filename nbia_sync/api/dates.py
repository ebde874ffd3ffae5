"""Dates on the wire: what each API version wants, and what the archive sends back.

Sending is the trap (see docs/reference nbia-api.md, "Date formats"): the v1/v2 server
reads getUpdatedSeries' ``fromDate`` as ``dd/MM/yyyy`` but NewPatientsInCollection /
NewStudiesInPatientCollection's ``Date`` as ``yyyy/MM/dd``; v4 takes ``fromDate`` as
``MM-DD-YYYY`` everywhere. Receiving is merely messy: the archive sends dates as strings in
several shapes, and the catalog stores timezone-aware UTC.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime
from typing import Literal

ApiVersion = Literal["v1", "v2", "v4"]


def updated_series_param(since: date, api: ApiVersion) -> tuple[str, str]:
    """(name, value) of getUpdatedSeries' date parameter for this API version."""
    if api == "v4":
        return "fromDate", since.strftime("%m-%d-%Y")
    return "fromDate", since.strftime("%d/%m/%Y")


def new_since_param(since: date, api: ApiVersion) -> tuple[str, str]:
    """(name, value) of NewPatientsInCollection / NewStudiesInPatientCollection's date."""
    if api == "v4":
        return "fromDate", since.strftime("%m-%d-%Y")
    return "Date", since.strftime("%Y/%m/%d")


# Shapes seen from NBIA, most specific first. Slash dates are US order (MM/dd/yyyy) as the
# web portal shows them; a first field above 12 can only be a day and is read as dd/MM.
_DATETIME_FORMATS = (
    "%Y-%m-%d %H:%M:%S.%f",
    "%Y-%m-%d %H:%M:%S",
    "%Y-%m-%d %H:%M",
    "%Y-%m-%d",
    "%Y/%m/%d %H:%M:%S",
    "%Y/%m/%d",
    "%Y%m%d",  # DICOM DA
    "%m/%d/%Y %H:%M:%S",
    "%m/%d/%Y",
    "%d/%m/%Y",
    "%m-%d-%Y",
    "%d-%m-%Y",
    "%d-%b-%Y",
    "%b %d, %Y",
)
_EPOCH = re.compile(r"^-?\d{10,13}$")


def parse_datetime(value: object) -> datetime | None:
    """A timezone-aware UTC datetime from whatever the archive sent, or None.

    Naive values are taken as UTC (the archive does not say; UTC keeps comparisons stable).
    Unparseable values are None rather than an error: a date is metadata, never worth
    losing a whole listing over.
    """
    if value is None:
        return None
    if isinstance(value, datetime):
        return _as_utc(value)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return _from_epoch(float(value))
    if not isinstance(value, str):
        return None
    text = value.strip()
    if not text:
        return None
    if _EPOCH.match(text):
        return _from_epoch(float(text))
    iso = text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text
    try:
        return _as_utc(datetime.fromisoformat(iso))
    except ValueError:
        pass
    for fmt in _DATETIME_FORMATS:
        try:
            return datetime.strptime(text, fmt).replace(tzinfo=UTC)
        except ValueError:
            continue
    return None


def parse_date(value: object) -> date | None:
    """The calendar date of :func:`parse_datetime`, or None."""
    if isinstance(value, date) and not isinstance(value, datetime):
        return value
    parsed = parse_datetime(value)
    return parsed.date() if parsed is not None else None


def _as_utc(value: datetime) -> datetime | None:
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00+14:00 is before year 1 in UTC
        return None


def _from_epoch(seconds: float) -> datetime | None:
    # Java servers send epoch milliseconds; 13 digits cannot be seconds in this era.
    if abs(seconds) >= 1e11:
        seconds /= 1000.0
    try:
        return datetime.fromtimestamp(seconds, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return None
