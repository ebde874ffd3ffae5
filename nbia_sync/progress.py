"""What the transfer pool reports as it works.

The pool calls a ProgressSink; the CLI plugs in a terminal display, the daemon plugs in
Prometheus metrics, tests plug in a recorder. Implementations must be cheap and must
not block: they are called on the event loop for every chunk.
"""

from __future__ import annotations

from typing import Protocol


class ProgressSink(Protocol):
    def plan(self, series: int, total_bytes: int, files: int) -> None:
        """The queue this drain starts with: series, their expected bytes and files (read
        together before any worker claims, so they describe the same queue)."""

    def series_started(self, series_uid: str, expected_bytes: int | None) -> None: ...

    def bytes_received(self, n: int) -> None: ...

    def files_received(self, series_uid: str, n: int) -> None:
        """`n` more files of this attempt arrived whole (written and hashed, not yet
        checked against the hash list); an attempt that fails receives them again."""

    def series_finished(
        self, series_uid: str, *, ok: bool, files: int, error: BaseException | None
    ) -> None:
        """ok=False with the error when the attempt failed (it may be retried later).

        The exception itself, not its message: sinks sort failures by its type."""


class NullProgress:
    """Reports nowhere."""

    def plan(self, series: int, total_bytes: int, files: int) -> None:
        pass

    def series_started(self, series_uid: str, expected_bytes: int | None) -> None:
        pass

    def bytes_received(self, n: int) -> None:
        pass

    def files_received(self, series_uid: str, n: int) -> None:
        pass

    def series_finished(
        self, series_uid: str, *, ok: bool, files: int, error: BaseException | None
    ) -> None:
        pass


class FanOut:
    """Reports to several sinks at once (display + metrics)."""

    def __init__(self, *sinks: ProgressSink) -> None:
        self._sinks = sinks

    def plan(self, series: int, total_bytes: int, files: int) -> None:
        for s in self._sinks:
            s.plan(series, total_bytes, files)

    def series_started(self, series_uid: str, expected_bytes: int | None) -> None:
        for s in self._sinks:
            s.series_started(series_uid, expected_bytes)

    def bytes_received(self, n: int) -> None:
        for s in self._sinks:
            s.bytes_received(n)

    def files_received(self, series_uid: str, n: int) -> None:
        for s in self._sinks:
            s.files_received(series_uid, n)

    def series_finished(
        self, series_uid: str, *, ok: bool, files: int, error: BaseException | None
    ) -> None:
        for s in self._sinks:
            s.series_finished(series_uid, ok=ok, files=files, error=error)
