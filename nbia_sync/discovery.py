"""Discovery: find out what the archive holds for a source and queue what changed.

First pass (no watermark), and again every `schedule.full_listing_days`: a full listing,
getSeries per configured collection (every collection when none are configured).
Other passes are incremental, asked from (watermark - overlap_days):
  - getUpdatedSeries: series (re-)released since then;
  - per collection, NewPatientsInCollection / NewStudiesInPatientCollection, whose
    series are then listed — these catch data getUpdatedSeries is known to miss;
  - a collection never seen before is listed in full.
The catalog decides new / changed / unchanged. The watermark (newest DateReleased seen)
moves only after everything the pass found is committed, so a pass that dies half way
is simply asked again from the old watermark.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, Protocol, TypeVar

import structlog

from nbia_sync.api._records import EARLIEST_RELEASE
from nbia_sync.api.models import PatientInfo, SeriesInfo, StudyInfo
from nbia_sync.catalog import Catalog, Listing, UpsertResult
from nbia_sync.config import ScheduleSettings, SourceSettings

log = structlog.get_logger(__name__)

T = TypeVar("T")
Listed = TypeVar("Listed", PatientInfo, StudyInfo)
# Archive queries in flight at once during discovery: enough to hide latency, few
# enough not to look like an attack on a shared public service.
QUERY_CONCURRENCY = 4


class DiscoveryClient(Protocol):
    """The part of `nbia_sync.api.client.NbiaClient` discovery uses."""

    async def collections(self) -> list[str]: ...

    async def series(
        self,
        collection: str | None = None,
        patient_id: str | None = None,
        study_uid: str | None = None,
        modality: str | None = None,
        series_uid: str | None = None,
        body_part: str | None = None,
    ) -> list[SeriesInfo]: ...

    async def updated_series(self, since: date) -> list[SeriesInfo]: ...

    async def new_patients(self, collection: str, since: date) -> list[PatientInfo]: ...

    async def new_studies(
        self, collection: str, since: date, patient_id: str | None = None
    ) -> list[StudyInfo]: ...


@dataclass(frozen=True, slots=True)
class DiscoveryReport:
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    full: bool = False
    skipped: int = 0  # bad records left out (see api/_records.py)
    conflicts: int = 0  # series newly held as identity conflicts
    # Manifest UIDs the archive does not know (add_manifest only).
    unknown: tuple[str, ...] = field(default=())

    @property
    def queued(self) -> int:
        return self.new + self.changed


class _Filter:
    """The source's collection / modality / body part / patient selection.

    Names are compared case-insensitively: the archive is not consistent about case
    between endpoints, and a user's config should not have to guess.
    """

    def __init__(self, source: SourceSettings) -> None:
        self.collections = {c.casefold() for c in source.collections}
        self.modalities = {m.casefold() for m in source.modalities}
        self.body_parts = {b.casefold() for b in source.body_parts}
        self.patients = set(source.patients)

    def collection(self, name: str) -> bool:
        return not self.collections or name.casefold() in self.collections

    def patient(self, patient_id: str) -> bool:
        return not self.patients or patient_id in self.patients

    def series(self, s: SeriesInfo) -> bool:
        return (
            self.collection(s.collection)
            and self.patient(s.patient_id)
            and (not self.modalities or (s.modality or "").casefold() in self.modalities)
            and (not self.body_parts or (s.body_part or "").casefold() in self.body_parts)
        )


class _Pass:
    """One discovery pass over one source: queries, filtering and counting."""

    def __init__(
        self, catalog: Catalog, client: DiscoveryClient, source: SourceSettings, source_id: int
    ) -> None:
        self.catalog = catalog
        self.client = client
        self.source = source
        self.source_id = source_id
        self.filter = _Filter(source)
        self.result = UpsertResult()
        self.listing = Listing()  # what this pass saw: identity conflicts and moves
        self.newest: datetime | None = None
        self._limit = asyncio.Semaphore(QUERY_CONCURRENCY)

    async def query(self, pending: Awaitable[T]) -> T:
        """Await an archive query (a not-yet-started coroutine) within the concurrency cap."""
        async with self._limit:
            return await pending

    async def store(self, found: Iterable[SeriesInfo]) -> None:
        """Queue the matching series; note the newest release date seen."""
        kept = [s for s in found if self.filter.series(s)]
        for s in kept:
            if s.date_released is not None:
                released = _as_utc(s.date_released)
                self.newest = released if self.newest is None else max(self.newest, released)
        if kept:
            stored = await self.catalog.upsert_series(self.source_id, kept, self.listing)
            # Not `self.result += await ...`: that reads self.result before the await and
            # would drop the counts of collections stored concurrently.
            self.result = self.result + stored

    async def list_collection(self, collection: str) -> list[SeriesInfo]:
        """Every series of a collection (of the configured patients only, when set).

        Modality and body part are filtered here, not on the server: the server matches
        them case-sensitively and the config should not have to guess the case.
        """
        series = self.client.series
        if self.source.patients:
            per_patient = await _all(
                *(
                    self.query(series(collection=collection, patient_id=p))
                    for p in sorted(self.source.patients)
                )
            )
            return [s for found in per_patient for s in found]
        return await self.query(series(collection=collection))

    async def full_listing(self, collections: Sequence[str]) -> None:
        await self.catalog.record_collections(self.source_id, collections)

        async def one(collection: str) -> None:
            # Stored collection by collection: a full listing of the whole archive is
            # never held in memory at once.
            await self.store(await self.list_collection(collection))

        await _all(*(one(c) for c in collections))

    async def increments(self, collections: Sequence[str], since: date) -> None:
        known = {c.casefold() for c in await self.catalog.known_collections(self.source_id)}
        fresh = [c for c in collections if c.casefold() not in known]
        if fresh:
            log.info("discovery.new_collections", source=self.source.name, collections=fresh)
            await self.full_listing(fresh)
        await self.store(await self.query(self.client.updated_series(since)))
        seen = [c for c in collections if c.casefold() in known]
        await _all(*(self.new_in_collection(c, since) for c in seen))

    def usable(self, found: list[Listed]) -> list[Listed]:
        """The records without a problem; the others are warned about and counted."""
        good = [r for r in found if r.problem is None]
        for r in found:
            if r.problem is not None:
                log.warning("record_skipped", reason=r.problem)
        if len(good) < len(found):
            self.result = self.result + UpsertResult(skipped=len(found) - len(good))
        return good

    async def new_in_collection(self, collection: str, since: date) -> None:
        # Collections already run concurrently; within one, the two queries go in turn.
        patients = await self.query(self.client.new_patients(collection, since))
        studies = await self.query(self.client.new_studies(collection, since))
        patients = [p for p in self.usable(patients) if self.filter.patient(p.patient_id)]
        studies = [s for s in self.usable(studies) if self.filter.patient(s.patient_id)]
        if patients:
            await self.catalog.record_patients(self.source_id, patients)
        if studies:
            await self.catalog.record_studies(self.source_id, studies)
        # A new patient's listing covers its new studies: ask for each thing once.
        listed = {p.patient_id for p in patients}
        series = self.client.series
        queries = [
            self.query(series(collection=collection, patient_id=p)) for p in sorted(listed)
        ] + [
            self.query(series(collection=collection, study_uid=s.study_uid))
            for s in studies
            if s.patient_id not in listed
        ]
        found = await _all(*queries)
        await self.store(s for batch in found for s in batch)


async def _all(*pending: Coroutine[Any, Any, T]) -> list[T]:
    """Run concurrently; on the first failure cancel the rest and raise that failure.

    (asyncio.gather would leave the siblings running; a TaskGroup's ExceptionGroup would
    hide the error class that callers decide retries on.)
    """
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(p) for p in pending]
    except BaseExceptionGroup as eg:
        raise eg.exceptions[0] from None
    return [t.result() for t in tasks]


def _as_utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _not_after(value: datetime | None, limit: datetime) -> datetime | None:
    """``value``, but never later than ``limit`` (the start of this pass).

    A release date in the future (a bogus value, or a dd/MM date read as MM/dd) must not
    carry the watermark past today: every later increment would ask the archive from that
    future day on and miss everything released until then. Moving it earlier only widens
    the overlap, which costs a few unchanged rows.
    """
    if value is None:
        return None
    return min(_as_utc(value), limit)


def _full_listing_due(
    watermark: datetime | None, last_full: datetime | None, schedule: ScheduleSettings
) -> bool:
    if watermark is None or last_full is None:
        return True
    if schedule.full_listing_days <= 0:
        return False
    return datetime.now(UTC) - last_full >= timedelta(days=schedule.full_listing_days)


async def _collections(client: DiscoveryClient, source: SourceSettings) -> list[str]:
    """The collections to look at, spelt as the archive spells them."""
    archive = await client.collections()
    if not source.collections:
        return sorted(set(archive))
    by_fold = {name.casefold(): name for name in archive}
    missing = [c for c in source.collections if c.casefold() not in by_fold]
    if missing:
        # Kept as written: a restricted collection may be absent from the public list.
        log.warning("discovery.collections_not_listed", source=source.name, collections=missing)
    return list(dict.fromkeys(by_fold.get(c.casefold(), c) for c in source.collections))


async def discover(
    catalog: Catalog,
    client: DiscoveryClient,
    source: SourceSettings,
    source_id: int,
    schedule: ScheduleSettings,
) -> DiscoveryReport:
    """One discovery pass for `source`; returns what it queued."""
    started = datetime.now(UTC)
    watermark = _not_after(await catalog.get_watermark(source_id), started)
    if watermark is not None and watermark < EARLIEST_RELEASE:
        # Stored before absurd dates were ignored (api/_records.py): list in full instead
        # of doing arithmetic on year 1.
        watermark = None
    full = _full_listing_due(watermark, await catalog.last_full_listing_at(source_id), schedule)
    collections = await _collections(client, source)
    work = _Pass(catalog, client, source, source_id)
    work.listing.full = full or watermark is None
    if full or watermark is None:
        await work.full_listing(collections)
    else:
        since = (watermark - timedelta(days=schedule.overlap_days)).date()
        await work.increments(collections, since)
    work.result = work.result + await catalog.finish_listing(source_id, work.listing)
    # Only now, with every batch committed, may the watermark move forward.
    newest = (
        work.newest if watermark is None or work.newest is None else max(watermark, work.newest)
    )
    newest = _not_after(newest, started)
    await catalog.set_watermark(source_id, newest, full_listing=full)
    report = DiscoveryReport(
        new=work.result.new,
        changed=work.result.changed,
        unchanged=work.result.unchanged,
        full=full,
        skipped=work.result.skipped,
        conflicts=work.result.conflicts,
    )
    log.info(
        "discovery.done",
        source=source.name,
        full=full,
        new=report.new,
        changed=report.changed,
        unchanged=report.unchanged,
        skipped=report.skipped,
        conflicts=report.conflicts,
        watermark=newest.isoformat() if newest else None,
    )
    return report


async def add_manifest(
    catalog: Catalog, client: DiscoveryClient, source_id: int, series_uids: Iterable[str]
) -> DiscoveryReport:
    """Queue the series a manifest lists; UIDs the archive does not know are reported."""
    uids = list(dict.fromkeys(u.strip() for u in series_uids if u.strip()))
    limit = asyncio.Semaphore(QUERY_CONCURRENCY)

    async def lookup(uid: str) -> list[SeriesInfo]:
        async with limit:
            return await client.series(series_uid=uid)

    answers = await _all(*(lookup(u) for u in uids))
    found = [s for answer in answers for s in answer]
    known = {s.series_uid for s in found}
    unknown = tuple(u for u in uids if u not in known)
    if unknown:
        log.warning("discovery.manifest_unknown", count=len(unknown), first=unknown[0])
    await catalog.record_collections(source_id, sorted({s.collection for s in found}))
    result = await catalog.upsert_series(source_id, found) if found else UpsertResult()
    return DiscoveryReport(
        new=result.new,
        changed=result.changed,
        unchanged=result.unchanged,
        skipped=result.skipped,
        conflicts=result.conflicts,
        unknown=unknown,
    )
