"""Logging: JSON lines off a terminal, secrets redacted in keys, values and tracebacks."""

from __future__ import annotations

import io
import json
import logging

import pytest
import structlog

from nbia_sync.log import REDACTED, configure_logging, level_from_flags, redact_text

pytestmark = pytest.mark.usefixtures("restore_logging")


@pytest.fixture
def captured() -> io.StringIO:
    stream = io.StringIO()  # not a TTY: "auto" must pick JSON
    configure_logging("debug", "auto", stream=stream)
    return stream


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_auto_format_writes_json_lines_when_not_a_tty(captured: io.StringIO) -> None:
    structlog.get_logger("t").info("series_done", series_uid="1.2.3", files=4)
    [record] = lines(captured)
    assert record["event"] == "series_done"
    assert record["files"] == 4
    assert record["level"] == "info"
    assert "timestamp" in record


def test_secret_named_keys_are_redacted(captured: io.StringIO) -> None:
    structlog.get_logger("t").info(
        "login", access_token="abc123", refresh_token="r-456", password="hunter2", user="bob"
    )
    [record] = lines(captured)
    assert record["access_token"] == REDACTED
    assert record["refresh_token"] == REDACTED
    assert record["password"] == REDACTED
    assert record["user"] == "bob"
    assert "hunter2" not in captured.getvalue()


def test_nested_authorization_header_is_redacted(captured: io.StringIO) -> None:
    structlog.get_logger("t").info("request", headers={"Authorization": "Bearer abc.def"})
    assert "abc.def" not in captured.getvalue()
    assert lines(captured)[0]["headers"] == {"Authorization": REDACTED}


def test_bearer_string_inside_a_value_is_redacted(captured: io.StringIO) -> None:
    structlog.get_logger("t").warning("odd", detail="sent Authorization: Bearer eyJabc.def-ghi")
    assert "eyJabc" not in captured.getvalue()
    assert f"Bearer {REDACTED}" in captured.getvalue()


def test_form_body_and_url_password_are_redacted(captured: io.StringIO) -> None:
    structlog.get_logger("t").info(
        "posted",
        body="username=nbia_guest&password=pw1&client_id=NBIA",
        url="postgresql+asyncpg://nbia:dbpass@db/nbia",
    )
    text = captured.getvalue()
    assert "pw1" not in text and "dbpass" not in text
    assert "username=nbia_guest" in text and "nbia:" in text


def test_event_text_is_redacted_too(captured: io.StringIO) -> None:
    structlog.get_logger("t").info("token refresh_token=zzz999 failed")
    assert "zzz999" not in captured.getvalue()


def test_traceback_is_redacted(captured: io.StringIO) -> None:
    log = structlog.get_logger("t")
    try:
        raise RuntimeError("server echoed access_token=leaky42")
    except RuntimeError:
        log.exception("boom")
    assert "leaky42" not in captured.getvalue()
    assert "RuntimeError" in captured.getvalue()


def test_stdlib_library_logs_go_through_the_same_pipeline(captured: io.StringIO) -> None:
    logging.getLogger("aiohttp.client").warning("retrying with password=pw2")
    [record] = lines(captured)
    assert record["logger"] == "aiohttp.client"
    assert "pw2" not in captured.getvalue()


def test_library_info_logs_are_silenced(captured: io.StringIO) -> None:
    logging.getLogger("sqlalchemy.engine").info("SELECT 1")
    assert captured.getvalue() == ""


def test_level_filters_our_own_events() -> None:
    stream = io.StringIO()
    configure_logging("warning", "json", stream=stream)
    structlog.get_logger("t").info("hidden")
    structlog.get_logger("t").warning("shown")
    assert [r["event"] for r in lines(stream)] == ["shown"]


def test_console_format_is_not_json() -> None:
    stream = io.StringIO()
    configure_logging("info", "console", stream=stream)
    structlog.get_logger("t").info("hello", token="t0p")
    text = stream.getvalue()
    assert "hello" in text and "t0p" not in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_redact_text_leaves_ordinary_text_alone() -> None:
    text = "series 1.2.840.113619 placed: 12 files, token_expires_in=7200"
    assert redact_text(text) == text


@pytest.mark.parametrize(
    ("configured", "verbose", "quiet", "expected"),
    [
        ("info", 0, 0, "info"),
        ("info", 1, 0, "debug"),
        ("info", 0, 1, "warning"),
        ("warning", 5, 0, "debug"),
        ("info", 0, 9, "error"),
    ],
)
def test_verbose_and_quiet_flags_move_the_level(
    configured: str, verbose: int, quiet: int, expected: str
) -> None:
    assert level_from_flags(configured, verbose, quiet) == expected
