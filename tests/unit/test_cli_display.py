"""The terminal progress display: drawn on a terminal only, counts what the pool reports."""

from __future__ import annotations

import io

from rich.console import Console

from nbia_sync.display import TerminalProgress, terminal_progress
from nbia_sync.progress import NullProgress


def test_nothing_is_drawn_when_the_stream_is_not_a_terminal() -> None:
    stream = io.StringIO()
    with terminal_progress(stream) as sink:
        assert isinstance(sink, NullProgress)
        sink.plan(3, 300, 6)
    assert stream.getvalue() == ""


def test_display_counts_series_files_and_bytes() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120)
    with TerminalProgress(console) as display:
        display.plan(2, 2000, 6)
        display.series_started("a", 1000)
        display.bytes_received(1000)
        display.series_finished("a", ok=True, files=3, error=None)
        display.series_started("b", 1000)
        display.bytes_received(400)
        display.series_finished("b", ok=False, files=0, error="IntegrityError: md5")
    assert (display.series_done, display.series_failed, display.files, display.bytes) == (
        1,
        1,
        3,
        1400,
    )
    text = out.getvalue()
    assert "series 1/2" in text and "files 3" in text and "failed attempts 1" in text


def test_files_count_as_they_arrive_and_a_failed_attempt_gives_them_back() -> None:
    console = Console(file=io.StringIO(), force_terminal=True, width=120)
    with TerminalProgress(console) as display:
        display.plan(2, 2000, 6)
        display.files_received("a", 2)
        display.files_received("b", 1)
        assert display.files_seen == 3  # live, before any series is placed
        display.series_finished("a", ok=True, files=3, error=None)
        assert display.files_seen == 4  # a's three once, b's one still arriving
        display.series_finished("b", ok=False, files=0, error=None)
        assert display.files_seen == 3  # b's attempt failed: its files come again


def test_the_files_total_comes_with_the_plan() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120)
    with TerminalProgress(console) as display:
        display.plan(2, 2000, 6)
        display.files_received("a", 2)
    assert display.files_total == 6
    assert "files 2/6" in out.getvalue()
