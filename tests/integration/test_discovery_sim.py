"""Discovery against the NBIA simulator: full listing, increments, filters, manifests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any

import anyio
import pytest
import pytest_asyncio
from aiohttp import web
from served_apps import serving

from nbia_sync.api.client import NbiaClient
from nbia_sync.api.models import SeriesInfo
from nbia_sync.api.retry import RetryPolicy
from nbia_sync.catalog import Catalog, InstanceRecord, SeriesState
from nbia_sync.config import ScheduleSettings, SourceSettings, TransferSettings
from nbia_sync.discovery import DiscoveryReport, add_manifest, discover
from nbia_sync.errors import RetryableError
from nbia_sync.sim import SimArchive, SimServer

pytestmark = pytest.mark.asyncio

SCHEDULE = ScheduleSettings(overlap_days=2, full_listing_days=0)


def _source(sim: SimServer, **kw: Any) -> SourceSettings:
    return SourceSettings(name="sim", url=sim.url, api="v2", **kw)


@pytest_asyncio.fixture
async def client(sim: SimServer) -> AsyncIterator[NbiaClient]:
    policy = RetryPolicy(0.01, 0.05, 3)
    async with NbiaClient(_source(sim), TransferSettings(), policy=policy) as c:
        yield c


async def _pass(
    catalog: Catalog,
    client: NbiaClient,
    source: SourceSettings,
    schedule: ScheduleSettings = SCHEDULE,
) -> DiscoveryReport:
    sid = await catalog.sources.ensure_source(source)
    return await discover(catalog, client, source, sid, schedule)


async def _drain(catalog: Catalog) -> list[str]:
    """Claim and complete everything queued; the series UIDs in the queue."""
    uids = []
    for claim in await catalog.queue.claim("t", limit=10_000, lease_seconds=60):
        async with catalog.queue.placing(claim, "t") as guard:
            guard.done([InstanceRecord("1", "0" * 32, 1, "p")], "p", 1)
        uids.append(claim.series_uid)
    return sorted(uids)


async def test_first_pass_lists_every_series(
    catalog: Catalog, client: NbiaClient, sim: SimServer, sim_archive: SimArchive
) -> None:
    report = await _pass(catalog, client, _source(sim))
    assert report == DiscoveryReport(new=len(sim_archive.series), full=True)
    assert await _drain(catalog) == sorted(sim_archive.series)
    sid = await catalog.sources.ensure_source(_source(sim))
    newest = max(s.date_released for s in sim_archive.series.values()).replace(tzinfo=UTC)
    assert await catalog.sources.get_watermark(sid) == newest


async def test_pass_without_change_queues_nothing(
    catalog: Catalog, client: NbiaClient, sim: SimServer
) -> None:
    await _pass(catalog, client, _source(sim))
    await _drain(catalog)
    report = await _pass(catalog, client, _source(sim))
    assert (report.full, report.queued) == (False, 0)
    assert await _drain(catalog) == []


async def test_increment_queues_exactly_new_patient_and_updated_series(
    catalog: Catalog, client: NbiaClient, sim: SimServer, sim_archive: SimArchive
) -> None:
    await _pass(catalog, client, _source(sim))
    await _drain(catalog)
    added = sim_archive.add_patient("SIM-CT", series=2)
    updated = sim_archive.update_series(sorted(sim_archive.series)[0])
    report = await _pass(catalog, client, _source(sim))
    assert (report.full, report.new, report.changed) == (False, 2, 1)
    assert await _drain(catalog) == sorted([s.uid for s in added] + [updated.uid])


class _ReReleasedTwiceAtOnce:
    """An archive of one series that, after the first pass, re-releases it: the series
    is in getUpdatedSeries and, through its study in NewStudiesInPatientCollection, in
    that study's getSeries. getUpdatedSeries answers only when getSeries is asked too
    (or after 2 s), so that both answers are stored at once."""

    UID, STUDY = "1.2.840.77.1", "1.2.840.77"

    def __init__(self) -> None:
        self.released = "2024-03-01 00:00:00.0"
        self._study_listed = anyio.Event()

    def series(self) -> list[dict[str, Any]]:
        return [
            {
                "SeriesInstanceUID": self.UID,
                "StudyInstanceUID": self.STUDY,
                "Collection": "A",
                "PatientID": "A-1",
                "ImageCount": 1,
                "DateReleased": self.released,
            }
        ]

    async def handler(self, request: web.Request) -> web.Response:
        endpoint = request.match_info["endpoint"]
        if endpoint == "getCollectionValues":
            return web.json_response([{"Collection": "A"}])
        if endpoint == "getUpdatedSeries":
            with anyio.move_on_after(2):
                await self._study_listed.wait()
            return web.json_response(self.series())
        if endpoint == "NewStudiesInPatientCollection":
            study = {"StudyInstanceUID": self.STUDY, "Collection": "A", "PatientID": "A-1"}
            return web.json_response([study])
        if endpoint == "getSeries":
            if "StudyInstanceUID" in request.query:
                self._study_listed.set()
            return web.json_response(self.series())
        return web.json_response([])  # NewPatientsInCollection: none

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/nbia-api/services/v4/{endpoint}", self.handler)
        return app


async def test_series_two_queries_list_at_once_is_changed_and_requeued_once(
    catalog: Catalog,
) -> None:
    archive = _ReReleasedTwiceAtOnce()
    async with serving(archive.app()) as url:
        source = SourceSettings(name="h", url=url, api="v4")
        async with NbiaClient(source, TransferSettings()) as client:
            first = await _pass(catalog, client, source)
            await _drain(catalog)
            archive.released = "2024-06-01 00:00:00.0"
            report = await _pass(catalog, client, source)
    assert (first.full, first.new) == (True, 1)
    assert (report.full, report.new, report.changed) == (False, 0, 1)
    [claim] = await catalog.queue.claim("t", limit=10, lease_seconds=60)
    assert (claim.series_uid, claim.generation) == (archive.UID, 2)


class _ListAfterTheIncrements:
    """A client whose list of collections answers only once getUpdatedSeries and a known
    collection's NewPatientsInCollection have been asked: a discovery that waits for the
    list before asking them never gets it."""

    def __init__(self, inner: NbiaClient) -> None:
        self._inner = inner
        self.asked: set[str] = set()
        self._both_asked = anyio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def _ask(self, what: str) -> None:
        self.asked.add(what)
        if {"updated", "new_patients"} <= self.asked:
            self._both_asked.set()

    async def collections(self) -> list[str]:
        with anyio.fail_after(10):
            await self._both_asked.wait()
        return await self._inner.collections()

    async def updated_series(self, since: date) -> list[SeriesInfo]:
        self._ask("updated")
        return await self._inner.updated_series(since)

    async def new_patients(self, collection: str, since: date) -> Any:
        self._ask("new_patients")
        return await self._inner.new_patients(collection, since)


async def test_increments_are_asked_in_the_same_round_as_the_collection_list(
    catalog: Catalog, client: NbiaClient, sim: SimServer, sim_archive: SimArchive
) -> None:
    await _pass(catalog, client, _source(sim))
    await _drain(catalog)
    added = sim_archive.add_patient("SIM-CT", series=2)
    source = _source(sim)
    sid = await catalog.sources.ensure_source(source)
    slow_list = _ListAfterTheIncrements(client)
    report = await discover(catalog, slow_list, source, sid, SCHEDULE)  # type: ignore[arg-type]
    assert (report.full, report.new) == (False, 2)
    assert await _drain(catalog) == sorted(s.uid for s in added)


class _ListFailsAfterTheIncrements(_ListAfterTheIncrements):
    """The archive's list of collections fails once the increments have been asked (an
    outage mid-round)."""

    async def collections(self) -> list[str]:
        with anyio.fail_after(10):
            await self._both_asked.wait()
        raise RetryableError("getCollectionValues: HTTP 503")


async def test_a_collection_list_failing_mid_round_moves_no_watermark(
    catalog: Catalog, client: NbiaClient, sim: SimServer, sim_archive: SimArchive
) -> None:
    await _pass(catalog, client, _source(sim))
    await _drain(catalog)
    sim_archive.add_patient("SIM-CT", series=1)
    source = _source(sim)
    sid = await catalog.sources.ensure_source(source)
    before = await catalog.sources.get_watermark(sid)
    failing = _ListFailsAfterTheIncrements(client)
    with pytest.raises(RetryableError, match="503"):
        await discover(catalog, failing, source, sid, SCHEDULE)  # type: ignore[arg-type]
    assert await catalog.sources.get_watermark(sid) == before


async def test_new_patient_released_with_an_old_date_is_found(
    catalog: Catalog, client: NbiaClient, sim: SimServer, sim_archive: SimArchive
) -> None:
    """getUpdatedSeries misses it; NewPatientsInCollection (on/after the date) does not."""
    await _pass(catalog, client, _source(sim))
    await _drain(catalog)
    sid = await catalog.sources.ensure_source(_source(sim))
    watermark = await catalog.sources.get_watermark(sid)
    assert watermark is not None
    on_the_boundary = (watermark - timedelta(days=SCHEDULE.overlap_days)).replace(tzinfo=None)
    added = sim_archive.add_patient("SIM-MR", series=1, released=on_the_boundary)
    report = await _pass(catalog, client, _source(sim))
    assert report.new == 1
    assert await _drain(catalog) == [added[0].uid]


async def test_new_collection_is_listed_in_full(
    catalog: Catalog, client: NbiaClient, sim: SimServer, sim_archive: SimArchive
) -> None:
    await _pass(catalog, client, _source(sim))
    await _drain(catalog)
    old = datetime(2019, 1, 1)  # released long before the watermark
    added = sim_archive.add_patient("SIM-NEW", series=2, released=old)
    report = await _pass(catalog, client, _source(sim))
    assert report.new == 2
    assert await _drain(catalog) == sorted(s.uid for s in added)


async def test_filters_restrict_collections_and_modalities(
    catalog: Catalog, client: NbiaClient, sim: SimServer, sim_archive: SimArchive
) -> None:
    source = _source(sim, collections=["sim-ct"], modalities=["ct"])
    await _pass(catalog, client, source)
    expected = sorted(s.uid for s in sim_archive.in_collection("SIM-CT") if s.modality == "CT")
    assert expected and await _drain(catalog) == expected
    sim_archive.add_patient("SIM-MR", series=1)
    report = await _pass(catalog, client, source)
    assert report.queued == 0


async def test_a_collection_taken_out_of_the_filter_is_no_longer_followed(
    catalog: Catalog, client: NbiaClient, sim: SimServer, sim_archive: SimArchive
) -> None:
    await _pass(catalog, client, _source(sim, collections=["SIM-CT", "SIM-MR"]))
    await _drain(catalog)
    sim_archive.add_patient("SIM-MR", series=1)
    added = sim_archive.add_patient("SIM-CT", series=1)
    report = await _pass(catalog, client, _source(sim, collections=["SIM-CT"]))
    assert (report.full, report.new) == (False, 1)
    assert await _drain(catalog) == [s.uid for s in added]


async def test_patient_filter_lists_only_those_patients(
    catalog: Catalog, client: NbiaClient, sim: SimServer, sim_archive: SimArchive
) -> None:
    wanted = sim_archive.patients[0]
    source = _source(sim, collections=[wanted.collection], patients=[wanted.patient_id])
    await _pass(catalog, client, source)
    expected = sorted(
        s.uid for s in sim_archive.series.values() if s.patient_id == wanted.patient_id
    )
    assert await _drain(catalog) == expected


async def test_periodic_full_listing_when_due(
    catalog: Catalog, client: NbiaClient, sim: SimServer
) -> None:
    await _pass(catalog, client, _source(sim))
    always_due = ScheduleSettings(full_listing_days=1e-9)
    report = await _pass(catalog, client, _source(sim), always_due)
    assert report.full and report.queued == 0


async def test_future_release_date_does_not_push_the_watermark_past_today(
    catalog: Catalog, client: NbiaClient, sim: SimServer, sim_archive: SimArchive
) -> None:
    """A DateReleased in the future (bogus, or dd/MM read as MM/dd) must not make later
    increments ask from that future day: what is released meanwhile would be missed."""
    await _pass(catalog, client, _source(sim))
    await _drain(catalog)
    future = datetime.now() + timedelta(days=300)
    bogus = sim_archive.add_patient("SIM-CT", series=1, released=future)
    await _pass(catalog, client, _source(sim))
    assert await _drain(catalog) == [bogus[0].uid]
    sid = await catalog.sources.ensure_source(_source(sim))
    watermark = await catalog.sources.get_watermark(sid)
    assert watermark is not None and watermark <= datetime.now(UTC)
    added = sim_archive.add_patient("SIM-MR", series=1)  # released today
    report = await _pass(catalog, client, _source(sim))
    assert report.new == 1
    assert await _drain(catalog) == [added[0].uid]


class _SmallBatches:
    """A client listing 2 series at a time that notes, as each batch arrives, whether the
    listing's earlier batches are in the catalog already."""

    def __init__(self, inner: NbiaClient, catalog: Catalog, source_id: int) -> None:
        self._inner, self._catalog, self._source_id = inner, catalog, source_id
        self.earlier_stored: list[bool] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def series_batches(
        self,
        each: Callable[[list[SeriesInfo]], Awaitable[None]],
        collection: str,
        patient_id: str | None = None,
    ) -> int:
        earlier: list[str] = []

        async def check(batch: list[SeriesInfo]) -> None:
            known = await self._catalog.sources.series_states(self._source_id, earlier)
            self.earlier_stored.append(len(known) == len(earlier))
            earlier.extend(s.series_uid for s in batch)
            await each(batch)

        return await self._inner.series_batches(check, collection, patient_id, size=2)


async def test_a_full_listing_is_stored_batch_by_batch_as_it_arrives(
    catalog: Catalog, client: NbiaClient, sim: SimServer, sim_archive: SimArchive
) -> None:
    source = _source(sim)
    sid = await catalog.sources.ensure_source(source)
    small = _SmallBatches(client, catalog, sid)
    report = await discover(catalog, small, source, sid, SCHEDULE)
    assert report.new == len(sim_archive.series)
    collections = {s.collection for s in sim_archive.series.values()}
    assert len(small.earlier_stored) > len(collections)  # some listing came in several
    assert all(small.earlier_stored)


class _FailingUpdates:
    """A client whose getUpdatedSeries fails: the pass dies after some work is stored."""

    def __init__(self, inner: NbiaClient) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def updated_series(self, since: date) -> list[SeriesInfo]:
        raise RetryableError("getUpdatedSeries: 503")


async def test_watermark_stays_when_the_pass_fails(
    catalog: Catalog, client: NbiaClient, sim: SimServer, sim_archive: SimArchive
) -> None:
    await _pass(catalog, client, _source(sim))
    sid = await catalog.sources.ensure_source(_source(sim))
    before = await catalog.sources.get_watermark(sid)
    sim_archive.add_patient("SIM-NEW", series=1)  # a new collection: stored before the failure
    with pytest.raises(RetryableError):
        await discover(catalog, _FailingUpdates(client), _source(sim), sid, SCHEDULE)
    assert await catalog.sources.get_watermark(sid) == before


async def test_manifest_queues_known_series_and_reports_unknown(
    catalog: Catalog, client: NbiaClient, sim: SimServer, sim_archive: SimArchive
) -> None:
    sid = await catalog.sources.ensure_source(_source(sim))
    known = sorted(sim_archive.series)[:2]
    report = await add_manifest(catalog, client, sid, [*known, "1.2.3.999", known[0]])
    assert (report.new, report.unknown) == (2, ("1.2.3.999",))
    assert (await catalog.state_counts())[SeriesState.WANTED][0] == 2
