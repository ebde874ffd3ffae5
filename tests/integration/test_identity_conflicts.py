"""Identity collisions (issue 12, item 6): one SeriesInstanceUID, one place in the mirror.

The rule (README "Bad records and identity conflicts"): a UID listed under two places in
one pass, or by a second source, is held in state `conflict` with the reason; the row
keeps the place it had (first listed or placed wins), nothing is replaced or downloaded
again, `sync` ends with exit 1, and a full listing that sees one place again releases it.
A move (listed under the new place only) is still a move.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import anyio
import pytest
from aiohttp import web
from cli_fixtures import (
    FAST_TRANSFER,
    SimMirror,
    expected_files,
    mirror_files,
    run_main,
    run_subprocess,
)
from served_apps import serving
from sqlalchemy import select

from nbia_sync.api.client import NbiaClient
from nbia_sync.catalog import Catalog, SeriesState
from nbia_sync.catalog.tables import SERIES, SOURCES
from nbia_sync.config import Settings, settings_from_dict
from nbia_sync.discovery import discover
from nbia_sync.engine import run_pass
from nbia_sync.outcome import Outcome
from nbia_sync.progress import NullProgress
from nbia_sync.sim import SimArchive, SimServer
from nbia_sync.sim.queries import series_row
from nbia_sync.sim.testing import running_sim
from nbia_sync.status import collect_status, render_status
from nbia_sync.verify import verify_mirror

pytestmark = pytest.mark.asyncio

ALWAYS_FULL = {"full_listing_days": 1e-9}  # every pass lists everything


def settings_for(root: Path, *urls: str, **schedule: Any) -> Settings:
    return settings_from_dict(
        {
            "mirror": {"root": str(root), "min_free_bytes": 0},
            "transfer": FAST_TRANSFER,
            "schedule": schedule,
            "sources": [{"name": f"s{i}", "url": url, "api": "v2"} for i, url in enumerate(urls)],
        },
        env={},
    )


async def sync(settings: Settings, catalog: Catalog) -> str:
    report = await run_pass(settings, catalog, progress=NullProgress(), stop=anyio.Event())
    return report.outcome


async def row_of(catalog: Catalog, uid: str) -> Any:
    async def op(conn: Any) -> Any:
        return (await conn.execute(select(SERIES).where(SERIES.c.series_uid == uid))).one()

    return await catalog.database.run_read(op)


def ct_series(archive: SimArchive) -> str:
    return sorted(s.uid for s in archive.series.values() if s.collection == "SIM-CT")[0]


def also_in_mr(sim: SimServer, archive: SimArchive, uid: str) -> None:
    """The archive lists `uid` under SIM-MR too (another patient), as well as its own."""
    row = series_row(archive.series[uid], "v2") | {"Collection": "SIM-MR", "PatientID": "MR-X"}
    sim.faults.extra_rows.append(row)


def downloads(sim: SimServer, uid: str) -> int:
    return sim.counters.downloads_started.get(uid, 0)


async def test_uid_listed_in_two_collections_is_held_and_not_downloaded(
    catalog: Catalog, sim: SimServer, sim_archive: SimArchive, tmp_path: Path
) -> None:
    uid = ct_series(sim_archive)
    also_in_mr(sim, sim_archive, uid)
    settings = settings_for(tmp_path / "m", sim.url, **ALWAYS_FULL)
    assert await sync(settings, catalog) == Outcome.FAILURES
    row = await row_of(catalog, uid)
    assert row.state == SeriesState.CONFLICT
    assert "SIM-CT/" in row.conflict and "SIM-MR/MR-X/" in row.conflict
    assert downloads(sim, uid) == 0
    counts = await catalog.state_counts()
    assert counts[SeriesState.DONE][0] == len(sim_archive.series) - 1


async def test_held_conflict_is_never_downloaded_on_later_passes(
    catalog: Catalog, sim: SimServer, sim_archive: SimArchive, tmp_path: Path
) -> None:
    uid = ct_series(sim_archive)
    also_in_mr(sim, sim_archive, uid)
    settings = settings_for(tmp_path / "m", sim.url, **ALWAYS_FULL)
    await sync(settings, catalog)
    generation = (await row_of(catalog, uid)).generation
    before = sum(sim.counters.downloads_started.values())
    for _ in range(2):
        assert await sync(settings, catalog) == Outcome.FAILURES
    assert sum(sim.counters.downloads_started.values()) == before
    row = await row_of(catalog, uid)
    assert (row.state, row.generation) == (SeriesState.CONFLICT, generation)


async def test_placed_series_listed_twice_later_keeps_its_copy(
    catalog: Catalog, sim: SimServer, sim_archive: SimArchive, tmp_path: Path
) -> None:
    root = tmp_path / "m"
    settings = settings_for(root, sim.url, **ALWAYS_FULL)
    assert await sync(settings, catalog) == Outcome.OK
    uid = ct_series(sim_archive)
    also_in_mr(sim, sim_archive, uid)
    assert await sync(settings, catalog) == Outcome.FAILURES
    assert (await row_of(catalog, uid)).state == SeriesState.CONFLICT
    assert downloads(sim, uid) == 1
    # First placed wins: its files stay where they were and still verify.
    assert mirror_files(root) == set(expected_files(sim_archive, root))
    report = await verify_mirror(catalog, root)
    assert report.ok, report.problems


async def test_conflict_is_released_when_a_full_listing_sees_one_place(
    catalog: Catalog, sim: SimServer, sim_archive: SimArchive, tmp_path: Path
) -> None:
    root = tmp_path / "m"
    uid = ct_series(sim_archive)
    also_in_mr(sim, sim_archive, uid)
    settings = settings_for(root, sim.url, **ALWAYS_FULL)
    assert await sync(settings, catalog) == Outcome.FAILURES
    sim.faults.extra_rows.clear()
    assert await sync(settings, catalog) == Outcome.OK
    row = await row_of(catalog, uid)
    assert (row.state, row.conflict, row.collection) == (SeriesState.DONE, None, "SIM-CT")
    assert mirror_files(root) == set(expected_files(sim_archive, root))
    assert downloads(sim, uid) == 1


@pytest.mark.parametrize("schedule", [{}, ALWAYS_FULL], ids=["increment", "full"])
async def test_series_moved_to_another_collection_is_still_moved(
    catalog: Catalog,
    sim: SimServer,
    sim_archive: SimArchive,
    tmp_path: Path,
    schedule: dict[str, Any],
) -> None:
    root = tmp_path / "m"
    settings = settings_for(root, sim.url, **schedule)
    assert await sync(settings, catalog) == Outcome.OK
    uid = ct_series(sim_archive)
    sim_archive.move_series(uid, collection="SIM-MR", released=None)
    sim_archive.series[uid].date_released = sim_archive.series[uid].date_released.replace(
        year=2030
    )  # re-released, so an increment (getUpdatedSeries) reports it
    assert await sync(settings, catalog) == Outcome.OK
    row = await row_of(catalog, uid)
    assert (row.state, row.collection, row.conflict) == (SeriesState.DONE, "SIM-MR", None)
    assert mirror_files(root) == set(expected_files(sim_archive, root))


async def test_second_source_listing_the_same_series_is_held(
    catalog: Catalog, sim: SimServer, sim_archive: SimArchive, tmp_path: Path
) -> None:
    root = tmp_path / "m"
    async with running_sim(sim_archive) as twin:
        settings = settings_for(root, sim.url, twin.url)
        assert await sync(settings, catalog) == Outcome.FAILURES
        assert await sync(settings, catalog) == Outcome.FAILURES
        assert sum(twin.counters.downloads_started.values()) == 0
    counts = await catalog.state_counts()
    total = len(sim_archive.series)
    assert (counts[SeriesState.DONE][0], counts[SeriesState.CONFLICT][0]) == (total, total)
    assert mirror_files(root) == set(expected_files(sim_archive, root))
    row = await row_of_source(catalog, ct_series(sim_archive), "s1")
    assert row.conflict == "also listed by source 's0'"


async def row_of_source(catalog: Catalog, uid: str, source: str) -> Any:
    async def op(conn: Any) -> Any:
        query = (
            select(SERIES)
            .join(SOURCES, SOURCES.c.id == SERIES.c.source_id)
            .where(SERIES.c.series_uid == uid, SOURCES.c.name == source)
        )
        return (await conn.execute(query)).one()

    return await catalog.database.run_read(op)


async def test_status_lists_conflicts_with_their_reason(
    catalog: Catalog, sim: SimServer, sim_archive: SimArchive, tmp_path: Path
) -> None:
    uid = ct_series(sim_archive)
    also_in_mr(sim, sim_archive, uid)
    settings = settings_for(tmp_path / "m", sim.url)
    await sync(settings, catalog)
    status = await collect_status(settings, catalog, failures=10)
    [held] = [f for f in status["failures"] if f["series_uid"] == uid]
    assert held["state"] == "conflict" and "listed under" in held["last_error"]
    assert status["series"]["conflict"]["count"] == 1
    out = io.StringIO()
    render_status(status, out)
    # Which place the row keeps is the first one stored (collections are listed at once).
    assert re.search(rf"conflict +s0/SIM-(CT|MR) {re.escape(uid)} .*listed under", out.getvalue())


@pytest.mark.usefixtures("restore_logging")
async def test_sync_exits_1_while_a_conflict_is_held(sim_mirror: SimMirror) -> None:
    also_in_mr(sim_mirror.server, sim_mirror.archive, ct_series(sim_mirror.archive))
    assert await run_main("-c", str(sim_mirror.config), "sync") == 1
    done = await run_subprocess("-c", str(sim_mirror.config), "sync")
    assert done.code == 1
    assert "1 held as identity conflicts" in done.stdout


# ---- an independent server listing one UID under two patients of two collections ---------


async def test_hostile_listing_of_one_uid_in_two_collections_is_one_conflict(
    catalog: Catalog, tmp_path: Path
) -> None:
    def record(collection: str, patient: str) -> dict[str, Any]:
        return {
            "SeriesInstanceUID": "1.2.840.99.1",
            "StudyInstanceUID": "1.2.840.99",
            "Collection": collection,
            "PatientID": patient,
            "ImageCount": 1,
            "DateReleased": "2024-03-01 00:00:00.0",
        }

    async def handler(request: web.Request) -> web.Response:
        endpoint = request.match_info["endpoint"]
        if endpoint == "getCollectionValues":
            return web.json_response([{"Collection": "A"}, {"Collection": "B"}])
        if endpoint == "getSeries":
            collection = request.query["Collection"]
            return web.json_response([record(collection, f"{collection}-1")])
        return web.Response(body=b"", content_type="application/json")

    app = web.Application()
    app.router.add_get("/nbia-api/services/v4/{endpoint}", handler)
    async with serving(app) as url:
        settings = settings_from_dict(
            {
                "mirror": {"root": str(tmp_path / "m")},
                "schedule": ALWAYS_FULL,
                "sources": [{"name": "h", "url": url, "api": "v4"}],
            },
            env={},
        )
        source = settings.sources[0]
        sid = await catalog.sources.ensure_source(source)
        async with NbiaClient(source, settings.transfer) as client:
            first = await discover(catalog, client, source, sid, settings.schedule)
            held = await row_of(catalog, "1.2.840.99.1")
            again = await discover(catalog, client, source, sid, settings.schedule)
    assert (first.new, first.conflicts) == (1, 1)
    assert (again.queued, again.conflicts) == (0, 0)  # still held: no flip-flop, no requeue
    row = await row_of(catalog, "1.2.840.99.1")
    assert row.state == SeriesState.CONFLICT
    assert (row.generation, row.collection) == (held.generation, held.collection)
    assert "A/A-1/1.2.840.99" in row.conflict and "B/B-1/1.2.840.99" in row.conflict
