"""The exception hierarchy: every failure is either worth retrying or not.

The retry policy, the transfer pool and the CLI's exit codes all decide on the class
alone, so a new failure mode only has to pick the right base class.
Messages never contain tokens or passwords: ``str()`` of every error here is redacted
(live secret values and credential-shaped text), whatever a server echoed into it.
"""

from __future__ import annotations

from nbia_sync.redaction import redact_text


class NbiaSyncError(Exception):
    """Base of every error nbia-sync raises on purpose."""

    def __str__(self) -> str:
        # The one place every message passes (CLI error line, last_error, logs).
        return redact_text(super().__str__())


class ConfigError(NbiaSyncError):
    """The configuration is invalid (exit code 2)."""


class MirrorRootError(ConfigError):
    """The mirror root or its state directory cannot be written, or holds no mirror."""


class CatalogError(NbiaSyncError):
    """The catalog cannot be opened or is at an unknown schema revision."""


class ArchiveError(NbiaSyncError):
    """Something went wrong talking to the archive or with what it sent."""

    retryable: bool = False


class RetryableError(ArchiveError):
    """A transient failure: connection error, timeout, 5xx, 429, truncated archive."""

    retryable = True

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        # Seconds the server asked us to wait (429/503 Retry-After), if it said.
        self.retry_after = retry_after


class PermanentError(ArchiveError):
    """A failure that retrying will not fix: 400, no access, malformed request."""


class SourceUnusableError(PermanentError):
    """No request to this source can succeed this pass, whatever the series: the pool
    gives its series back (no attempt counted) and the pass stops with exit 2."""


class AuthError(SourceUnusableError):
    """The archive refused our credentials (bad username/password)."""


class UntrustedServerError(SourceUnusableError):
    """The archive's TLS certificate was not accepted (verify_tls is on): no retry, as
    no wait makes an untrusted certificate trusted."""


class IntegrityError(RetryableError):
    """The archive sent data that failed a check (MD5, file count, missing hash list).

    Retryable: the archive streams series on the fly and a second attempt usually
    succeeds; the attempt counter bounds the damage when it never does.
    """


class HostileArchiveError(PermanentError):
    """A ZIP entry name is absolute, climbs out with '..', or is a link."""


class Interrupted(NbiaSyncError):
    """A series attempt stopped by a signal or a cancelled drain; its claim went back."""


class SeriesTooLargeError(PermanentError):
    """A series listed larger than the free space: that series fails, the pass goes on.

    Permanent for this pass (retrying cannot make room); `retry-failed` after freeing
    space, or a corrected listing (a changed FileSize re-queues it), brings it back.
    """


class DiskSpaceError(NbiaSyncError):
    """Not enough free space for a series; stops the pass rather than the series."""


def sole_error(exc: BaseException) -> BaseException:
    """The one real error inside (nested) exception groups, else ``exc`` itself.

    A task group wraps even a single failure in an ExceptionGroup ("unhandled errors in
    a TaskGroup"); the user must see that failure, not the wrapper.
    """
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
