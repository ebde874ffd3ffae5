"""One bad record never blocks the rest (issue 12, item 5).

Each reproduction runs a real pass (discovery + drain) against the simulator, whose
`record_overrides` knob serves one series' listing row malformed, on SQLite and on
PostgreSQL. A hand-written aiohttp server at the end sends the odd listing the way an
independent hostile archive would (raw JSON escapes, not our simulator's rows).
"""

from __future__ import annotations

import io
import json
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest
from aiohttp import web
from cli_fixtures import FAST_TRANSFER
from served_apps import serving
from sqlalchemy import select

from nbia_sync.api.client import NbiaClient
from nbia_sync.catalog import Catalog, SeriesState
from nbia_sync.catalog.tables import SERIES
from nbia_sync.config import Settings, settings_from_dict
from nbia_sync.discovery import discover
from nbia_sync.engine import run_pass
from nbia_sync.outcome import Outcome
from nbia_sync.progress import NullProgress
from nbia_sync.sim import SimArchive, SimServer
from nbia_sync.status import collect_status, render_status
from nbia_sync.storage import Mirror

pytestmark = pytest.mark.asyncio


def settings_for(root: Path, url: str, api: str = "v2", **mirror: Any) -> Settings:
    return settings_from_dict(
        {
            "mirror": {"root": str(root), "min_free_bytes": 0, **mirror},
            "transfer": FAST_TRANSFER,
            "sources": [{"name": "sim", "url": url, "api": api}],
        },
        env={},
    )


async def sync(settings: Settings, catalog: Catalog) -> str:
    report = await run_pass(settings, catalog, progress=NullProgress(), stop=anyio.Event())
    return report.outcome


async def rows(catalog: Catalog) -> dict[str, Any]:
    async def op(conn: Any) -> dict[str, Any]:
        return {r.series_uid: r for r in await conn.execute(select(SERIES))}

    return await catalog.database.run_read(op)


def victim_of(archive: SimArchive) -> str:
    return sorted(archive.series)[0]


# Records the catalog cannot store: left out, counted, warned about.
SKIPPED = {
    "lone surrogate in PatientID": {"PatientID": "P\ud800X"},
    "FileSize 10^20": {"FileSize": 10**20},
    "NUL in PatientID": {"PatientID": "P\x00X"},
    "no PatientID": {"PatientID": None},
    "no SeriesInstanceUID": {"SeriesInstanceUID": None},
    "negative ImageCount": {"ImageCount": -3},
    "StudyInstanceUID of 300 digits": {"StudyInstanceUID": "1" * 300},
}


@pytest.mark.parametrize("override", list(SKIPPED.values()), ids=list(SKIPPED))
async def test_bad_record_is_skipped_and_the_rest_mirrored(
    catalog: Catalog, sim: SimServer, sim_archive: SimArchive, tmp_path: Path, override: Any
) -> None:
    victim = victim_of(sim_archive)
    sim.faults.record_overrides[victim] = override
    settings = settings_for(tmp_path / "mirror", sim.url)
    assert await sync(settings, catalog) == Outcome.OK
    run = await catalog.fleet.last_run()
    assert run is not None and (run.skipped, run.done) == (1, len(sim_archive.series) - 1)
    stored = await rows(catalog)
    assert victim not in stored
    assert len(stored) == len(sim_archive.series) - 1
    # A later (incremental) pass is unaffected: it runs and fetches nothing again.
    before = sum(sim.counters.downloads_started.values())
    assert await sync(settings, catalog) == Outcome.OK
    assert sum(sim.counters.downloads_started.values()) == before


async def test_skipped_records_are_shown_by_status(
    catalog: Catalog, sim: SimServer, sim_archive: SimArchive, tmp_path: Path
) -> None:
    sim.faults.record_overrides[victim_of(sim_archive)] = {"FileSize": 10**20}
    settings = settings_for(tmp_path / "mirror", sim.url)
    await sync(settings, catalog)
    status = await collect_status(settings, catalog, failures=5)
    assert status["last_run"]["skipped"] == 1
    json.dumps(status)  # the --json document stays valid JSON
    out = io.StringIO()
    render_status(status, out)
    assert "1 bad records skipped" in out.getvalue()


async def test_nul_in_descriptive_text_is_dropped_and_the_series_kept(
    catalog: Catalog, sim: SimServer, sim_archive: SimArchive, tmp_path: Path
) -> None:
    victim = victim_of(sim_archive)
    sim.faults.record_overrides[victim] = {
        "SeriesDescription": "AX\x00T1",
        "Manufacturer": "ACME\ud800",
    }
    settings = settings_for(tmp_path / "mirror", sim.url)
    assert await sync(settings, catalog) == Outcome.OK
    row = (await rows(catalog))[victim]
    assert (row.state, row.description) == (SeriesState.DONE, "AXT1")
    assert "\\u0000" not in row.remote_json and "\\ud800" not in row.remote_json


async def test_year_one_release_date_is_ignored_and_later_passes_run(
    catalog: Catalog, sim: SimServer, sim_archive: SimArchive, tmp_path: Path
) -> None:
    """Every row dated 0001-01-01: the watermark must not become year 1 (its overlap
    arithmetic overflowed on every later pass)."""
    for uid in sim_archive.series:
        sim.faults.record_overrides[uid] = {"DateReleased": "0001-01-01 00:00:00.0"}
    settings = settings_for(tmp_path / "mirror", sim.url)
    assert await sync(settings, catalog) == Outcome.OK
    assert await sync(settings, catalog) == Outcome.OK
    assert await sync(settings, catalog) == Outcome.OK
    watermark = await catalog.sources.get_watermark(
        await catalog.sources.ensure_source(settings.sources[0])
    )
    assert watermark is None or watermark.year >= 1970


async def test_year_one_watermark_left_by_an_older_version_means_a_full_listing(
    catalog: Catalog, sim: SimServer, sim_archive: SimArchive, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path / "mirror", sim.url)
    assert await sync(settings, catalog) == Outcome.OK
    sid = await catalog.sources.ensure_source(settings.sources[0])
    await catalog.sources.set_watermark(sid, datetime(1, 1, 1, tzinfo=UTC), full_listing=True)
    assert await sync(settings, catalog) == Outcome.OK
    watermark = await catalog.sources.get_watermark(sid)
    assert watermark is not None and watermark.year >= 1970


async def test_series_listed_larger_than_the_disk_fails_alone(
    catalog: Catalog, sim: SimServer, sim_archive: SimArchive, tmp_path: Path
) -> None:
    victim = victim_of(sim_archive)
    sim.faults.record_overrides[victim] = {"FileSize": 10**15}
    settings = settings_for(tmp_path / "mirror", sim.url)
    assert await sync(settings, catalog) == Outcome.FAILURES
    stored = await rows(catalog)
    assert stored[victim].state == SeriesState.FAILED
    assert "1000000000000000 bytes" in stored[victim].last_error
    assert "retry-failed" in stored[victim].last_error
    others = [r for uid, r in stored.items() if uid != victim]
    assert {r.state for r in others} == {SeriesState.DONE}
    # The next pass is not stopped either, and does not fetch it again.
    before = sim.counters.downloads_started.get(victim, 0)
    assert await sync(settings, catalog) == Outcome.FAILURES
    assert sim.counters.downloads_started.get(victim, 0) == before


async def test_run_row_counts_what_was_placed_before_the_disk_filled(
    catalog: Catalog,
    sim: SimServer,
    sim_archive: SimArchive,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The disk fills after four series (statvfs reports 0 free from then on): the pass
    stops with DiskSpaceError, and its run row still says four were placed."""
    real = Mirror.free_bytes
    calls = 0

    async def filling(self: Mirror) -> int:
        nonlocal calls
        calls += 1
        return await real(self) if calls <= 4 else 0

    monkeypatch.setattr(Mirror, "free_bytes", filling)
    settings = settings_for(tmp_path / "mirror", sim.url, min_free_bytes=1)
    settings = replace(settings, transfer=replace(settings.transfer, workers=1))
    assert await sync(settings, catalog) == Outcome.ERROR
    run = await catalog.fleet.last_run()
    assert run is not None and run.outcome == Outcome.ERROR
    assert run.done == 4 and run.bytes > 0
    counts = await catalog.state_counts()
    assert counts[SeriesState.DONE][0] == 4


# ---- an independent hostile server ------------------------------------------------------

GOOD = {
    "SeriesInstanceUID": "1.2.3.9",
    "StudyInstanceUID": "1.2.3",
    "Collection": "X",
    "PatientID": "P1",
    "ImageCount": 1,
    "FileSize": 10,
    "DateReleased": "2024-01-02 00:00:00.0",
}


def _odd_listing() -> bytes:
    """Written by hand: JSON escapes no well-behaved encoder of ours would choose."""
    bad = [
        '{"SeriesInstanceUID": "1.2.3.1", "StudyInstanceUID": "1.2.3", "Collection": "X",'
        ' "PatientID": "P\\ud800"}',
        '{"SeriesInstanceUID": "1.2.3.2", "StudyInstanceUID": "1.2.3", "Collection": "X",'
        ' "PatientID": "P\\u0000", "FileSize": 1}',
        '{"SeriesInstanceUID": "1.2.3.3", "StudyInstanceUID": "1.2.3", "Collection": "X",'
        ' "PatientID": "P3", "FileSize": 100000000000000000000}',
        '{"SeriesInstanceUID": "1.2.3.4", "StudyInstanceUID": "1.2.3", "Collection": "X"}',
        '{"SeriesInstanceUID": "1.2.3.5", "StudyInstanceUID": "1.2.3", "Collection": "X",'
        ' "PatientID": "P5", "ImageCount": 1e400, "DateReleased": "0001-01-01"}',
        '{"SeriesInstanceUID": {"nested": [1]}, "PatientID": true, "FileSize": "-5"}',
    ]
    return ("[" + ", ".join([*bad, json.dumps(GOOD)]) + "]").encode()


async def test_hostile_listing_stores_only_what_the_catalog_can_hold(
    catalog: Catalog, tmp_path: Path
) -> None:
    async def handler(request: web.Request) -> web.Response:
        endpoint = request.match_info["endpoint"]
        if endpoint == "getCollectionValues":
            return web.json_response([{"Collection": "X"}])
        if endpoint == "getSeries":
            return web.Response(body=_odd_listing(), content_type="application/json")
        return web.Response(body=b"", content_type="application/json")

    app = web.Application()
    app.router.add_get("/nbia-api/services/v4/{endpoint}", handler)
    async with serving(app) as url:
        settings = settings_for(tmp_path / "m", url, api="v4")
        source = settings.sources[0]
        sid = await catalog.sources.ensure_source(source)
        async with NbiaClient(source, settings.transfer) as client:
            report = await discover(catalog, client, source, sid, settings.schedule)
    stored = await rows(catalog)
    # 1.2.3.5 is kept: an ImageCount of 1e400 is no number (unknown), year 1 is no date.
    assert sorted(stored) == ["1.2.3.5", "1.2.3.9"]
    assert stored["1.2.3.5"].date_released is None and stored["1.2.3.5"].image_count is None
    assert (report.new, report.skipped) == (2, 5)
    watermark = await catalog.sources.get_watermark(sid)
    assert watermark == datetime(2024, 1, 2, tzinfo=UTC)


async def test_bad_patient_and_study_records_of_an_increment_are_skipped(
    catalog: Catalog, tmp_path: Path
) -> None:
    """NewPatientsInCollection / NewStudiesInPatientCollection rows without a usable
    PatientID used to end the whole increment (exit 2): now they are left out, counted."""
    fresh = dict(GOOD, SeriesInstanceUID="1.2.3.10", PatientID="P2", StudyInstanceUID="1.2.4")

    async def handler(request: web.Request) -> web.Response:
        endpoint, query = request.match_info["endpoint"], request.query
        body: list[Any] = []
        if endpoint == "getCollectionValues":
            body = [{"Collection": "X"}]
        elif endpoint == "getSeries":
            body = [fresh] if query.get("PatientID") == "P2" else [GOOD]
        elif endpoint == "NewPatientsInCollection":
            body = [{"Collection": "X"}, {"PatientId": "P\x00"}, {"PatientId": "P2"}]
        elif endpoint == "NewStudiesInPatientCollection":
            body = [{"StudyInstanceUID": "1.2.5", "Collection": "X"}]
        return web.json_response(body)

    app = web.Application()
    app.router.add_get("/nbia-api/services/v4/{endpoint}", handler)
    async with serving(app) as url:
        settings = settings_for(tmp_path / "m", url, api="v4")
        source = settings.sources[0]
        sid = await catalog.sources.ensure_source(source)
        async with NbiaClient(source, settings.transfer) as client:
            first = await discover(catalog, client, source, sid, settings.schedule)
            increment = await discover(catalog, client, source, sid, settings.schedule)
    assert first.full and not increment.full
    assert (increment.new, increment.skipped) == (1, 3)
    assert sorted(await rows(catalog)) == ["1.2.3.10", "1.2.3.9"]
