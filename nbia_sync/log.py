"""structlog set-up: JSON lines for machines, a readable console for people, no secrets.

Logs go to stderr so that stdout stays clean for command output (`status --json`).
stdlib loggers (aiohttp, sqlalchemy, alembic) are routed through the same processors,
including the redaction, at WARNING.

Redaction works two ways: patterns for things that look like credentials ("Bearer X",
password=..., JWTs), and the literal values of the secrets this process holds (the live
tokens and the configured passwords, see `register_secret`), wherever they appear —
echoed in a server's error body, in an aiohttp message, in a traceback. Every error
message of nbia-sync passes through the same `redact_text` (see errors.py).
"""

from __future__ import annotations

import logging
import math
import re
import sys
import threading
from collections.abc import Mapping
from typing import Any, Literal, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

REDACTED = "[REDACTED]"

LogFormat = Literal["auto", "json", "console"]
LogLevel = Literal["debug", "info", "warning", "error"]

# A key names a secret when its last word is one of these (access_token, Authorization,
# db_password...), so that harmless keys such as token_expires_in stay readable.
_SECRET_KEY = re.compile(
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

_QUIET_LIBRARIES = ("aiohttp", "sqlalchemy", "alembic", "asyncio", "aiosqlite", "asyncpg")

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


def _redact(value: Any) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, float) and not math.isfinite(value):
        # JSON has no Infinity/NaN: a log line must stay parseable whatever was measured.
        return str(value)
    if isinstance(value, Mapping):
        return {
            k: (REDACTED if isinstance(k, str) and _SECRET_KEY.search(k) else _redact(v))
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return type(value)(_redact(v) for v in value)
    return value


def redact_secrets(_logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
    """structlog processor: blank secret-named keys, scrub secret-looking values, and turn
    non-finite floats into strings (valid JSON)."""
    for key in list(event_dict):
        if _SECRET_KEY.search(key):
            event_dict[key] = REDACTED
        else:
            event_dict[key] = _redact(event_dict[key])
    return event_dict


class _CurrentStderr:
    """Resolves sys.stderr at each write, so a live display that swaps it still works."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


def _use_json(fmt: LogFormat, stream: TextIO | _CurrentStderr) -> bool:
    if fmt == "auto":
        try:
            return not stream.isatty()
        except (AttributeError, ValueError):
            return True
    return fmt == "json"


def configure_logging(
    level: LogLevel | str = "info",
    fmt: LogFormat | str = "auto",
    stream: TextIO | None = None,
) -> None:
    """Configure structlog and the stdlib root logger; safe to call again (tests, daemon)."""
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    out: TextIO | _CurrentStderr = stream if stream is not None else _CurrentStderr()
    json_lines = _use_json(fmt if fmt in ("auto", "json", "console") else "auto", out)

    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        # Render exceptions to text before redaction so tracebacks are scrubbed too.
        structlog.processors.format_exc_info,
        redact_secrets,
    ]
    renderer: Processor = (
        structlog.processors.JSONRenderer(default=str)
        if json_lines
        else structlog.dev.ConsoleRenderer(colors=_colors_ok(out))
    )

    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        # Loggers are created at import time; without this they would keep an old config.
        cache_logger_on_first_use=False,
    )

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    for name in _QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(max(logging.WARNING, numeric))


def _colors_ok(stream: TextIO | _CurrentStderr) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def level_from_flags(configured: str, verbose: int, quiet: int) -> str:
    """-v lowers the level (more output), -q raises it; flags win over the config."""
    order = ["debug", "info", "warning", "error"]
    index = order.index(configured) if configured in order else 1
    return order[max(0, min(len(order) - 1, index - verbose + quiet))]
