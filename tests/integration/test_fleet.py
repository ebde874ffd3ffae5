"""A fleet: several real `nbia-sync sync` processes sharing one catalog and one mirror root.

The simulator runs in this process (its counters are what the archive saw); every engine
is a real `python -m nbia_sync` subprocess, so claims, leases, the discovery lock and the
placement re-check are exercised across processes, and a SIGKILL is a real crash.
Downloads are paced by a per-stream bandwidth cap so each run lasts a few seconds and the
processes genuinely overlap.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from catalog_fixtures import fresh_pg_database
from cli_fixtures import REPO, assert_mirror_is_truth, write_config
from sqlalchemy import select

from nbia_sync.catalog import Catalog, SeriesState
from nbia_sync.catalog.tables import SERIES
from nbia_sync.config import load_settings
from nbia_sync.sim import SimArchive, SimCounters, SimFaults, SimServer
from nbia_sync.sim.queries import DOWNLOADS
from nbia_sync.transfer.pool import TASKS_PER_SLOT

pytestmark = pytest.mark.asyncio

HOST = socket.gethostname()
# 12 series of 4 images x 16 KiB; at 40 kB/s per stream a series takes ~1.6 s.
ARCHIVE: dict[str, Any] = {
    "seed": 9,
    "collections": ("FLEET-CT", "FLEET-MR"),
    "patients": 3,
    "studies": 1,
    "series": 2,
    "images": 4,
    "image_size": 16_384,
}
BANDWIDTH = 40_000
TRANSFER: dict[str, Any] = {"workers": 2, "lease_seconds": 10.0, "heartbeat_interval": 0.5}
# A killed process's leases run out after 3 s; heartbeats every second keep live ones.
SHORT_LEASES: dict[str, Any] = {"workers": 2, "lease_seconds": 3.0, "heartbeat_interval": 1.0}
AUTH = frozenset({"oauth/token", "logout"})
RUN_LIMIT = 60.0
CLI = (sys.executable, "-m", "nbia_sync")


def fleet_archive() -> SimArchive:
    return SimArchive.generate(**ARCHIVE)


def queries(counters: SimCounters) -> Counter[str]:
    """Query requests the archive answered: everything but downloads and log-in/out
    (each process logs in and out once, so those grow with the fleet by design)."""
    return Counter(
        {k: v for k, v in counters.requests.items() if k not in DOWNLOADS and k not in AUTH}
    )


# ----------------------------------------------------------------------------- helpers


@dataclass
class Exited:
    pid: int
    code: int
    stdout: str
    stderr: str


@dataclass
class Fleet:
    """One mirror root + one catalog + one config, and the processes run against them."""

    root: Path
    config: Path
    catalog_url: str
    procs: list[asyncio.subprocess.Process]

    async def start(self, n: int) -> None:
        for _ in range(n):
            self.procs.append(await cli_process(self.config, "sync"))

    async def finish(self, limit: float = RUN_LIMIT) -> list[Exited]:
        async def one(proc: asyncio.subprocess.Process) -> Exited:
            out, err = await proc.communicate()
            assert proc.returncode is not None
            return Exited(
                proc.pid,
                proc.returncode,
                out.decode(errors="replace"),
                err.decode(errors="replace"),
            )

        try:
            return list(await asyncio.wait_for(asyncio.gather(*map(one, self.procs)), limit))
        except TimeoutError:
            for proc in self.procs:
                if proc.returncode is None:
                    proc.kill()
            raise AssertionError(f"the fleet did not finish in {limit} s") from None

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.returncode is None:
                proc.kill()


async def cli_process(config: Path, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *CLI,
        "-c",
        str(config),
        *args,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def run_cli(config: Path, *args: str, limit: float = 30.0) -> Exited:
    proc = await cli_process(config, *args)
    out, err = await asyncio.wait_for(proc.communicate(), limit)
    assert proc.returncode is not None
    return Exited(
        proc.pid, proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")
    )


@asynccontextmanager
async def fleet_on(
    tmp_path: Path, sim: SimServer, pg_url: str | None, transfer: Mapping[str, Any]
) -> AsyncIterator[Fleet]:
    root = tmp_path / "mirror"
    sections = {"catalog": {"url": pg_url}} if pg_url else {}
    config = write_config(
        tmp_path / "fleet.toml", root, sim.url, transfer=transfer, sections=sections
    )
    fleet = Fleet(root, config, load_settings(config).catalog_url, [])
    # Migrate once before the fleet starts, so the test's own catalog reads never race it.
    await (await Catalog.open(fleet.catalog_url)).close()
    try:
        yield fleet
    finally:
        fleet.kill_all()
        for proc in fleet.procs:
            await proc.wait()


def assert_each_series_fetched_once(archive: SimArchive, counters: SimCounters) -> None:
    uids = set(archive.series)
    assert dict(counters.downloads_completed) == dict.fromkeys(uids, 1)
    assert dict(counters.downloads_started) == dict.fromkeys(uids, 1)


async def wait_until(predicate: Any, *, limit: float, what: str, every: float = 0.1) -> Any:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(every)
    raise AssertionError(f"timed out after {limit} s waiting for {what}")


def owner_pid(owner: str) -> int:
    return int(owner.split(":")[-2])


async def leased_to(catalog: Catalog, pid: int) -> set[str]:
    """Series in flight under any lease of process `pid`."""

    async def op(conn: Any) -> set[str]:
        rows = await conn.execute(
            select(SERIES.c.series_uid, SERIES.c.lease_owner).where(
                SERIES.c.state == SeriesState.DOWNLOADING
            )
        )
        return {uid for uid, owner in rows if owner and owner_pid(owner) == pid}

    found: set[str] = await catalog.database.run_read(op)
    return found


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test (skips when PostgreSQL is unreachable)."""
    with fresh_pg_database() as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """None: the default SQLite catalog under the shared root; else a PostgreSQL URL."""
    if request.param == "sqlite":
        yield None
    else:
        with fresh_pg_database() as url:
            yield url


async def _single_process_queries() -> Counter[str]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        async with SimServer(fleet_archive()) as sim:
            config = write_config(
                Path(tmp) / "one.toml", Path(tmp) / "mirror", sim.url, transfer=TRANSFER
            )
            done = await run_cli(config, "sync", limit=RUN_LIMIT)
            assert done.code == 0, done.stderr[-2000:]
            return queries(sim.counters)


@pytest.fixture(scope="module")
def one_process_queries() -> Counter[str]:
    """What discovery asks the archive in a single-process run of the same archive."""
    return asyncio.run(_single_process_queries())


# ----------------------------------------------------------------------------- tests


@pytest.mark.postgres
async def test_three_processes_on_postgresql_fetch_each_series_once(
    tmp_path: Path, pg_url: str, one_process_queries: Counter[str]
) -> None:
    archive = fleet_archive()
    async with (
        SimServer(archive, SimFaults(bandwidth=BANDWIDTH)) as sim,
        fleet_on(tmp_path, sim, pg_url, TRANSFER) as fleet,
    ):
        await fleet.start(3)
        exited = await fleet.finish()
        assert [e.code for e in exited] == [0, 0, 0], [e.stderr[-1500:] for e in exited]
        assert_each_series_fetched_once(archive, sim.counters)
        assert_mirror_is_truth(archive, fleet.root)
        # One discovery for the fleet: the same queries as one process alone.
        assert queries(sim.counters) == one_process_queries
        # The fleet really shared the work: the three streams overlapped.
        assert sim.counters.streams_max > TRANSFER["workers"]


async def test_two_processes_on_sqlite_fetch_each_series_once_without_lock_errors(
    tmp_path: Path, one_process_queries: Counter[str]
) -> None:
    archive = fleet_archive()
    async with (
        SimServer(archive, SimFaults(bandwidth=BANDWIDTH)) as sim,
        fleet_on(tmp_path, sim, None, TRANSFER) as fleet,
    ):
        await fleet.start(2)
        exited = await fleet.finish()
        assert [e.code for e in exited] == [0, 0], [e.stderr[-1500:] for e in exited]
        assert not [e.pid for e in exited if "database is locked" in e.stderr.lower()]
        assert_each_series_fetched_once(archive, sim.counters)
        assert_mirror_is_truth(archive, fleet.root)
        assert queries(sim.counters) == one_process_queries
        assert sim.counters.streams_max > TRANSFER["workers"]


async def test_survivors_finish_the_series_of_a_process_killed_mid_download(
    tmp_path: Path, backend: str | None
) -> None:
    archive = fleet_archive()
    async with (
        SimServer(archive, SimFaults(bandwidth=BANDWIDTH)) as sim,
        fleet_on(tmp_path, sim, backend, SHORT_LEASES) as fleet,
    ):
        catalog = await Catalog.open(fleet.catalog_url)
        try:
            await fleet.start(3)
            victim = fleet.procs[0]
            await wait_until(
                lambda: leased_to(catalog, victim.pid), limit=30, what="the victim to hold a lease"
            )
            victim.send_signal(signal.SIGKILL)
            await victim.wait()
            # Its leases stay in the catalog until they run out; nobody else may own them.
            orphaned = await leased_to(catalog, victim.pid)
            exited = await fleet.finish()
            counts = await catalog.state_counts()
        finally:
            await catalog.close()
        assert exited[0].code == -signal.SIGKILL
        assert [e.code for e in exited[1:]] == [0, 0], [e.stderr[-1500:] for e in exited[1:]]
        assert orphaned, "the kill did not land while the victim held a series"
        assert counts[SeriesState.DONE][0] == len(archive.series)
        # Only what the victim held was ever fetched twice.
        assert {u for u, n in sim.counters.downloads_started.items() if n > 1} <= orphaned
        assert set(sim.counters.downloads_completed) == set(archive.series)
        assert_mirror_is_truth(archive, fleet.root)
        verified = await run_cli(fleet.config, "verify")
        assert verified.code == 0, verified.stdout + verified.stderr


async def status_json(config: Path) -> dict[str, Any]:
    done = await run_cli(config, "status", "--json")
    assert done.code == 0, done.stderr[-1500:]
    document: dict[str, Any] = json.loads(done.stdout)
    return document


async def test_status_shows_live_processes_then_the_killed_one_as_stale(
    tmp_path: Path,
) -> None:
    archive = fleet_archive()
    async with (
        SimServer(archive, SimFaults(bandwidth=BANDWIDTH // 2)) as sim,
        fleet_on(tmp_path, sim, None, SHORT_LEASES) as fleet,
    ):
        await fleet.start(2)
        pids = {p.pid for p in fleet.procs}

        async def both_busy() -> list[dict[str, Any]] | None:
            workers = (await status_json(fleet.config))["workers"]
            busy = [w for w in workers if owner_pid(w["owner"]) in pids and w["in_flight"] > 0]
            return workers if len(busy) == 2 else None

        live = await wait_until(both_busy, limit=30, what="status to show both processes busy")
        for w in live:
            assert w["owner"] == f"{HOST}:{w['pid']}:{w['run_id']}"
            assert w["alive"] is True
            assert w["heartbeat_age"] <= 3 * SHORT_LEASES["heartbeat_interval"]
            # Leased: downloading, waiting for a download slot or for the group commit.
            assert 1 <= w["in_flight"] <= TASKS_PER_SLOT * SHORT_LEASES["workers"]

        victim = fleet.procs[0]
        victim.send_signal(signal.SIGKILL)
        await victim.wait()

        async def victim_stale() -> dict[str, Any] | None:
            workers = {w["pid"]: w for w in (await status_json(fleet.config))["workers"]}
            mine = workers.get(victim.pid)
            return mine if mine is not None and not mine["alive"] else None

        stale = await wait_until(victim_stale, limit=20, what="status to show the victim stale")
        assert stale["heartbeat_age"] >= SHORT_LEASES["lease_seconds"]
        survivor = {w["pid"]: w for w in (await status_json(fleet.config))["workers"]}
        assert survivor[fleet.procs[1].pid]["alive"] is True


async def test_a_pass_waits_for_a_live_peers_discovery_then_drains_without_repeating_it(
    tmp_path: Path,
) -> None:
    # In-process and deterministic: the peer is simulated through the catalog, so the
    # order (peer holds the lock, our pass starts, peer commits, peer unlocks) is fixed.
    import anyio

    from nbia_sync.api.client import NbiaClient
    from nbia_sync.catalog.membership import discovery_lock
    from nbia_sync.discovery import discover
    from nbia_sync.engine import run_pass
    from nbia_sync.progress import NullProgress

    archive = fleet_archive()
    async with SimServer(archive) as sim:
        config = write_config(
            tmp_path / "one.toml", tmp_path / "mirror", sim.url, transfer=TRANSFER
        )
        settings = load_settings(config)
        source = settings.sources[0]
        catalog = await Catalog.open(settings.catalog_url)
        try:
            peer = "peer-host:1:peer-run"
            await catalog.fleet.register_worker(peer, "peer-host", 1, "peer-run")
            assert await catalog.fleet.try_lock(discovery_lock(source), peer, 60)
            ours = asyncio.create_task(
                run_pass(settings, catalog, progress=NullProgress(), stop=anyio.Event())
            )
            await asyncio.sleep(1.0)
            assert not ours.done()  # waiting for the peer, not draining an empty queue
            assert sim.counters.requests["getCollectionValues"] == 0
            source_id = await catalog.sources.ensure_source(source)
            async with NbiaClient(source, settings.transfer) as client:
                await discover(catalog, client, source, source_id, settings.schedule)
            await catalog.fleet.unlock(discovery_lock(source), peer)
            report = await asyncio.wait_for(ours, RUN_LIMIT)
        finally:
            await catalog.close()
    assert report.discovery_skipped == (source.name,)
    assert report.done == len(archive.series)
    assert sim.counters.requests["getCollectionValues"] == 1  # the peer's only
