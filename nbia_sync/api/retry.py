"""One retry policy for every request, and the rules that sort failures into retryable or not.

Backoff is exponential with *full* jitter (a random delay in [0, ceiling]): many workers
failing together against one archive must not come back together. A server's Retry-After
is a floor, never shortened by jitter, but it is clamped to ``max_delay``: a server that
asks for a decade (or for ``inf``) gets ``max_delay``, and every delay this module hands out
is a finite number in [0, max_delay]. The transfer pool uses the same ``delay()`` to put a
series' next try in the catalog, so a restart resumes the same schedule.
"""

from __future__ import annotations

import math
import random as _random
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TypeVar

import structlog

from nbia_sync.causes import certificate_refusal, network_cause
from nbia_sync.clock import SYSTEM_CLOCK, Clock
from nbia_sync.config import TransferSettings
from nbia_sync.errors import ArchiveError, PermanentError, RetryableError, UntrustedServerError

log = structlog.get_logger(__name__)

T = TypeVar("T")

# 2**62 * any sane base delay is past every max_delay; larger exponents overflow floats.
_MAX_EXPONENT = 62
# parse_retry_after never returns more than this (a week); the policy clamps further to
# max_delay. Kept finite so that any datetime/timedelta arithmetic on it is safe.
MAX_RETRY_AFTER = 7 * 24 * 3600.0
# delta-seconds is 1*DIGIT (RFC 9110 10.2.3); a decimal point is tolerated.
_DELTA_SECONDS = re.compile(r"^\+?(\d+)(?:\.\d*)?$")


@dataclass(frozen=True)
class RetryPolicy:
    base_delay: float
    max_delay: float
    attempts: int
    # Injectable for tests: the clock to wait on, and a source of uniform numbers in [0, 1).
    clock: Clock = field(default=SYSTEM_CLOCK, repr=False)
    rand: Callable[[], float] = field(default=_random.random, repr=False)

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts must be at least 1")
        if self.base_delay < 0 or self.max_delay < 0:
            raise ValueError("delays must not be negative")

    @classmethod
    def from_settings(
        cls,
        transfer: TransferSettings,
        *,
        clock: Clock = SYSTEM_CLOCK,
        rand: Callable[[], float] = _random.random,
    ) -> RetryPolicy:
        return cls(
            base_delay=transfer.retry_base_delay,
            max_delay=transfer.retry_max_delay,
            attempts=transfer.request_attempts,
            clock=clock,
            rand=rand,
        )

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number ``attempt`` (0 = the first retry).

        Full jitter: uniform in [0, min(max_delay, base_delay * 2**attempt)], but never less
        than the server's Retry-After, itself clamped to max_delay. Always finite.
        """
        exponent = min(max(attempt, 0), _MAX_EXPONENT)
        ceiling = min(self.max_delay, self.base_delay * (2.0**exponent))
        wait = self.rand() * ceiling
        if retry_after is not None and math.isfinite(retry_after):
            wait = max(wait, min(retry_after, self.max_delay))
        elif retry_after is not None and retry_after > 0:  # +inf: as long as we ever wait
            wait = self.max_delay
        return min(max(wait, 0.0), self.max_delay) if math.isfinite(wait) else self.max_delay

    async def call(self, fn: Callable[[], Awaitable[T]], *, what: str) -> T:
        """Run ``fn`` until it succeeds, fails permanently, or the attempts are spent.

        Raw aiohttp/socket errors that escape ``fn`` are treated as retryable; the last
        RetryableError is re-raised when the attempts run out.
        """
        import aiohttp  # here: the catalog uses this module's backoff, `status` no HTTP

        attempt = 0
        while True:
            try:
                return await fn()
            except RetryableError as exc:
                error: RetryableError = exc
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                mapped = error_for_exception(exc, what)
                if not isinstance(mapped, RetryableError):
                    raise mapped from exc
                error = mapped
            attempt += 1
            if attempt >= self.attempts:
                log.warning("retry.gave_up", what=what, attempts=attempt, error=str(error))
                raise error
            wait = self.delay(attempt - 1, error.retry_after)
            # debug: a request that recovers is no news; one that gives up warns once.
            log.debug(
                "retry.scheduled",
                what=what,
                attempt=attempt,
                of=self.attempts,
                delay=round(wait, 3),
                error=str(error),
            )
            await self.clock.sleep(wait)


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP-date.

    None when absent or meaningless (garbage, ``nan``); otherwise a finite number in
    [0, MAX_RETRY_AFTER]: huge values and ``inf`` become the cap, negative ones 0.
    Never raises.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    match = _DELTA_SECONDS.match(text)
    if match:
        # Compare digit counts, not int(): a 5000-digit header must not hit int limits.
        whole = match.group(1).lstrip("0") or "0"
        if len(whole) > 9:
            return MAX_RETRY_AFTER
        return min(float(match.group(0)), MAX_RETRY_AFTER)
    number = _as_float(text)
    if number is not None:
        return None if math.isnan(number) else min(max(number, 0.0), MAX_RETRY_AFTER)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    current = now if now is not None else datetime.now(UTC)
    try:
        seconds = (when - current).total_seconds()
    except OverflowError:
        return MAX_RETRY_AFTER
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def _as_float(text: str) -> float | None:
    if len(text) > 64:  # no sane number is this long; float() of megabytes is slow
        return None
    try:
        return float(text)
    except ValueError:
        return None


def error_for_status(
    status: int, headers: Mapping[str, str], what: str, body: str = ""
) -> ArchiveError:
    """The error an HTTP status means. 5xx, 429 and 408 are worth another try; other 4xx not.

    NBIA answers "no access to this collection" and "Invalid query parameter" with 400, so
    400 must stay permanent: retrying would only hammer the archive.
    """
    detail = f": {body}" if body else ""
    if status == 429 or status >= 500 or status == 408:
        retry_after = parse_retry_after(headers.get("Retry-After"))
        return RetryableError(f"{what}: HTTP {status}{detail}", retry_after=retry_after)
    return PermanentError(f"{what}: HTTP {status}{detail}")


def error_for_exception(exc: BaseException, what: str) -> RetryableError | UntrustedServerError:
    """Connection errors, resets and timeouts: retryable, with a message that says which;
    a TLS certificate not accepted: UntrustedServerError."""
    if certificate_refusal(exc) is not None:
        untrusted = UntrustedServerError(f"{what}: {network_cause(exc)}")
        untrusted.__cause__ = exc
        return untrusted
    if isinstance(exc, TimeoutError):
        reason = "timed out"
    else:
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    error = RetryableError(f"{what}: {reason}")
    error.__cause__ = exc
    return error
