"""Series the archive withdraws: found by full listings, kept or deleted, with safety limits."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from cli_fixtures import SimMirror, mirror_files, run_main, run_subprocess, write_config
from served_apps import serving

from nbia_sync.api.client import NbiaClient
from nbia_sync.api.models import SeriesInfo
from nbia_sync.api.retry import RetryPolicy
from nbia_sync.catalog import Catalog, SeriesState
from nbia_sync.config import ScheduleSettings, SourceSettings, TransferSettings
from nbia_sync.discovery import DiscoveryOptions, DiscoveryReport, discover
from nbia_sync.errors import RetryableError
from nbia_sync.metrics import Metrics
from nbia_sync.sim import SimArchive, SimServer

pytestmark = [pytest.mark.asyncio, pytest.mark.usefixtures("restore_logging")]

SCHEDULE = ScheduleSettings(full_listing_days=0)
FULL = DiscoveryOptions(full=True)


def _source(url: str, api: str = "v2") -> SourceSettings:
    return SourceSettings(name="sim", url=url, api=api)  # type: ignore[arg-type]


@pytest_asyncio.fixture
async def client(sim: SimServer) -> AsyncIterator[NbiaClient]:
    async with NbiaClient(
        _source(sim.url), TransferSettings(), policy=RetryPolicy(0.01, 0.05, 2)
    ) as c:
        yield c


async def _pass(
    catalog: Catalog, client: NbiaClient, url: str, options: DiscoveryOptions = FULL
) -> DiscoveryReport:
    source = _source(url)
    sid = await catalog.sources.ensure_source(source)
    return await discover(catalog, client, source, sid, SCHEDULE, options)


async def _states(catalog: Catalog, uids: list[str]) -> dict[str, SeriesState]:
    sid = await catalog.sources.ensure_source(_source("http://unused/"))
    return await catalog.sources.series_states(sid, uids)


def one_of(archive: SimArchive, collection: str = "SIM-CT") -> str:
    return sorted(s.uid for s in archive.in_collection(collection))[0]


async def test_series_no_longer_listed_becomes_withdrawn(
    catalog: Catalog, client: NbiaClient, sim: SimServer, sim_archive: SimArchive
) -> None:
    await _pass(catalog, client, sim.url)
    gone = one_of(sim_archive)
    del sim_archive.series[gone]
    report = await _pass(catalog, client, sim.url)
    assert report.withdrawn == 1
    assert (await _states(catalog, [gone]))[gone] == SeriesState.WITHDRAWN
    assert [w.series_uid for w in await catalog.sources.withdrawn()] == [gone]


async def test_an_increment_withdraws_nothing(
    catalog: Catalog, client: NbiaClient, sim: SimServer, sim_archive: SimArchive
) -> None:
    await _pass(catalog, client, sim.url)
    gone = one_of(sim_archive)
    del sim_archive.series[gone]
    report = await _pass(catalog, client, sim.url, DiscoveryOptions())
    assert not report.full and report.withdrawn == 0
    assert (await _states(catalog, [gone]))[gone] == SeriesState.WANTED


async def test_a_withdrawn_series_that_reappears_is_wanted_again(
    catalog: Catalog, client: NbiaClient, sim: SimServer, sim_archive: SimArchive
) -> None:
    await _pass(catalog, client, sim.url)
    gone = one_of(sim_archive)
    kept = sim_archive.series.pop(gone)
    await _pass(catalog, client, sim.url)
    sim_archive.series[gone] = kept
    await _pass(catalog, client, sim.url)
    assert (await _states(catalog, [gone]))[gone] == SeriesState.WANTED
    assert await catalog.sources.withdrawn() == []


async def test_a_series_moved_to_another_collection_is_not_withdrawn(
    catalog: Catalog, client: NbiaClient, sim: SimServer, sim_archive: SimArchive
) -> None:
    await _pass(catalog, client, sim.url)
    moved = one_of(sim_archive)
    sim_archive.move_series(moved, collection="SIM-MR")
    report = await _pass(catalog, client, sim.url)
    assert report.withdrawn == 0
    assert (await _states(catalog, [moved]))[moved] == SeriesState.WANTED


async def test_withdrawing_more_than_the_share_needs_the_flag(
    catalog: Catalog, client: NbiaClient, sim: SimServer, sim_archive: SimArchive
) -> None:
    await _pass(catalog, client, sim.url)
    ct = sorted(s.uid for s in sim_archive.in_collection("SIM-CT"))
    for uid in ct[:3]:  # 3 of 4: more than the default 50 %
        del sim_archive.series[uid]
    held = await _pass(catalog, client, sim.url)
    assert (held.withdrawn, held.withdrawals_held) == (0, ("SIM-CT",))
    allowed = await _pass(
        catalog, client, sim.url, DiscoveryOptions(full=True, allow_mass_withdrawal=True)
    )
    assert allowed.withdrawn == 3


# ---- an archive answering an empty 200 (the real server's way of being unwell) ----------


class FlakyArchive:
    """Two series in collection C and one in D. `empty`: every listing answers [];
    `failing`: D's listing fails (503) while C's no longer returns 1.2.3.2; `cut`: C's
    next listing breaks off after its first series, and is [] when asked again."""

    def __init__(self) -> None:
        self.empty = False
        self.failing = False
        self.cut = False
        self.cut_sent = False
        self.records = [
            {
                "SeriesInstanceUID": uid,
                "StudyInstanceUID": "1.2.3",
                "Collection": collection,
                "PatientID": "P",
                "Modality": "CT",
                "ImageCount": 1,
                "FileSize": 10,
            }
            for uid, collection in (("1.2.3.1", "C"), ("1.2.3.2", "C"), ("1.2.3.3", "D"))
        ]

    async def handler(self, request: web.Request) -> web.Response:
        endpoint = request.match_info["endpoint"]
        collection = request.query.get("Collection")
        body: Any = []
        if endpoint == "getCollectionValues":
            body = [{"Collection": "C"}, {"Collection": "D"}]
        elif endpoint == "getSeries" and self.cut and collection == "C":
            if not self.cut_sent:
                self.cut_sent = True
                whole = json.dumps([r for r in self.records if r["Collection"] == "C"])
                return web.Response(text=whole[: whole.index("}") + 1])
        elif endpoint == "getSeries" and self.failing and collection == "D":
            return web.Response(status=503, text="try later")
        elif endpoint == "getSeries" and not self.empty:
            body = [r for r in self.records if r["Collection"] == collection]
            if self.failing:
                body = [r for r in body if r["SeriesInstanceUID"] != "1.2.3.2"]
        return web.Response(text=json.dumps(body), content_type="application/json")


@pytest_asyncio.fixture
async def flaky() -> AsyncIterator[tuple[FlakyArchive, str]]:
    archive = FlakyArchive()
    app = web.Application()
    app.router.add_get("/nbia-api/services/v4/{endpoint}", archive.handler)
    async with serving(app) as url:
        yield archive, url


async def test_an_empty_listing_withdraws_nothing(
    catalog: Catalog, flaky: tuple[FlakyArchive, str]
) -> None:
    archive, url = flaky
    source = _source(url, "v4")
    sid = await catalog.sources.ensure_source(source)
    async with NbiaClient(source, TransferSettings()) as client:
        await discover(catalog, client, source, sid, SCHEDULE, FULL)
        archive.empty = True
        report = await discover(catalog, client, source, sid, SCHEDULE, FULL)
    assert (report.withdrawn, report.withdrawals_held) == (0, ("C", "D"))
    assert await catalog.sources.withdrawn() == []


class _OneAtATime:
    """A client handing each listing on one series at a time (stored before the next)."""

    def __init__(self, inner: NbiaClient) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def series_batches(
        self,
        each: Callable[[list[SeriesInfo]], Awaitable[None]],
        collection: str,
        patient_id: str | None = None,
    ) -> int:
        return await self._inner.series_batches(each, collection, patient_id, size=1)


async def test_an_empty_answer_to_a_retried_listing_withdraws_nothing(
    catalog: Catalog, flaky: tuple[FlakyArchive, str]
) -> None:
    # The series the broken-off attempt listed were stored; the answer that counts is [].
    archive, url = flaky
    source = _source(url, "v4")
    sid = await catalog.sources.ensure_source(source)
    async with NbiaClient(source, TransferSettings(), policy=RetryPolicy(0.0, 0.0, 2)) as inner:
        client = _OneAtATime(inner)
        await discover(catalog, client, source, sid, SCHEDULE, FULL)
        archive.cut = True
        report = await discover(catalog, client, source, sid, SCHEDULE, FULL)
    assert archive.cut_sent
    assert (report.withdrawn, report.withdrawals_held) == (0, ("C",))
    assert await catalog.sources.withdrawn() == []


async def test_a_failed_listing_of_one_collection_withdraws_nothing_anywhere(
    catalog: Catalog, flaky: tuple[FlakyArchive, str]
) -> None:
    archive, url = flaky
    source = _source(url, "v4")
    sid = await catalog.sources.ensure_source(source)
    settings = TransferSettings(request_attempts=1)
    async with NbiaClient(source, settings) as client:
        await discover(catalog, client, source, sid, SCHEDULE, FULL)
        archive.failing = True
        with pytest.raises(RetryableError):
            await discover(catalog, client, source, sid, SCHEDULE, FULL)
    assert await catalog.sources.withdrawn() == []


# ---- end to end: sync --full, status, verify, on_withdrawn ------------------------------


async def _status(config: Path) -> dict[str, Any]:
    done = await run_subprocess("-c", str(config), "status", "--json")
    assert done.code == 0, done.stderr
    return dict(json.loads(done.stdout))


async def test_sync_full_flags_withdrawn_series_and_keeps_their_files(
    sim_mirror: SimMirror,
) -> None:
    config, root, archive = sim_mirror.config, sim_mirror.root, sim_mirror.archive
    assert await run_main("-c", str(config), "sync") == 0
    before = mirror_files(root)
    gone = one_of(archive)
    del archive.series[gone]
    assert await run_main("-c", str(config), "sync", "--full") == 0
    status = await _status(config)
    assert status["series"]["withdrawn"]["count"] == 1
    assert [w["series_uid"] for w in status["withdrawn"]] == [gone]
    assert status["withdrawn"][0]["files_deleted"] is False
    assert mirror_files(root) == before
    assert await run_main("-c", str(config), "verify") == 0  # kept files are still checked


async def test_on_withdrawn_delete_removes_the_series_files(
    sim: SimServer, sim_archive: SimArchive, tmp_path: Path
) -> None:
    root = tmp_path / "mirror"
    config = write_config(
        tmp_path / "c.toml", root, sim.url, sections={"mirror": {"on_withdrawn": "delete"}}
    )
    assert await run_main("-c", str(config), "sync") == 0
    gone = sim_archive.series[one_of(sim_archive)]
    del sim_archive.series[gone.uid]
    assert await run_main("-c", str(config), "sync", "--full") == 0
    assert not (root / gone.collection / gone.patient_id / gone.study_uid / gone.uid).exists()
    assert len(mirror_files(root)) == sum(len(s.instances) for s in sim_archive.series.values())
    status = await _status(config)
    assert status["withdrawn"][0]["files_deleted"] is True
    assert await run_main("-c", str(config), "verify") == 0


async def test_metrics_count_withdrawn_series() -> None:
    metrics = Metrics()
    metrics.set_state_counts({SeriesState.WITHDRAWN: (3, 100)})
    assert b'nbia_sync_series{state="withdrawn"} 3.0' in metrics.render()
