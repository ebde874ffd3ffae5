"""The daemon: health rules, metrics, and a real process polled over HTTP then stopped."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from cli_fixtures import REPO, SimMirror, free_port, write_config

from nbia_sync.catalog import Catalog, SeriesState
from nbia_sync.clock import FakeClock
from nbia_sync.daemon import Health, LastPass, make_app
from nbia_sync.errors import HostileArchiveError, IntegrityError
from nbia_sync.metrics import Metrics, MetricsProgress, error_kind
from nbia_sync.outcome import Outcome

pytestmark = pytest.mark.asyncio


def last_pass(outcome: Outcome) -> LastPass:
    return LastPass("r1", outcome, datetime.now(UTC), 1.5, 3, 0, None)


# ---- health rules -------------------------------------------------------------------------


async def test_health_is_starting_before_the_first_pass() -> None:
    status, body = Health(60, 10, FakeClock()).snapshot()
    assert (status, body["status"], body["last_pass"]) == (200, "starting", None)


async def test_health_is_ok_after_a_good_pass() -> None:
    health = Health(60, 10, FakeClock())
    health.pass_started()
    health.pass_finished(last_pass(Outcome.OK))
    status, body = health.snapshot()
    assert (status, body["status"]) == (200, "ok")
    assert body["last_pass"]["outcome"] == "ok" and body["last_success_at"] is not None


async def test_health_is_503_after_a_hard_failure() -> None:
    health = Health(60, 10, FakeClock())
    health.pass_started()
    health.pass_finished(last_pass(Outcome.ERROR))
    status, body = health.snapshot()
    assert (status, body["status"]) == (503, "failing")


async def test_series_failures_alone_keep_health_200() -> None:
    health = Health(60, 10, FakeClock())
    health.pass_finished(last_pass(Outcome.FAILURES))
    assert health.snapshot()[0] == 200


async def test_running_pass_without_heartbeats_is_stuck() -> None:
    clock = FakeClock()
    health = Health(60, 10, clock)
    health.pass_started()
    clock.advance(9)
    health.beat()
    clock.advance(9)
    assert health.snapshot()[0] == 200
    clock.advance(2)
    status, body = health.snapshot()
    assert (status, body["status"]) == (503, "stuck")


async def test_idle_loop_that_misses_its_next_pass_is_stuck() -> None:
    clock = FakeClock()
    health = Health(60, 10, clock)
    health.pass_finished(last_pass(Outcome.OK))
    health.waiting(60)
    clock.advance(69)
    assert health.snapshot()[0] == 200
    clock.advance(2)
    assert health.snapshot()[1]["status"] == "stuck"


# ---- metrics -------------------------------------------------------------------------------


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    value = metrics.registry.get_sample_value(name, labels or None)
    return None if value is None else float(value)


async def test_progress_sink_counts_bytes_files_errors_and_retries() -> None:
    metrics = Metrics()
    sink = MetricsProgress(metrics)
    sink.series_started("a", 100)
    sink.bytes_received(60)
    sink.series_finished("a", ok=False, files=0, error=IntegrityError("md5 mismatch"))
    sink.series_started("a", 100)  # again after a failure: a retry
    sink.bytes_received(100)
    sink.series_finished("a", ok=True, files=4, error=None)
    assert sample(metrics, "nbia_sync_downloaded_bytes_total") == 160
    assert sample(metrics, "nbia_sync_downloaded_files_total") == 4
    assert sample(metrics, "nbia_sync_downloaded_series_total") == 1
    assert sample(metrics, "nbia_sync_errors_total", kind="IntegrityError") == 1
    assert sample(metrics, "nbia_sync_retries_total") == 1
    assert sample(metrics, "nbia_sync_series_in_flight") == 0


async def test_error_kind_is_the_class_of_the_error_not_its_message() -> None:
    assert error_kind(HostileArchiveError("IntegrityError: entry ../x")) == "HostileArchiveError"
    assert error_kind(ConnectionResetError("series 1.2.3: reset by peer")) == (
        "ConnectionResetError"
    )
    assert error_kind(None) == "unknown"


async def test_pass_metrics_record_duration_and_last_success() -> None:
    metrics = Metrics()
    metrics.pass_finished(Outcome.OK, 2.5, now=1234.0)
    metrics.pass_finished(Outcome.ERROR, 1.0, now=2000.0)
    assert sample(metrics, "nbia_sync_last_success_timestamp_seconds") == 1234.0
    assert sample(metrics, "nbia_sync_last_pass_timestamp_seconds") == 2000.0
    assert sample(metrics, "nbia_sync_passes_total", outcome="error") == 1
    assert sample(metrics, "nbia_sync_pass_duration_seconds_count") == 2


async def test_two_metrics_objects_do_not_share_a_registry() -> None:
    a, b = Metrics(), Metrics()
    a.bytes_downloaded.inc(5)
    assert sample(b, "nbia_sync_downloaded_bytes_total") == 0


class CountsOnly:
    def __init__(self, counts: dict[SeriesState, tuple[int, int]] | None) -> None:
        self.counts = counts

    async def state_counts(self) -> dict[SeriesState, tuple[int, int]]:
        if self.counts is None:
            raise RuntimeError("catalog down")
        return self.counts


async def test_http_endpoints_serve_health_and_prometheus_text() -> None:
    health = Health(60, 10, FakeClock())
    counts = {SeriesState.DONE: (7, 7000), SeriesState.FAILED: (1, 10)}
    app = make_app(health, Metrics(), CountsOnly(counts))  # type: ignore[arg-type]
    async with TestClient(TestServer(app)) as client:
        resp = await client.get("/healthz")
        assert resp.status == 200 and (await resp.json())["status"] == "starting"
        resp = await client.get("/metrics")
        assert resp.status == 200 and resp.content_type == "text/plain"
        text = await resp.text()
        assert 'nbia_sync_series{state="done"} 7.0' in text
        assert 'nbia_sync_series_bytes{state="failed"} 10.0' in text


async def test_metrics_are_served_when_the_catalog_is_down() -> None:
    app = make_app(Health(60, 10, FakeClock()), Metrics(), CountsOnly(None))  # type: ignore[arg-type]
    async with TestClient(TestServer(app)) as client:
        resp = await client.get("/metrics")
        assert resp.status == 200
        assert "nbia_sync_downloaded_bytes_total" in await resp.text()


# ---- a real daemon process -------------------------------------------------------------------


class Daemon:
    def __init__(self, proc: asyncio.subprocess.Process, port: int) -> None:
        self.proc = proc
        self.base = f"http://127.0.0.1:{port}"

    async def get(self, path: str) -> tuple[int, str]:
        async with aiohttp.ClientSession() as http, http.get(self.base + path) as resp:
            return resp.status, await resp.text()

    async def wait_health(self, predicate: Any, limit: float = 30.0) -> dict[str, Any]:
        deadline = asyncio.get_running_loop().time() + limit
        last: Any = None
        while asyncio.get_running_loop().time() < deadline:
            try:
                _, text = await self.get("/healthz")
                last = json.loads(text)
                if predicate(last):
                    return dict(last)
            except aiohttp.ClientConnectionError:
                pass  # not listening yet
            assert self.proc.returncode is None, "the daemon exited early"
            await asyncio.sleep(0.1)
        raise AssertionError(f"health never matched; last: {last}")

    async def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), 20)


@asynccontextmanager
async def start_daemon(config: Path) -> AsyncIterator[Daemon]:
    port = int(json.loads(config.with_suffix(".port").read_text()))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "nbia_sync",
        "-c",
        str(config),
        "daemon",
        cwd=REPO,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        yield Daemon(proc, port)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def daemon_config(m: SimMirror, tmp_path: Path, poll: float) -> Path:
    port = free_port()
    config = write_config(
        tmp_path / "daemon.toml",
        m.root,
        m.server.url,
        sections={
            "schedule": {"poll_interval": poll},
            "daemon": {"listen_host": "127.0.0.1", "listen_port": port},
        },
    )
    config.with_suffix(".port").write_text(str(port))
    return config


async def open_catalog(root: Path) -> Catalog:
    return await Catalog.open(f"sqlite+aiosqlite:///{root / '.nbia-sync' / 'catalog.sqlite'}")


async def test_daemon_serves_health_and_metrics_then_stops_on_sigterm(
    sim_mirror: SimMirror, tmp_path: Path
) -> None:
    config = daemon_config(sim_mirror, tmp_path, poll=0.5)
    total = len(sim_mirror.archive.series)
    async with start_daemon(config) as daemon:
        body = await daemon.wait_health(lambda b: b["last_pass"] is not None)
        assert body["status"] == "ok" and body["last_pass"]["done"] == total
        status, text = await daemon.get("/healthz")
        assert status == 200
        # Polls keep coming: a second pass finishes (finding nothing new).
        first = body["last_pass"]["run_id"]
        await daemon.wait_health(lambda b: b["last_pass"]["run_id"] != first)
        status, text = await daemon.get("/metrics")
        assert status == 200
        assert f'nbia_sync_series{{state="done"}} {float(total)}' in text
        assert "nbia_sync_downloaded_bytes_total" in text
        assert "nbia_sync_last_success_timestamp_seconds" in text
        assert 'nbia_sync_passes_total{outcome="ok"}' in text
        assert await daemon.terminate() == 0
    catalog = await open_catalog(sim_mirror.root)
    try:
        assert await catalog.fleet.workers() == []
        assert (await catalog.state_counts())[SeriesState.DOWNLOADING][0] == 0
    finally:
        await catalog.close()


async def test_sigterm_mid_download_exits_0_and_gives_work_back(
    sim_mirror: SimMirror, tmp_path: Path
) -> None:
    sim_mirror.server.faults.bandwidth = 10_000  # ~1 s per series: SIGTERM lands mid-stream
    config = daemon_config(sim_mirror, tmp_path, poll=60)
    async with start_daemon(config) as daemon:
        await daemon.wait_health(lambda b: b["running"])
        counters = sim_mirror.server.counters
        for _ in range(400):  # the simulator's counter: polled, with a deadline
            if counters.streams_current:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("no download started")
        assert await daemon.terminate() == 0
    catalog = await open_catalog(sim_mirror.root)
    try:
        counts = await catalog.state_counts()
        assert counts[SeriesState.DOWNLOADING][0] == 0
        assert counts[SeriesState.WANTED][0] > 0
        assert await catalog.fleet.workers() == []
        run = await catalog.fleet.last_run()
        assert run is not None and run.outcome == "interrupted" and run.finished_at is not None
    finally:
        await catalog.close()
    staging = sim_mirror.root / ".nbia-sync" / "staging"
    assert not [p for p in staging.rglob("*") if p.is_file()]
