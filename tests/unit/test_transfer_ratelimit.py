"""The process-wide bandwidth limit (transfer.bandwidth_limit)."""

from __future__ import annotations

import time

import anyio
import pytest

from nbia_sync.transfer._ratelimit import TokenBucket

pytestmark = pytest.mark.asyncio


async def test_a_burst_within_the_bucket_does_not_wait() -> None:
    bucket = TokenBucket(rate=1_000, burst=50_000)
    started = time.monotonic()
    await bucket.acquire(50_000)
    assert time.monotonic() - started < 0.05


async def test_shared_bucket_holds_the_rate_across_concurrent_callers() -> None:
    bucket = TokenBucket(rate=200_000, burst=10_000)
    started = time.monotonic()

    async def download() -> None:
        for _ in range(4):
            await bucket.acquire(10_000)

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(download)
    elapsed = time.monotonic() - started
    # 120 kB at 200 kB/s with 10 kB free up front: at least 0.55 s, whoever asks.
    assert 0.5 <= elapsed < 1.5


async def test_a_request_bigger_than_the_bucket_goes_into_debt_not_deadlock() -> None:
    bucket = TokenBucket(rate=100_000, burst=1_000)
    started = time.monotonic()
    await bucket.acquire(20_000)
    assert 0.15 <= time.monotonic() - started < 1.0


async def test_rate_must_be_positive() -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate=0)
