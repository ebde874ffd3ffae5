"""run_pass: bookkeeping around discovery and drain, locks, interruption, source failures."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
import pytest_asyncio
from aiohttp import web
from cli_fixtures import FAST_TRANSFER, expected_files, free_port, mirror_files
from served_apps import serving
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncConnection

from nbia_sync.catalog import Catalog, SeriesState
from nbia_sync.catalog.membership import discovery_lock
from nbia_sync.catalog.tables import WORKERS
from nbia_sync.config import Settings, settings_from_dict
from nbia_sync.engine import (
    make_owner,
    run_id_of,
    run_pass,
)
from nbia_sync.outcome import Outcome
from nbia_sync.progress import NullProgress
from nbia_sync.sim import SimArchive, SimServer

pytestmark = pytest.mark.asyncio


def settings_for(root: Path, url: str, **transfer: Any) -> Settings:
    return settings_from_dict(
        {
            "mirror": {"root": str(root), "min_free_bytes": 0},
            "transfer": {**FAST_TRANSFER, **transfer},
            "sources": [{"name": "sim", "url": url}],
        },
        env={},
    )


@pytest_asyncio.fixture
async def catalog(tmp_path: Path) -> AsyncIterator[Catalog]:
    cat = await Catalog.open(f"sqlite+aiosqlite:///{tmp_path / 'catalog.sqlite'}")
    yield cat
    await cat.close()


class StopAfterFirstStart(NullProgress):
    def __init__(self, stop: anyio.Event) -> None:
        self.stop = stop

    def series_started(self, series_uid: str, expected_bytes: int | None) -> None:
        self.stop.set()


async def test_owner_is_host_pid_run_id() -> None:
    owner = make_owner("abc123")
    assert owner == f"{socket.gethostname()}:{os.getpid()}:abc123"
    assert run_id_of(owner) == "abc123"
    assert run_id_of(make_owner()) != run_id_of(make_owner())


async def test_pass_mirrors_the_archive_and_closes_its_books(
    sim: SimServer, sim_archive: SimArchive, catalog: Catalog, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path / "m", sim.url)
    report = await run_pass(settings, catalog, progress=NullProgress(), stop=anyio.Event())
    assert report.outcome == Outcome.OK
    total = len(sim_archive.series)
    assert (report.discovered, report.done, report.failed, report.remaining) == (total, total, 0, 0)
    expected = expected_files(sim_archive, settings.mirror.root)
    assert report.files == len(expected)
    assert mirror_files(settings.mirror.root) == set(expected)
    run = await catalog.fleet.last_run()
    assert run is not None and run.run_id == report.run_id
    assert (run.outcome, run.done, run.discovered) == (Outcome.OK, total, total)
    assert run.finished_at is not None and run.owner == report.owner
    assert await catalog.fleet.workers() == []


async def test_discovery_is_skipped_while_another_process_holds_the_lock(
    sim: SimServer, catalog: Catalog, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path / "m", sim.url)
    assert await catalog.fleet.try_lock(discovery_lock(settings.sources[0]), "other:1:x", 60)
    report = await run_pass(settings, catalog, progress=NullProgress(), stop=anyio.Event())
    assert report.discovery_skipped == ("sim",)
    assert report.discovered == 0 and report.done == 0
    assert sim.counters.requests["getCollectionValues"] == 0
    # The other holder's lock is left alone.
    assert not await catalog.fleet.try_lock(discovery_lock(settings.sources[0]), "third:1:y", 60)


async def test_discovery_lock_is_released_after_the_pass(
    sim: SimServer, catalog: Catalog, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path / "m", sim.url)
    await run_pass(settings, catalog, progress=NullProgress(), stop=anyio.Event())
    assert await catalog.fleet.try_lock(discovery_lock(settings.sources[0]), "next:1:z", 60)


async def test_stop_before_the_pass_downloads_nothing(
    sim: SimServer, catalog: Catalog, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path / "m", sim.url)
    stop = anyio.Event()
    stop.set()
    report = await run_pass(settings, catalog, progress=NullProgress(), stop=stop)
    assert report.outcome == Outcome.INTERRUPTED
    assert sum(sim.counters.downloads_started.values()) == 0
    run = await catalog.fleet.last_run()
    assert run is not None and run.outcome == Outcome.INTERRUPTED


async def test_stop_mid_drain_releases_leases_and_staging(
    sim: SimServer, catalog: Catalog, tmp_path: Path
) -> None:
    sim.faults.bandwidth = 20_000  # slow streams: the stop lands mid-download
    settings = settings_for(tmp_path / "m", sim.url)
    stop = anyio.Event()
    report = await run_pass(settings, catalog, progress=StopAfterFirstStart(stop), stop=stop)
    assert report.outcome == Outcome.INTERRUPTED
    counts = await catalog.state_counts()
    assert counts[SeriesState.DOWNLOADING][0] == 0
    assert counts[SeriesState.WANTED][0] + counts[SeriesState.PENDING][0] > 0
    staging = settings.state_dir / "staging"
    assert not [p for p in staging.rglob("*") if p.is_file()]
    assert await catalog.fleet.workers() == []


async def test_a_body_cut_mid_listing_ends_the_pass_with_an_error_naming_the_source(
    catalog: Catalog, tmp_path: Path
) -> None:
    # A hostile archive: promises 1000 bytes of collection list, sends 10, hangs up.
    # api/ turns aiohttp's payload error into an ArchiveError; the engine catches only those.
    async def cut(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Length": "1000"})
        resp.content_type = "application/json"
        await resp.prepare(request)
        await resp.write(b'[{"Collect')
        assert request.transport is not None
        request.transport.close()
        return resp

    app = web.Application()
    app.router.add_get("/nbia-api/services/v4/getCollectionValues", cut)
    async with serving(app) as url:
        settings = settings_from_dict(
            {
                "mirror": {"root": str(tmp_path / "m"), "min_free_bytes": 0},
                "transfer": {**FAST_TRANSFER, "request_attempts": 2},
                "sources": [{"name": "cut", "url": url, "api": "v4"}],
            },
            env={},
        )
        report = await run_pass(settings, catalog, progress=NullProgress(), stop=anyio.Event())
    assert report.outcome is Outcome.ERROR
    assert report.error is not None and report.error.startswith("source 'cut'")
    assert await catalog.fleet.workers() == []


async def test_unreachable_source_ends_the_pass_with_an_error_naming_it(
    catalog: Catalog, tmp_path: Path
) -> None:
    settings = settings_for(
        tmp_path / "m", f"http://127.0.0.1:{free_port()}/nbia-api/", request_attempts=1
    )
    report = await run_pass(settings, catalog, progress=NullProgress(), stop=anyio.Event())
    assert report.outcome == Outcome.ERROR
    assert report.error is not None and report.error.startswith("source 'sim'")
    run = await catalog.fleet.last_run()
    assert run is not None and run.outcome == Outcome.ERROR
    assert await catalog.fleet.workers() == []
    assert await catalog.fleet.try_lock(discovery_lock(settings.sources[0]), "next:1:z", 60)


async def test_heartbeats_reach_the_callback(
    sim: SimServer, catalog: Catalog, tmp_path: Path
) -> None:
    sim.faults.latency = 0.05
    settings = settings_for(tmp_path / "m", sim.url, heartbeat_interval=0.05)
    beats: list[int] = []
    await run_pass(
        settings,
        catalog,
        progress=NullProgress(),
        stop=anyio.Event(),
        on_heartbeat=lambda: beats.append(1),
    )
    assert beats


async def test_stale_staging_of_dead_owners_is_cleaned(
    sim: SimServer, catalog: Catalog, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path / "m", sim.url)
    dead = settings.state_dir / "staging" / "deadhost_1_old" / "1.2.3"
    dead.mkdir(parents=True)
    (dead / "partial.dcm").write_bytes(b"half")
    await run_pass(settings, catalog, progress=NullProgress(), stop=anyio.Event())
    assert not dead.exists()


async def test_pass_forgets_workers_dead_for_a_day_and_keeps_recently_stale_ones(
    sim: SimServer, catalog: Catalog, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path / "m", sim.url)
    now = datetime.now(UTC)
    for owner, age in (
        ("h:1:killed-long-ago", timedelta(days=2)),
        ("h:2:killed-just-now", timedelta(minutes=10)),
    ):
        await catalog.fleet.register_worker(owner, "h", 1, "run")

        async def op(conn: AsyncConnection, owner: str = owner, age: timedelta = age) -> None:
            await conn.execute(
                update(WORKERS).where(WORKERS.c.owner == owner).values(heartbeat_at=now - age)
            )

        await catalog.database.run_write(op)
    report = await run_pass(settings, catalog, progress=NullProgress(), stop=anyio.Event())
    assert report.outcome == Outcome.OK
    assert [w.owner for w in await catalog.fleet.workers()] == ["h:2:killed-just-now"]
