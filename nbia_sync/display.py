"""Live progress on a terminal (series, files, bytes, rate, ETA); nothing elsewhere.

Non-terminal runs (cron, containers, CI) rely on the JSON logs instead: a redrawn
progress bar in a log file is noise. While the bar is shown, rich redirects stderr, and
the log handler looks stderr up at each write, so log lines scroll above the bar. The
bar is transient: once the pass ends it is gone, and the command's summary (or its
error) is the last thing on the screen.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, TextIO

from nbia_sync.progress import NullProgress, ProgressSink

if TYPE_CHECKING:  # rich is imported only when there is a terminal to draw on
    from rich.console import Console
    from rich.progress import TaskID


class TerminalProgress:
    """A ProgressSink drawing one rich progress line; use as a context manager."""

    def __init__(self, console: Console) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
        self._task: TaskID = self._progress.add_task("waiting for the queue", total=None)
        self.series_total = 0
        self.series_done = 0
        self.series_failed = 0
        self.files = 0  # of series placed
        self._arriving: dict[str, int] = {}  # files received so far by each attempt in flight
        self.files_total: int | None = None
        self.bytes = 0
        self.bytes_total = 0

    def __enter__(self) -> TerminalProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    @property
    def files_seen(self) -> int:
        """Files of placed series plus those arrived for series still in flight."""
        return self.files + sum(self._arriving.values())

    def _describe(self) -> None:
        seen = self.files_seen
        files = f"{seen}" if self.files_total is None else f"{seen}/{self.files_total}"
        text = f"series {self.series_done}/{self.series_total}  files {files}"
        if self.series_failed:
            text += f"  [red]failed attempts {self.series_failed}[/red]"
        self._progress.update(self._task, description=text)

    def plan(self, series: int, total_bytes: int, files: int) -> None:
        self.series_total = series
        self.bytes_total = total_bytes
        self.files_total = self.files + files
        # Unknown sizes (0) leave the bar indeterminate rather than promising an ETA.
        self._progress.update(self._task, total=total_bytes or None, completed=self.bytes)
        self._describe()

    def series_started(self, series_uid: str, expected_bytes: int | None) -> None:
        pass

    def bytes_received(self, n: int) -> None:
        self.bytes += n
        self._progress.advance(self._task, n)
        if self.bytes_total and self.bytes > self.bytes_total:
            # The archive's sizes leave out the ZIP framing: never show more than 100 %.
            self.bytes_total = self.bytes
            self._progress.update(self._task, total=self.bytes)

    def files_received(self, series_uid: str, n: int) -> None:
        self._arriving[series_uid] = self._arriving.get(series_uid, 0) + n
        self._describe()

    def series_finished(
        self, series_uid: str, *, ok: bool, files: int, error: BaseException | None
    ) -> None:
        self._arriving.pop(series_uid, None)  # placed: counted below; failed: they come again
        if ok:
            self.series_done += 1
            self.files += files
        else:
            self.series_failed += 1
        self._describe()


@contextlib.contextmanager
def terminal_progress(stream: TextIO | None = None) -> Iterator[ProgressSink]:
    """A live display when `stream` (default stderr) is a terminal, else a sink that is
    silent."""
    out = sys.stderr if stream is None else stream
    if not _is_tty(out):
        yield NullProgress()
        return
    from rich.console import Console

    with TerminalProgress(Console(file=out)) as display:
        yield display


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
