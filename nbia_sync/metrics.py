"""Prometheus metrics for the daemon: a private registry and a ProgressSink that feeds it.

A private CollectorRegistry (not prometheus_client's global one) keeps tests and several
daemons in one process from colliding, and keeps the library's process/GC collectors off
unless we ask for them.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import exposition as _exposition
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from nbia_sync.catalog.models import SeriesState
from nbia_sync.outcome import Outcome

CONTENT_TYPE = str(_exposition.CONTENT_TYPE_LATEST)


def error_kind(error: BaseException | None) -> str:
    """The error label: the exception's class name. Few values, since the pool reports
    the project's own errors (errors.py) and, for a bug, the builtin that escaped."""
    return "unknown" if error is None else type(error).__name__


class Metrics:
    """Every metric nbia-sync exports, on its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.series = Gauge(
            "nbia_sync_series", "Series in the catalog by state", ["state"], registry=r
        )
        self.series_bytes = Gauge(
            "nbia_sync_series_bytes",
            "Bytes of the series in the catalog by state (placed bytes, else expected)",
            ["state"],
            registry=r,
        )
        self.bytes_downloaded = Counter(
            "nbia_sync_downloaded_bytes", "Bytes received from the archive", registry=r
        )
        self.files_downloaded = Counter(
            "nbia_sync_downloaded_files", "Files placed in the mirror", registry=r
        )
        self.series_downloaded = Counter(
            "nbia_sync_downloaded_series", "Series placed in the mirror", registry=r
        )
        self.errors = Counter(
            "nbia_sync_errors", "Failed series attempts by error kind", ["kind"], registry=r
        )
        self.retries = Counter(
            "nbia_sync_retries", "Series attempts started after a failed attempt", registry=r
        )
        self.in_flight = Gauge(
            "nbia_sync_series_in_flight", "Series being downloaded now", registry=r
        )
        self.passes = Counter(
            "nbia_sync_passes", "Sync passes finished by outcome", ["outcome"], registry=r
        )
        self.pass_duration = Histogram(
            "nbia_sync_pass_duration_seconds",
            "Wall time of a sync pass",
            buckets=(1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, 24 * 3600),
            registry=r,
        )
        self.last_pass = Gauge(
            "nbia_sync_last_pass_timestamp_seconds", "When the last pass finished", registry=r
        )
        self.last_success = Gauge(
            "nbia_sync_last_success_timestamp_seconds",
            "When the last pass finished with outcome ok",
            registry=r,
        )
        for state in SeriesState:
            self.series.labels(state.value).set(0)
            self.series_bytes.labels(state.value).set(0)
        r.register(_TokenGrants())

    def set_state_counts(self, counts: Mapping[SeriesState, tuple[int, int]]) -> None:
        for state in SeriesState:
            count, nbytes = counts.get(state, (0, 0))
            self.series.labels(state.value).set(count)
            self.series_bytes.labels(state.value).set(nbytes)

    def pass_finished(self, outcome: Outcome, duration: float, *, now: float | None = None) -> None:
        finished = time.time() if now is None else now
        self.passes.labels(outcome).inc()
        self.pass_duration.observe(duration)
        self.last_pass.set(finished)
        if outcome is Outcome.OK:
            self.last_success.set(finished)

    def render(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return bytes(generate_latest(self.registry))


class _TokenGrants(Collector):
    """nbia_sync_token_grants_total{source,grant,outcome}: token requests of this process,
    read from nbia_sync.api.auth at scrape time (a refused refresh shows a client-id or
    session problem that the password fallback would otherwise hide)."""

    def describe(self) -> list[Metric]:
        return [self._family()]

    def collect(self) -> list[Metric]:
        from nbia_sync.api.auth import GRANT_TOTALS

        family = self._family()
        for (source, grant, outcome), count in sorted(GRANT_TOTALS.items()):
            family.add_metric([source, grant, outcome], count)
        return [family]

    @staticmethod
    def _family() -> CounterMetricFamily:
        return CounterMetricFamily(
            "nbia_sync_token_grants",
            "Token grant requests by source, grant type and outcome",
            labels=["source", "grant", "outcome"],
        )


class MetricsProgress:
    """A ProgressSink that counts into Metrics (cheap: called for every chunk)."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics
        # Series whose last attempt failed in this process: starting one again is a retry.
        self._failed: set[str] = set()
        self._running: set[str] = set()

    def plan(self, series: int, total_bytes: int, files: int) -> None:
        pass

    def series_started(self, series_uid: str, expected_bytes: int | None) -> None:
        if series_uid in self._failed:
            self._m.retries.inc()
        self._running.add(series_uid)
        self._m.in_flight.set(len(self._running))

    def bytes_received(self, n: int) -> None:
        self._m.bytes_downloaded.inc(n)

    def files_received(self, series_uid: str, n: int) -> None:
        pass  # files count when their series is placed (nbia_sync_downloaded_files_total)

    def series_finished(
        self, series_uid: str, *, ok: bool, files: int, error: BaseException | None
    ) -> None:
        self._running.discard(series_uid)
        self._m.in_flight.set(len(self._running))
        if ok:
            self._failed.discard(series_uid)
            self._m.series_downloaded.inc()
            self._m.files_downloaded.inc(files)
        else:
            self._failed.add(series_uid)
            self._m.errors.labels(error_kind(error)).inc()
