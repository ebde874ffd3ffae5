"""structlog set-up: JSON lines for machines, a readable console for people, no secrets.

Logs go to stderr so that stdout stays clean for command output (`status --json`).
stdlib loggers (aiohttp, sqlalchemy, alembic) are routed through the same processors,
including the redaction, at WARNING.
"""

from __future__ import annotations

import logging
import re
import sys
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


def redact_text(text: str) -> str:
    """Hide anything in free text that looks like a credential."""
    for pattern, replacement in _VALUE_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def _redact(value: Any) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return {
            k: (REDACTED if isinstance(k, str) and _SECRET_KEY.search(k) else _redact(v))
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return type(value)(_redact(v) for v in value)
    return value


def redact_secrets(_logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
    """structlog processor: blank secret-named keys, scrub secret-looking values."""
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
