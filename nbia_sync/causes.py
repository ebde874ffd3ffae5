"""Plain words for why a source could not be reached, for the one error line a user reads.

The exceptions the client raises carry the request and the library's own text
("ClientConnectorError: Cannot connect to host h:443 ssl:default [...]"); the last line of
a failed command should say only what went wrong at the network level.
"""

from __future__ import annotations

import errno
import socket
import ssl

_ERRNO_WORDS = {
    errno.ECONNREFUSED: "connection refused",
    errno.ECONNRESET: "connection reset",
    errno.EHOSTUNREACH: "host unreachable",
    errno.ENETUNREACH: "network unreachable",
    errno.ETIMEDOUT: "timed out",
}


def exception_chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and what caused it, outermost first (each exception once)."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def certificate_refusal(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The TLS certificate check behind a failure, if that is what it was: the innermost
    one, ssl's own (aiohttp's wrapper is a subclass too, without ssl's details)."""
    found = [c for c in exception_chain(exc) if isinstance(c, ssl.SSLCertVerificationError)]
    return found[-1] if found else None


def network_cause(exc: BaseException) -> str | None:
    """'cannot connect (connection refused)' and the like, or None when the failure was
    not a network one (an HTTP answer, refused credentials: their messages say it)."""
    import aiohttp  # only when a source failed: the CLI imports it lazily

    refusal = certificate_refusal(exc)
    if refusal is not None:
        why = getattr(refusal, "verify_message", None)  # OpenSSL's: expired, self-signed...
        return "TLS certificate not accepted" + (f" ({why})" if why else "")
    for cause in exception_chain(exc):
        if isinstance(cause, aiohttp.ClientConnectorDNSError | socket.gaierror):
            return "cannot resolve the host name"
        if isinstance(cause, aiohttp.ClientConnectorError):
            return f"cannot connect ({_words(cause.os_error)})"
        if isinstance(cause, aiohttp.ServerDisconnectedError):
            return "the server closed the connection"
        if isinstance(cause, TimeoutError):
            return "no answer (timed out)"
        if isinstance(cause, ssl.SSLError):
            return "TLS handshake failed"
        if isinstance(cause, OSError) and cause.errno in _ERRNO_WORDS:
            return f"cannot connect ({_ERRNO_WORDS[cause.errno]})"
    return None


def _words(error: OSError) -> str:
    if error.errno in _ERRNO_WORDS:
        return _ERRNO_WORDS[error.errno]
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    return (error.strerror or type(error).__name__).lower()


def without_source(detail: str, name: str) -> str:
    """The detail of a source failure without its own mention of the source (the line
    that reports it names the source already): "source 'x': ..." / "... for source 'x'"."""
    for said in (f" for source {name!r}", f"source {name!r}: "):
        detail = detail.replace(said, "")
    return detail
