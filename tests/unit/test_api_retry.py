"""RetryPolicy: backoff with full jitter, Retry-After as a floor, error classification."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import aiohttp
import pytest

from nbia_sync.api.retry import (
    RetryPolicy,
    error_for_exception,
    error_for_status,
    parse_retry_after,
)
from nbia_sync.clock import FakeClock
from nbia_sync.config import TransferSettings
from nbia_sync.errors import PermanentError, RetryableError

pytestmark = pytest.mark.asyncio


def policy(attempts: int = 4, rand: float = 1.0, clock: FakeClock | None = None) -> RetryPolicy:
    return RetryPolicy(
        base_delay=1.0,
        max_delay=10.0,
        attempts=attempts,
        clock=clock or FakeClock(),
        rand=lambda: rand,
    )


async def test_delay_ceiling_doubles_per_attempt_up_to_max() -> None:
    p = policy(rand=1.0)
    assert [p.delay(a) for a in range(6)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


async def test_delay_is_full_jitter_scaled_by_the_random_draw() -> None:
    assert policy(rand=0.25).delay(3) == 2.0
    assert policy(rand=0.0).delay(3) == 0.0


async def test_delay_is_never_less_than_retry_after() -> None:
    assert policy(rand=0.0).delay(0, retry_after=7.5) == 7.5
    assert policy(rand=0.0).delay(5, retry_after=9.0) == 9.0


async def test_retry_after_beyond_max_delay_is_clamped_to_it() -> None:
    assert policy(rand=0.0).delay(0, retry_after=30.0) == 10.0


async def test_delay_survives_huge_attempt_numbers() -> None:
    assert policy(rand=1.0).delay(10_000) == 10.0


async def test_from_settings_uses_request_attempts_and_delays() -> None:
    transfer = TransferSettings(request_attempts=3, retry_base_delay=0.5, retry_max_delay=9.0)
    p = RetryPolicy.from_settings(transfer)
    assert (p.attempts, p.base_delay, p.max_delay) == (3, 0.5, 9.0)


async def test_call_retries_retryable_errors_until_success() -> None:
    clock = FakeClock()
    outcomes: list[Exception | str] = [RetryableError("a"), RetryableError("b"), "ok"]

    async def fn() -> str:
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    assert await policy(clock=clock).call(fn, what="test") == "ok"
    assert clock.sleeps == [1.0, 2.0] and clock.monotonic() == 3.0


async def test_call_gives_up_after_the_attempts_with_the_last_error() -> None:
    calls = 0

    async def fn() -> None:
        nonlocal calls
        calls += 1
        raise RetryableError(f"failure {calls}")

    with pytest.raises(RetryableError, match="failure 3"):
        await policy(attempts=3).call(fn, what="test")
    assert calls == 3


async def test_call_does_not_retry_permanent_errors() -> None:
    calls = 0

    async def fn() -> None:
        nonlocal calls
        calls += 1
        raise PermanentError("no access")

    with pytest.raises(PermanentError):
        await policy().call(fn, what="test")
    assert calls == 1


async def test_call_treats_raw_connection_errors_as_retryable() -> None:
    outcomes: list[BaseException | None] = [aiohttp.ServerDisconnectedError(), TimeoutError()]

    async def fn() -> str:
        if outcomes:
            error = outcomes.pop(0)
            assert error is not None
            raise error
        return "ok"

    assert await policy().call(fn, what="test") == "ok"


async def test_call_honours_retry_after_of_the_error() -> None:
    clock = FakeClock()
    outcomes = [RetryableError("429", retry_after=8.0)]

    async def fn() -> str:
        if outcomes:
            raise outcomes.pop()
        return "ok"

    await policy(rand=0.0, clock=clock).call(fn, what="test")
    assert clock.sleeps == [8.0]


@pytest.mark.parametrize("status", [500, 502, 503, 504, 429, 408])
async def test_transient_statuses_are_retryable(status: int) -> None:
    assert isinstance(error_for_status(status, {}, "q"), RetryableError)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 405, 418])
async def test_client_error_statuses_are_permanent(status: int) -> None:
    error = error_for_status(status, {}, "q")
    assert isinstance(error, PermanentError)
    assert not isinstance(error, RetryableError)


async def test_status_error_carries_the_body_and_retry_after() -> None:
    error = error_for_status(429, {"Retry-After": "3"}, "getSeries", "slow down")
    assert isinstance(error, RetryableError)
    assert error.retry_after == 3.0
    assert str(error) == "getSeries: HTTP 429: slow down"


async def test_retry_after_parses_seconds() -> None:
    assert parse_retry_after("120") == 120.0


async def test_retry_after_parses_an_http_date() -> None:
    now = datetime(2024, 1, 1, 12, 0, 0, tzinfo=UTC)
    header = format_datetime(now + timedelta(seconds=90), usegmt=True)
    assert parse_retry_after(header, now=now) == 90.0


@pytest.mark.parametrize("header", [None, "", "soon", "nan"])
async def test_retry_after_ignores_unusable_values(header: str | None) -> None:
    assert parse_retry_after(header) is None


async def test_retry_after_in_the_past_is_zero() -> None:
    now = datetime(2024, 1, 1, 12, 0, 0, tzinfo=UTC)
    header = format_datetime(now - timedelta(seconds=90), usegmt=True)
    assert parse_retry_after(header, now=now) == 0.0


async def test_timeouts_say_timed_out() -> None:
    assert "timed out" in str(error_for_exception(TimeoutError(), "getSeries"))
