"""The one clock: wall time for the catalog, a monotonic clock for intervals, and sleep.

Everything that reads the time or waits (leases, locks, heartbeats, backoff, the rate
limiter, the catalog's own retries) takes a Clock, the system clock by default, so tests
run on a FakeClock: time moves only when the test (or a sleeper) moves it, nothing sleeps
for real and no assertion depends on how fast the machine is.
"""

from __future__ import annotations

import contextlib
import time
from datetime import UTC, datetime, timedelta
from typing import Protocol

import anyio
import anyio.lowlevel


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, timezone-aware UTC (what the catalog stores)."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (for intervals)."""

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` (a checkpoint: cancellable)."""


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds)


SYSTEM_CLOCK: Clock = SystemClock()


class FakeClock:
    """A clock for tests. ``advance()`` moves both clocks and wakes the sleepers that are due.

    With ``autojump`` (the default) a sleeper does not wait for a test to advance: its
    sleep moves the clock to its own deadline at once (and yields), so code that backs off
    or paces itself runs in no real time while the clock still shows the time it waited.
    Every requested sleep is recorded in ``sleeps``.
    """

    def __init__(
        self, start: datetime | None = None, *, autojump: bool = True, monotonic: float = 0.0
    ) -> None:
        if start is not None and start.tzinfo is None:
            raise ValueError("start must be timezone-aware")
        self._start = start or datetime(2026, 1, 1, tzinfo=UTC)
        self._mono0 = self._mono = monotonic
        self.autojump = autojump
        self.sleeps: list[float] = []
        self._waiters: list[tuple[float, anyio.Event]] = []
        self._sleeping = anyio.Event()  # set when a sleeper starts waiting

    def now(self) -> datetime:
        return self._start + timedelta(seconds=self._mono - self._mono0)

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("time does not go back")
        self._mono += seconds
        due = [w for w in self._waiters if w[0] <= self._mono]
        self._waiters = [w for w in self._waiters if w[0] > self._mono]
        for _, event in due:
            event.set()

    async def sleep(self, seconds: float) -> None:
        seconds = max(seconds, 0.0)
        self.sleeps.append(seconds)
        deadline = self._mono + seconds
        if self.autojump:
            self.advance(deadline - self._mono)
            await anyio.lowlevel.checkpoint()
            return
        if deadline <= self._mono:
            await anyio.lowlevel.checkpoint()
            return
        event = anyio.Event()
        self._waiters.append((deadline, event))
        self._sleeping.set()
        try:
            await event.wait()
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove((deadline, event))

    async def until_sleeping(self, n: int = 1) -> None:
        """Wait (in no time) until ``n`` tasks sleep on this clock: then advancing it is
        what wakes them, not something they have yet to reach."""
        while len(self._waiters) < n:
            self._sleeping = anyio.Event()
            await self._sleeping.wait()


async def sleep_or_stop(clock: Clock, seconds: float, stop: anyio.Event) -> None:
    """Sleep ``seconds`` on ``clock``, waking early when ``stop`` is set."""
    async with anyio.create_task_group() as tg:

        async def sleep() -> None:
            await clock.sleep(seconds)
            tg.cancel_scope.cancel()

        tg.start_soon(sleep)
        await stop.wait()
        tg.cancel_scope.cancel()
