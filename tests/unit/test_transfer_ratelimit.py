"""The process-wide bandwidth limit (transfer.bandwidth_limit), on a fake clock."""

from __future__ import annotations

import anyio
import pytest

from nbia_sync.clock import FakeClock
from nbia_sync.transfer._ratelimit import TokenBucket

pytestmark = pytest.mark.asyncio


async def test_a_burst_within_the_bucket_does_not_wait() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=1_000, burst=50_000, clock=clock)
    await bucket.acquire(50_000)
    assert (clock.sleeps, clock.monotonic()) == ([], 0.0)


async def test_shared_bucket_holds_the_rate_across_concurrent_callers() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=200_000, burst=10_000, clock=clock)

    async def download() -> None:
        for _ in range(4):
            await bucket.acquire(10_000)

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(download)
    # 120 kB at 200 kB/s with 10 kB free up front: 0.55 s, whoever asks.
    assert clock.monotonic() == pytest.approx(0.55)


async def test_tokens_refill_with_the_time_that_passed() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=1_000, burst=1_000, clock=clock)
    await bucket.acquire(1_000)
    clock.advance(0.5)
    await bucket.acquire(500)  # refilled by the half second
    assert clock.sleeps == []
    await bucket.acquire(250)
    assert clock.sleeps == [pytest.approx(0.25)]


async def test_a_request_bigger_than_the_bucket_goes_into_debt_not_deadlock() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=100_000, burst=1_000, clock=clock)
    await bucket.acquire(20_000)
    assert clock.sleeps == [pytest.approx(0.19)]
    await bucket.acquire(1_000)  # the debt was waited off: the next caller waits its own share
    assert clock.sleeps[1] == pytest.approx(0.01)


async def test_rate_must_be_positive() -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate=0)
