"""Secrets out of every string that leaves the process: the one redaction step.

Two ways: patterns for things that look like credentials ("Bearer X", password=...,
JWTs), and the literal values of the secrets this process holds (the live tokens and the
configured passwords, see `register_secret`), wherever they appear — echoed in a server's
error body, in an aiohttp message, in a traceback. Log lines (log.py) and every error
message of nbia-sync (errors.py) pass through `redact_text`. Kept free of heavy imports:
errors.py, and so the CLI's `--help`, import it.
"""

from __future__ import annotations

import re
import threading

REDACTED = "[REDACTED]"

# A key names a secret when its last word is one of these (access_token, Authorization,
# db_password...), so that harmless keys such as token_expires_in stay readable.
SECRET_KEY = re.compile(
    r"(?:^|[_\-.])(password|passwd|pwd|secret|token|authorization|cookie|api_?key)$",
    re.IGNORECASE,
)

# Secrets embedded in free text: headers, form bodies, JSON bodies, URLs, JWTs.
_VALUE_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9\-._~+/]+=*"), rf"\1 {REDACTED}"),
    (
        re.compile(
            r"(?i)\b(access_token|refresh_token|id_token|password|passwd|client_secret|token)"
            r"=[^&\s\"']+"
        ),
        rf"\1={REDACTED}",
    ),
    (
        re.compile(
            r"(?i)(\"(?:access_token|refresh_token|id_token|password|client_secret)\"\s*:\s*)"
            r"\"[^\"]*\""
        ),
        rf'\1"{REDACTED}"',
    ),
    # scheme://user:password@host -> keep the user, hide the password.
    (re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://[^/\s:@]+):[^@\s/]+@"), rf"\1:{REDACTED}@"),
    (re.compile(r"\beyJ[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+"), REDACTED),
)

# Live secret values, newest last. Bounded: a daemon renews its token every few minutes
# for months; tokens this old are dead anyway (and still caught by the patterns).
_MAX_SECRETS = 256
# Shorter values are not redacted literally: a 3-letter password would blank every
# occurrence of those letters in every line. (A secret this short is no secret.)
MIN_SECRET_CHARS = 4
# A secret cut short (aiohttp shows 100 bytes of a too-long header) is still hidden when
# at least this much of its start is there.
_PREFIX_CHARS = 12
_secrets: dict[str, None] = {}
_secrets_lock = threading.Lock()


def register_secret(value: str | None) -> None:
    """From now on `value` is redacted literally from every log line and error message."""
    if value is None or len(value) < MIN_SECRET_CHARS:
        return
    with _secrets_lock:
        _secrets.pop(value, None)
        _secrets[value] = None
        while len(_secrets) > _MAX_SECRETS:
            del _secrets[next(iter(_secrets))]


def forget_secrets() -> None:
    """Drop every registered value (tests)."""
    with _secrets_lock:
        _secrets.clear()


def _redact_literals(text: str) -> str:
    with _secrets_lock:
        live = sorted(_secrets, key=len, reverse=True)
    for secret in live:
        if secret in text:
            text = text.replace(secret, REDACTED)
        if len(secret) > _PREFIX_CHARS and secret[:_PREFIX_CHARS] in text:
            text = _redact_prefixes(text, secret)
    return text


def _redact_prefixes(text: str, secret: str) -> str:
    """Replace every truncated copy of `secret` (its first _PREFIX_CHARS or more)."""
    head = secret[:_PREFIX_CHARS]
    out: list[str] = []
    start = 0
    while (found := text.find(head, start)) >= 0:
        end = found + _PREFIX_CHARS
        while end < len(text) and end - found < len(secret) and text[end] == secret[end - found]:
            end += 1
        out.append(text[start:found])
        out.append(REDACTED)
        start = end
    out.append(text[start:])
    return "".join(out)


def redact_text(text: str) -> str:
    """Hide the live secrets and anything in free text that looks like a credential."""
    if _secrets:
        text = _redact_literals(text)
    for pattern, replacement in _VALUE_PATTERNS:
        text = pattern.sub(replacement, text)
    return text
