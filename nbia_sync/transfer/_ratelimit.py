"""A token bucket shared by every download of the process (transfer.bandwidth_limit)."""

from __future__ import annotations

import anyio

from nbia_sync.clock import SYSTEM_CLOCK, Clock


class TokenBucket:
    """``rate`` bytes per second on average, bursts up to ``burst`` bytes.

    A request larger than the bucket is let through by going into debt: the next callers
    wait the debt off, so the long-run rate holds whatever the chunk size.
    """

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        *,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else rate)
        self._clock = clock
        self._tokens = self.burst
        self._stamp = clock.monotonic()
        # Serialises waiters so that a big request is not starved by small ones.
        self._lock = anyio.Lock()

    def _refill(self) -> None:
        now = self._clock.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    async def acquire(self, n: int) -> None:
        async with self._lock:
            self._refill()
            self._tokens -= n
            if self._tokens < 0:
                await self._clock.sleep(-self._tokens / self.rate)
