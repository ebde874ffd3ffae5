"""Property tests: the Retry-After parser, the backoff delay and the date parsers never
raise anything but their documented errors and always give bounded, finite answers."""

from __future__ import annotations

import math
from datetime import UTC, date, datetime, timedelta
from email.utils import format_datetime

from hypothesis import example, given
from hypothesis import strategies as st

from nbia_sync.api.dates import parse_date, parse_datetime
from nbia_sync.api.retry import MAX_RETRY_AFTER, RetryPolicy, parse_retry_after

NOW = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)

# Header values as a hostile server may send them: numbers of every shape, HTTP dates
# from year 1 to 9999 in any zone, and arbitrary text.
numbers = st.one_of(
    st.integers(min_value=-(10**400), max_value=10**400).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["inf", "-inf", "nan", "Infinity", "1e12", "1e309", "-0", "+5", "0x10"]),
)
http_dates = st.builds(
    lambda when, offset: format_datetime(when.replace(tzinfo=None)) + f" {offset:+05d}",
    st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)),
    st.integers(min_value=-2359, max_value=2359),
)
headers = st.one_of(st.none(), numbers, http_dates, st.text(max_size=80))


@given(headers)
@example("Fri, 31 Dec 9999 23:59:59 -2359")
@example("Mon, 01 Jan 0001 00:00:00 +2359")
@example("9" * 5000)
@example("1e309")
def test_retry_after_is_none_or_finite_within_the_cap(value: str | None) -> None:
    seconds = parse_retry_after(value, now=NOW)
    assert seconds is None or (math.isfinite(seconds) and 0.0 <= seconds <= MAX_RETRY_AFTER)


@given(st.integers(min_value=0, max_value=10**12))
def test_retry_after_in_seconds_is_exact_up_to_the_cap(seconds: int) -> None:
    assert parse_retry_after(str(seconds), now=NOW) == min(float(seconds), MAX_RETRY_AFTER)


@given(st.integers(min_value=0, max_value=int(MAX_RETRY_AFTER)))
def test_retry_after_as_an_http_date_is_the_seconds_until_it(seconds: int) -> None:
    header = format_datetime(NOW + timedelta(seconds=seconds), usegmt=True)
    assert parse_retry_after(header, now=NOW) == float(seconds)


@given(
    attempt=st.integers(min_value=-(10**6), max_value=10**9),
    retry_after=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
    base=st.floats(min_value=0, max_value=1e6),
    cap=st.floats(min_value=0, max_value=1e6),
    draw=st.floats(min_value=0, max_value=1, exclude_max=True),
)
def test_delay_is_finite_and_never_beyond_max_delay(
    attempt: int, retry_after: float | None, base: float, cap: float, draw: float
) -> None:
    policy = RetryPolicy(base_delay=base, max_delay=cap, attempts=3, rand=lambda: draw)
    wait = policy.delay(attempt, retry_after)
    assert math.isfinite(wait) and 0.0 <= wait <= cap


@given(headers)
def test_a_parsed_retry_after_never_overflows_a_deadline(value: str | None) -> None:
    policy = RetryPolicy(base_delay=0.2, max_delay=600.0, attempts=3)
    wait = policy.delay(0, parse_retry_after(value, now=NOW))
    assert NOW + timedelta(seconds=wait) <= NOW + timedelta(seconds=600)


archive_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.from_regex(r"-?\d{10,13}", fullmatch=True),
    st.datetimes(timezones=st.sampled_from([None, UTC])),
    st.datetimes().map(lambda d: d.isoformat() + "+14:00"),
    st.datetimes().map(lambda d: d.isoformat() + "-12:00"),
    st.dates(),
    st.lists(st.integers(), max_size=2),
)


@given(archive_values)
@example("0001-01-01T00:00:00+14:00")
@example("9999-12-31T23:59:59-12:00")
@example(datetime(1, 1, 1, tzinfo=UTC) + timedelta(hours=1))
@example(float("inf"))
@example("99999999999999")
def test_parse_datetime_gives_utc_or_none(value: object) -> None:
    parsed = parse_datetime(value)
    assert parsed is None or parsed.utcoffset() == timedelta(0)


@given(archive_values)
@example("0001-01-01T00:00:00+14:00")
def test_parse_date_gives_a_date_or_none(value: object) -> None:
    parsed = parse_date(value)
    assert parsed is None or isinstance(parsed, date)
