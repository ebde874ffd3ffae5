"""Live secret values are redacted literally from log lines and every error message; log
lines stay valid JSON whatever number they carry."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import pytest
import structlog

from nbia_sync.config import settings_from_dict
from nbia_sync.errors import PermanentError, RetryableError
from nbia_sync.log import (
    REDACTED,
    configure_logging,
    forget_secrets,
    redact_text,
    register_secret,
)

TOKEN = "opaque-token-4f9c2b7e1d3a"


@pytest.fixture(autouse=True)
def clean_registry() -> Iterator[None]:
    forget_secrets()
    yield
    forget_secrets()
    structlog.reset_defaults()


def test_a_registered_token_is_redacted_in_any_shape_of_text() -> None:
    register_secret(TOKEN)
    shown = redact_text(f"access denied for token {TOKEN}!")
    assert shown == f"access denied for token {REDACTED}!"


def test_a_truncated_copy_of_a_token_is_redacted_too() -> None:
    register_secret(TOKEN)
    cut = f"Got more than 8190 bytes when reading: b'X-Echo: {TOKEN[:15]}...'"
    assert TOKEN[:12] not in redact_text(cut)


def test_error_messages_are_redacted_when_shown() -> None:
    register_secret(TOKEN)
    error = RetryableError(f"getImage: HTTP 500: access denied for token {TOKEN}")
    assert TOKEN not in str(error) and REDACTED in str(error)
    assert TOKEN not in f"{PermanentError(TOKEN)}"


def test_short_values_are_not_redacted_literally() -> None:
    register_secret("abc")
    assert redact_text("abcdef") == "abcdef"


def test_configured_passwords_are_registered() -> None:
    settings_from_dict(
        {
            "mirror": {"root": "/tmp/m"},
            "sources": [{"name": "s", "username": "u", "password": "hunter2-secret"}],
        },
        env={},
    )
    assert redact_text("login failed: hunter2-secret") == f"login failed: {REDACTED}"


def test_log_lines_redact_live_secrets() -> None:
    out = io.StringIO()
    configure_logging("info", "json", out)
    register_secret(TOKEN)
    structlog.get_logger("t").warning("oops", detail=f"server said {TOKEN}")
    assert TOKEN not in out.getvalue()


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_numbers_are_logged_as_valid_json(value: float) -> None:
    out = io.StringIO()
    configure_logging("info", "json", out)
    structlog.get_logger("t").info("retry.scheduled", delay=value, nested={"d": [value]})

    def refuse(name: str) -> float:
        raise AssertionError(f"{name} is not JSON")

    line = json.loads(out.getvalue().splitlines()[-1], parse_constant=refuse)
    assert line["delay"] == str(value)
