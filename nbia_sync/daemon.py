"""`nbia-sync daemon`: a pass every poll interval, with /healthz and /metrics over HTTP.

Stopping is cooperative: the caller sets `stop` (SIGTERM/SIGINT); the running pass
cancels its downloads, removes their staging, releases its leases, closes its run row
and logs out; then the HTTP server closes and the loop returns 0.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import anyio
import structlog
from aiohttp import web

from nbia_sync.catalog.repository import Catalog
from nbia_sync.clock import SYSTEM_CLOCK, Clock, sleep_or_stop
from nbia_sync.config import Settings
from nbia_sync.engine import PassReport, run_pass
from nbia_sync.metrics import CONTENT_TYPE, Metrics, MetricsProgress
from nbia_sync.outcome import Outcome

log = structlog.get_logger(__name__)

# A scrape must not hang on a busy catalog: serve what we have after this long.
_SCRAPE_CATALOG_TIMEOUT = 5.0


@dataclass(slots=True)
class LastPass:
    run_id: str | None
    outcome: Outcome
    finished_at: datetime
    duration: float
    done: int
    failed: int
    error: str | None


class Health:
    """What /healthz reports: the last pass, and whether the loop still moves.

    "Stuck" means no sign of life for longer than `grace`: while a pass runs, the signs
    are its worker heartbeats; while idle, the next pass must start on time.
    """

    def __init__(self, poll_interval: float, grace: float, clock: Clock = SYSTEM_CLOCK) -> None:
        self._poll_interval = poll_interval
        self._grace = grace
        self._clock = clock
        self.running = False
        self.pass_started_at: datetime | None = None
        self.last: LastPass | None = None
        self.last_success_at: datetime | None = None
        self._last_sign = clock.monotonic()
        self._next_due: float | None = None

    def pass_started(self) -> None:
        self.running = True
        self.pass_started_at = self._clock.now()
        self._last_sign = self._clock.monotonic()

    def beat(self) -> None:
        self._last_sign = self._clock.monotonic()

    def pass_finished(self, last: LastPass) -> None:
        self.running = False
        self.last = last
        if last.outcome is Outcome.OK:
            self.last_success_at = last.finished_at
        self._last_sign = self._clock.monotonic()

    def waiting(self, seconds: float) -> None:
        self._next_due = self._clock.monotonic() + seconds

    def stuck(self) -> bool:
        now = self._clock.monotonic()
        if self.running:
            return now - self._last_sign > self._grace
        return self._next_due is not None and now > self._next_due + self._grace

    def snapshot(self) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON body)."""
        stuck = self.stuck()
        failed_hard = self.last is not None and self.last.outcome is Outcome.ERROR
        if stuck:
            status = "stuck"
        elif failed_hard:
            status = "failing"
        elif self.last is None:
            status = "starting"
        else:
            status = "ok"
        last = None
        if self.last is not None:
            last = {
                "run_id": self.last.run_id,
                "outcome": self.last.outcome,
                "finished_at": self.last.finished_at.isoformat(),
                "duration_seconds": round(self.last.duration, 3),
                "done": self.last.done,
                "failed": self.last.failed,
                "error": self.last.error,
            }
        body = {
            "status": status,
            "running": self.running,
            "pass_started_at": self.pass_started_at.isoformat() if self.pass_started_at else None,
            "last_pass": last,
            "last_success_at": self.last_success_at.isoformat() if self.last_success_at else None,
        }
        return (503 if stuck or failed_hard else 200), body


def make_app(health: Health, metrics: Metrics, catalog: Catalog) -> web.Application:
    async def healthz(_request: web.Request) -> web.Response:
        status, body = health.snapshot()
        return web.Response(status=status, text=json.dumps(body), content_type="application/json")

    async def metrics_view(_request: web.Request) -> web.Response:
        try:
            with anyio.fail_after(_SCRAPE_CATALOG_TIMEOUT):
                counts = await catalog.state_counts()
            metrics.set_state_counts(counts)
        except Exception as exc:  # stale gauges beat a failed scrape
            log.warning("metrics_catalog_unavailable", error=str(exc))
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_view)
    return app


async def _serve(app: web.Application, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    # With port 0 the OS picks one: log the real address so it can be found.
    ports = [addr[1] for addr in runner.addresses if isinstance(addr, tuple)]
    log.info("daemon_listening", host=host, port=ports[0] if ports else port)
    return runner


async def run_daemon(
    settings: Settings,
    catalog: Catalog,
    *,
    stop: anyio.Event,
    metrics: Metrics | None = None,
) -> int:
    """Sync every `schedule.poll_interval` seconds (start to start) until `stop` is set.

    Time is the catalog's clock (the system clock unless a test gave the catalog another).
    """
    clock = catalog.clock
    metrics = metrics or Metrics()
    interval = settings.schedule.poll_interval
    grace = 3 * settings.transfer.heartbeat_interval + 10.0
    health = Health(interval, grace, clock)
    progress = MetricsProgress(metrics)
    runner = await _serve(
        make_app(health, metrics, catalog), settings.daemon.listen_host, settings.daemon.listen_port
    )
    log.info("daemon_started", poll_interval=interval)
    try:
        while not stop.is_set():
            started = clock.monotonic()
            health.pass_started()
            await _one_pass(settings, catalog, health, metrics, progress, stop)
            with contextlib.suppress(Exception):
                metrics.set_state_counts(await catalog.state_counts())
            wait = max(0.0, interval - (clock.monotonic() - started))
            health.waiting(wait)
            await sleep_or_stop(clock, wait, stop)
    finally:
        await runner.cleanup()
    log.info("daemon_stopped")
    return 0


async def _one_pass(
    settings: Settings,
    catalog: Catalog,
    health: Health,
    metrics: Metrics,
    progress: MetricsProgress,
    stop: anyio.Event,
) -> None:
    t0 = catalog.clock.monotonic()
    report: PassReport | None = None
    error: str | None = None
    try:
        report = await run_pass(
            settings,
            catalog,
            progress=progress,
            stop=stop,
            command="daemon",
            on_heartbeat=health.beat,
        )
    except Exception as exc:  # the daemon outlives a bad pass; /healthz says so
        error = f"{type(exc).__name__}: {exc}"
        log.exception("pass_crashed")
    duration = catalog.clock.monotonic() - t0
    outcome = report.outcome if report else Outcome.ERROR
    metrics.pass_finished(outcome, duration)
    health.pass_finished(
        LastPass(
            run_id=report.run_id if report else None,
            outcome=outcome,
            finished_at=catalog.clock.now(),
            duration=duration,
            done=report.done if report else 0,
            failed=report.failed if report else 0,
            error=report.error if report else error,
        )
    )
