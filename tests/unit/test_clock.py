"""The fake clock the tests run on: time moves only when told, or when a sleeper jumps it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import anyio
import pytest

from nbia_sync.clock import SYSTEM_CLOCK, FakeClock, sleep_or_stop

pytestmark = pytest.mark.asyncio

START = datetime(2030, 5, 1, 12, tzinfo=UTC)


async def test_advance_moves_wall_and_monotonic_time_together() -> None:
    clock = FakeClock(START, autojump=False)
    clock.advance(90)
    assert (clock.now(), clock.monotonic()) == (START + timedelta(seconds=90), 90.0)


async def test_time_does_not_go_back() -> None:
    with pytest.raises(ValueError):
        FakeClock().advance(-1)


async def test_start_must_be_timezone_aware() -> None:
    with pytest.raises(ValueError):
        FakeClock(datetime(2030, 1, 1))


async def test_autojump_sleep_moves_the_clock_to_its_deadline() -> None:
    clock = FakeClock(START)
    await clock.sleep(3600)
    assert clock.now() == START + timedelta(hours=1) and clock.sleeps == [3600]


async def test_sleeper_wakes_only_when_the_clock_reaches_its_deadline() -> None:
    clock = FakeClock(autojump=False)
    woke: list[float] = []

    async def sleeper() -> None:
        await clock.sleep(10)
        woke.append(clock.monotonic())

    async with anyio.create_task_group() as tg:
        tg.start_soon(sleeper)
        await clock.until_sleeping(1)
        clock.advance(9)
        await anyio.wait_all_tasks_blocked()
        assert woke == []
        clock.advance(1)
    assert woke == [10.0]


async def test_sleep_or_stop_returns_when_stop_is_set() -> None:
    clock = FakeClock(autojump=False)
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(sleep_or_stop, clock, 3600.0, stop)
        await clock.until_sleeping(1)
        stop.set()
    assert clock.monotonic() == 0.0


async def test_sleep_or_stop_returns_after_the_sleep() -> None:
    clock = FakeClock()
    await sleep_or_stop(clock, 5.0, anyio.Event())
    assert clock.monotonic() == 5.0


async def test_system_clock_is_aware_utc() -> None:
    assert SYSTEM_CLOCK.now().tzinfo is UTC
