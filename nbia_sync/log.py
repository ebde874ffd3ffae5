"""structlog set-up: JSON lines for machines, a readable console for people, no secrets.

Logs go to stderr so that stdout stays clean for command output (`status --json`).
stdlib loggers (aiohttp, sqlalchemy, alembic) are routed through the same processors,
including the redaction, at WARNING.

Redaction is nbia_sync.redaction's, shared with every error message (errors.py).
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Mapping
from typing import Any, Literal, TextIO

from nbia_sync.redaction import (
    REDACTED,
    SECRET_KEY,
    forget_secrets,
    redact_text,
    register_secret,
)


def _import_structlog_without_rich() -> None:
    """structlog imports rich when it is installed (~40 ms of every start-up) for its
    rich exception renderers, which these logs never use: format_exc_info renders every
    exception to text before a renderer sees it. Hide rich from that one import only;
    the progress display still imports it on a terminal."""
    if "structlog" in sys.modules or "rich" in sys.modules:
        return
    sys.modules["rich"] = None  # type: ignore[assignment]  # makes `import rich` fail
    try:
        import structlog  # noqa: F401
    finally:
        del sys.modules["rich"]


_import_structlog_without_rich()

import structlog  # noqa: E402
from structlog.typing import EventDict, Processor, WrappedLogger  # noqa: E402

__all__ = ["REDACTED", "configure_logging", "forget_secrets", "redact_text", "register_secret"]

LogFormat = Literal["auto", "json", "console"]
LogLevel = Literal["debug", "info", "warning", "error"]

_QUIET_LIBRARIES = ("aiohttp", "sqlalchemy", "alembic", "asyncio", "aiosqlite", "asyncpg")


def _redact(value: Any) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, float) and not math.isfinite(value):
        # JSON has no Infinity/NaN: a log line must stay parseable whatever was measured.
        return str(value)
    if isinstance(value, Mapping):
        return {
            k: (REDACTED if isinstance(k, str) and SECRET_KEY.search(k) else _redact(v))
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return type(value)(_redact(v) for v in value)
    return value


def redact_secrets(_logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
    """structlog processor: blank secret-named keys, scrub secret-looking values, and turn
    non-finite floats into strings (valid JSON)."""
    for key in list(event_dict):
        if SECRET_KEY.search(key):
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
