"""Per-version date parameters and tolerant parsing of the archive's dates."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone

import pytest

from nbia_sync.api.dates import new_since_param, parse_date, parse_datetime, updated_series_param

MARCH_16 = date(2020, 3, 16)


@pytest.mark.parametrize("api", ["v1", "v2"])
def test_updated_series_v1_v2_sends_day_first_slashes(api: str) -> None:
    assert updated_series_param(MARCH_16, api) == ("fromDate", "16/03/2020")  # type: ignore[arg-type]


def test_updated_series_v4_sends_month_first_dashes() -> None:
    assert updated_series_param(MARCH_16, "v4") == ("fromDate", "03-16-2020")


@pytest.mark.parametrize("api", ["v1", "v2"])
def test_new_since_v1_v2_sends_date_year_first(api: str) -> None:
    assert new_since_param(MARCH_16, api) == ("Date", "2020/03/16")  # type: ignore[arg-type]


def test_new_since_v4_sends_fromdate_month_first() -> None:
    assert new_since_param(MARCH_16, "v4") == ("fromDate", "03-16-2020")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("2020-03-16 12:34:56.0", datetime(2020, 3, 16, 12, 34, 56, tzinfo=UTC)),
        ("2020-03-16 12:34:56", datetime(2020, 3, 16, 12, 34, 56, tzinfo=UTC)),
        ("2020-03-16", datetime(2020, 3, 16, tzinfo=UTC)),
        ("2020-03-16T12:34:56Z", datetime(2020, 3, 16, 12, 34, 56, tzinfo=UTC)),
        ("2020-03-16T14:34:56+02:00", datetime(2020, 3, 16, 12, 34, 56, tzinfo=UTC)),
        ("03/16/2020", datetime(2020, 3, 16, tzinfo=UTC)),
        ("16/03/2020", datetime(2020, 3, 16, tzinfo=UTC)),
        ("03-16-2020", datetime(2020, 3, 16, tzinfo=UTC)),
        ("2020/03/16", datetime(2020, 3, 16, tzinfo=UTC)),
        ("20200316", datetime(2020, 3, 16, tzinfo=UTC)),
        ("1584362096000", datetime(2020, 3, 16, 12, 34, 56, tzinfo=UTC)),
        (1584362096, datetime(2020, 3, 16, 12, 34, 56, tzinfo=UTC)),
    ],
)
def test_parse_datetime_accepts_the_archives_shapes(raw: object, expected: datetime) -> None:
    assert parse_datetime(raw) == expected


def test_parse_datetime_returns_utc_aware_values() -> None:
    parsed = parse_datetime("2020-03-16T14:34:56+02:00")
    assert parsed is not None and parsed.utcoffset() == timedelta(0)


def test_parse_datetime_converts_aware_datetimes_to_utc() -> None:
    local = datetime(2020, 3, 16, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    assert parse_datetime(local) == datetime(2020, 3, 16, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize("raw", [None, "", "   ", "not a date", "99/99/2020", [], True])
def test_parse_datetime_gives_none_for_unusable_values(raw: object) -> None:
    assert parse_datetime(raw) is None


def test_parse_date_drops_the_time() -> None:
    assert parse_date("2020-03-16 23:59:59.0") == MARCH_16
