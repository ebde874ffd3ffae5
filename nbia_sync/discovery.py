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

An empty answer is not trusted on a v2 source (the real server answers a dead token with
an empty 200): see nbia_sync.witness. Before the watermark moves, a witness query proves
the token alive; if it cannot, discovery logs in afresh and lists in full, and fails
(nothing moved) when even that gets nothing.

Withdrawals: a series the catalog holds that a successful full listing of its collection
no longer returns becomes withdrawn, once every collection has been listed (a series
moved to another collection is found there instead). An empty listing of a collection the
catalog holds series of withdraws nothing (the real server answers an empty 200 when it
is unwell), nor does one that would withdraw more than `mirror.max_withdrawn_share` of a
collection at once, unless the operator allows it (`sync --full --allow-mass-withdrawal`).

A source limited to manifests (`sources[].manifests`) wants exactly their series: a
full pass looks each one up (getSeries by SeriesInstanceUID), an increment asks
getUpdatedSeries and keeps the manifests' series of it, plus looks up those not in the
catalog yet. It never lists a collection.
"""

from __future__ import annotations

import asyncio
import csv
import inspect
import io
from array import array
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, Protocol, TypeVar

import anyio
import structlog

from nbia_sync.api._records import EARLIEST_RELEASE
from nbia_sync.api.manifest import ManifestError, is_dicom_uid, parse_manifest
from nbia_sync.api.models import PatientInfo, SeriesInfo, StudyInfo
from nbia_sync.catalog import Catalog, Listing, UpsertResult
from nbia_sync.config import ScheduleSettings, SourceSettings
from nbia_sync.errors import ConfigError
from nbia_sync.witness import Watched, trusting

log = structlog.get_logger(__name__)

T = TypeVar("T")
A = TypeVar("A")
B = TypeVar("B")
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

    async def series_batches(
        self,
        each: Callable[[list[SeriesInfo]], Awaitable[None]],
        collection: str,
        patient_id: str | None = None,
    ) -> int: ...

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
    # Manifest UIDs the archive does not know (add_manifest, manifest-limited sources).
    unknown: tuple[str, ...] = field(default=())
    withdrawn: int = 0  # series this pass found withdrawn
    # Collections whose withdrawals were held back (empty listing, or too many at once).
    withdrawals_held: tuple[str, ...] = field(default=())

    @property
    def queued(self) -> int:
        return self.new + self.changed


@dataclass(frozen=True, slots=True)
class DiscoveryOptions:
    """What the operator asked of this pass (`sync --full`, `--allow-mass-withdrawal`)."""

    full: bool = False  # a full listing now, whatever the schedule says
    allow_mass_withdrawal: bool = False
    max_withdrawn_share: float = 0.5  # mirror.max_withdrawn_share


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
        # Per collection listed in full: the held series its listing no longer returned.
        self.absent: dict[str, set[str]] = {}
        self.held_counts: dict[str, int] = {}
        self.unknown: tuple[str, ...] = ()

    async def query(self, ask: Callable[[], Awaitable[T]]) -> T:
        """An archive query, started only once it is within the concurrency cap (a query
        cancelled while it waits for the cap was never made, not left unawaited)."""
        async with self._limit:
            return await ask()

    async def store(self, found: Iterable[SeriesInfo]) -> None:
        """Queue the matching series; note the newest release date seen."""
        kept = [s for s in found if self.filter.series(s)]
        for s in kept:
            if s.date_released is not None:
                released = _as_utc(s.date_released)
                self.newest = released if self.newest is None else max(self.newest, released)
        if kept:
            stored = await self.catalog.sources.upsert_series(self.source_id, kept, self.listing)
            # Not `self.result += await ...`: that reads self.result before the await and
            # would drop the counts of collections stored concurrently.
            self.result = self.result + stored

    async def list_collection(self, collection: str) -> tuple[int, array[int]]:
        """Store every series of a collection (of the configured patients only, when set)
        batch by batch as the archive sends them; how many the archive listed, and the
        hashes of their UIDs.

        Hashes (8 bytes a series), like Listing's: a collection's listing is never held
        in memory, only what tells a held series that is no longer listed. A collision,
        or a series only an attempt that was retried listed, keeps a series from being
        withdrawn this pass, never the other way round. Modality and body part are
        filtered here, not on the server: the server matches them case-sensitively and
        the config should not have to guess the case.
        """
        listed = array("q")  # hash() is a signed 64-bit value

        async def each(batch: list[SeriesInfo]) -> None:
            # Every UID listed, kept or filtered out: it is still at the archive.
            listed.extend(hash(s.series_uid) for s in batch)
            await self.store(batch)

        series = self.client.series_batches
        if self.source.patients:
            counts = await _all(
                *(
                    self.query(partial(series, each, collection, patient_id=p))
                    for p in sorted(self.source.patients)
                )
            )
            return sum(counts), listed
        return await self.query(lambda: series(each, collection)), listed

    async def full_listing(self, collections: Sequence[str]) -> None:
        await self.catalog.sources.record_collections(self.source_id, collections)

        async def one(collection: str) -> None:
            # Stored batch by batch: not even one collection's listing is held at once.
            count, listed = await self.list_collection(collection)
            held = await self.catalog.sources.held_in_collection(
                self.source_id, collection, sorted(self.source.patients)
            )
            absent = _not_listed(held, listed)
            if held and not count:
                self.absent[collection] = set()  # held back, see withdraw_absent
                log.warning(
                    "discovery.empty_listing",
                    source=self.source.name,
                    collection=collection,
                    held=len(held),
                    action="nothing withdrawn",
                )
            elif absent:
                self.absent[collection] = absent
                self.held_counts[collection] = len(held)

        await _all(*(one(c) for c in collections))

    async def withdraw_absent(self, options: DiscoveryOptions) -> tuple[int, list[str]]:
        """Withdraw what full listings no longer returned; (withdrawn, collections held back).

        Run after every collection was listed and stored: a series moved between
        collections has its new collection by then and is not withdrawn."""
        withdrawn, held_back = 0, []
        for collection, absent in sorted(self.absent.items()):
            if not absent:  # an empty listing (warned about above)
                held_back.append(collection)
                continue
            share = len(absent) / self.held_counts[collection]
            if share > options.max_withdrawn_share and not options.allow_mass_withdrawal:
                held_back.append(collection)
                log.warning(
                    "discovery.mass_withdrawal_held",
                    source=self.source.name,
                    collection=collection,
                    absent=len(absent),
                    held=self.held_counts[collection],
                    hint="if the archive really withdrew them: "
                    "nbia-sync sync --full --allow-mass-withdrawal",
                )
                continue
            count = await self.catalog.sources.withdraw(self.source_id, collection, sorted(absent))
            if count:
                log.warning(
                    "discovery.withdrawn",
                    source=self.source.name,
                    collection=collection,
                    count=count,
                    first=min(absent),
                )
            withdrawn += count
        return withdrawn, held_back

    async def manifests(self, uids: Sequence[str], since: date | None) -> None:
        """A manifest-limited source: its series, kept up to date; nothing else."""
        wanted = set(uids)
        lookup: Sequence[str] = uids
        if since is not None:
            updated = await self.query(lambda: self.client.updated_series(since))
            await self.store(s for s in updated if s.series_uid in wanted)
            known = await self.catalog.sources.series_states(self.source_id, uids)
            lookup = [u for u in uids if u not in known]
        found = await _lookup(self.client, lookup)
        returned = {s.series_uid for s in found}
        self.unknown = tuple(u for u in lookup if u not in returned)
        if self.unknown:
            log.warning(
                "discovery.manifest_unknown",
                source=self.source.name,
                count=len(self.unknown),
                first=self.unknown[0],
            )
        await self.catalog.sources.record_collections(
            self.source_id, sorted({s.collection for s in found})
        )
        await self.store(found)

    async def increments(
        self, listing: Coroutine[Any, Any, list[str]], since: date, known: list[str]
    ) -> None:
        """getUpdatedSeries and each ``known`` collection's new-patient and new-study
        queries in the same round as the archive's list of collections (``listing``): each
        waits on the archive, not on the others. Then the collections new to the catalog
        are listed in full."""
        if self.source.collections:  # the ones still asked for
            asked = {c.casefold() for c in self.source.collections}
            known = [c for c in known if c.casefold() in asked]
        collections, _ = await _both(
            listing, _all(self.updated(since), *(self.new_in_collection(c, since) for c in known))
        )
        folds = {c.casefold() for c in known}
        fresh = [c for c in collections if c.casefold() not in folds]
        if fresh:
            log.info("discovery.new_collections", source=self.source.name, collections=fresh)
            await self.full_listing(fresh)

    async def updated(self, since: date) -> None:
        await self.store(await self.query(lambda: self.client.updated_series(since)))

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
        # Both at once (within the concurrency cap): neither depends on the other.
        patients, studies = await _both(
            self.query(lambda: self.client.new_patients(collection, since)),
            self.query(lambda: self.client.new_studies(collection, since)),
        )
        patients = [p for p in self.usable(patients) if self.filter.patient(p.patient_id)]
        studies = [s for s in self.usable(studies) if self.filter.patient(s.patient_id)]
        if patients:
            await self.catalog.sources.record_patients(self.source_id, patients)
        if studies:
            await self.catalog.sources.record_studies(self.source_id, studies)
        # A new patient's listing covers its new studies: ask for each thing once.
        listed = {p.patient_id for p in patients}
        series = self.client.series
        queries = [
            self.query(partial(series, collection=collection, patient_id=p)) for p in sorted(listed)
        ] + [
            self.query(partial(series, collection=collection, study_uid=s.study_uid))
            for s in studies
            if s.patient_id not in listed
        ]
        found = await _all(*queries)
        await self.store(s for batch in found for s in batch)


async def _all(*pending: Coroutine[Any, Any, T]) -> list[T]:
    """Run concurrently; on the first failure cancel the rest and raise that failure.

    (asyncio.gather would leave the siblings running; a task group's ExceptionGroup would
    hide the error class that callers decide retries on. An anyio group, like the engine's
    around it: an asyncio.TaskGroup nested in an anyio one cancels the enclosing task.)
    """
    results: list[T] = []
    slots: dict[int, T] = {}

    async def run(index: int, query: Coroutine[Any, Any, T]) -> None:
        slots[index] = await query

    try:
        async with anyio.create_task_group() as group:
            for index, query in enumerate(pending):
                group.start_soon(run, index, query)
    except BaseExceptionGroup as eg:
        first = eg.exceptions[0]
        # Its own cause is kept (it says why, e.g. the refused connection); the group is not.
        raise first from first.__cause__
    finally:
        for query in pending:  # those cancelled before they began: closed, never to run
            if inspect.getcoroutinestate(query) == inspect.CORO_CREATED:
                query.close()
    results.extend(slots[i] for i in range(len(pending)))
    return results


async def _both(first: Coroutine[Any, Any, A], second: Coroutine[Any, Any, B]) -> tuple[A, B]:
    """Two queries of different result types at once, failing as _all does."""
    pending: list[Coroutine[Any, Any, Any]] = [first, second]
    a, b = await _all(*pending)
    return a, b


def _not_listed(held: set[str], listed: Iterable[int]) -> set[str]:
    """The UIDs of `held` whose hash is not among the `listed` hashes."""
    by_hash = {hash(uid): uid for uid in held}
    for h in listed:
        by_hash.pop(h, None)
    return set(by_hash.values())


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
    options: DiscoveryOptions | None = None,
) -> DiscoveryReport:
    """One discovery pass for `source`; returns what it queued."""
    options = options or DiscoveryOptions()

    async def run(watched: Watched, again: bool) -> DiscoveryReport:
        # Asked again after a doubted token: in full, as an increment may have recorded
        # a collection as known from an answer that cannot be trusted.
        return await _discover_once(
            catalog, watched, source, source_id, schedule, options, full_listing=again
        )

    return await trusting(client, f"discovery of source {source.name!r}", run)


async def _discover_once(
    catalog: Catalog,
    client: Watched,
    source: SourceSettings,
    source_id: int,
    schedule: ScheduleSettings,
    options: DiscoveryOptions,
    *,
    full_listing: bool,
) -> DiscoveryReport:
    started = datetime.now(UTC)
    start = await catalog.sources.discovery_start(source_id)
    watermark = _not_after(start.watermark, started)
    if watermark is not None and watermark < EARLIEST_RELEASE:
        # Stored before absurd dates were ignored (api/_records.py): list in full instead
        # of doing arithmetic on year 1.
        watermark = None
    full = (
        full_listing
        or options.full
        or _full_listing_due(watermark, start.last_full_listing_at, schedule)
    )
    work = _Pass(catalog, client, source, source_id)
    since = None
    if not (full or watermark is None):
        since = (watermark - timedelta(days=schedule.overlap_days)).date()
    withdrawn, held_back = 0, list[str]()
    listed = False
    if source.manifests:
        await work.manifests(read_series_lists(source.manifests), since)
    elif since is None:
        await work.full_listing(await _collections(client, source))
        listed = True
    else:
        await work.increments(_collections(client, source), since, start.collections)
    await client.confirm()  # before anything trusts an empty answer
    # Conflicts are judged, and released, only on a listing of whole collections.
    work.listing.full = listed
    work.result = work.result + await catalog.sources.finish_listing(source_id, work.listing)
    if listed:  # after the moves: a series moved to another collection is not withdrawn
        withdrawn, held_back = await work.withdraw_absent(options)
    # Only now, with every batch committed, may the watermark move forward.
    newest = (
        work.newest if watermark is None or work.newest is None else max(watermark, work.newest)
    )
    newest = _not_after(newest, started)
    await catalog.sources.set_watermark(source_id, newest, full_listing=full)
    report = DiscoveryReport(
        new=work.result.new,
        changed=work.result.changed,
        unchanged=work.result.unchanged,
        full=full,
        unknown=work.unknown,
        withdrawn=withdrawn,
        withdrawals_held=tuple(held_back),
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
        withdrawn=report.withdrawn,
        skipped=report.skipped,
        conflicts=report.conflicts,
        watermark=newest.isoformat() if newest else None,
    )
    return report


async def _lookup(client: DiscoveryClient, uids: Sequence[str]) -> list[SeriesInfo]:
    """getSeries by SeriesInstanceUID for each UID, a few at a time."""
    limit = asyncio.Semaphore(QUERY_CONCURRENCY)

    async def one(uid: str) -> list[SeriesInfo]:
        async with limit:
            return await client.series(series_uid=uid)

    answers = await _all(*(one(u) for u in uids))
    return [s for answer in answers for s in answer]


def read_series_list(path: Path) -> list[str]:
    """The series UIDs of a portal manifest (.tcia), a plain list (one UID a line), or a
    CSV file (.csv: the first column; a first row that is not a UID is a header).
    Any problem is a ConfigError naming the file (and line)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ConfigError(f"cannot read manifest {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (a manifest or a list of UIDs)") from None
    if path.suffix.lower() != ".csv":
        return parse_manifest(text, name=str(path)).series_uids
    uids: dict[str, None] = {}
    for number, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        cell = row[0].strip() if row else ""
        if not cell:
            continue
        if not is_dicom_uid(cell):
            if number == 1:
                continue  # the header
            raise ManifestError(f"{path}, line {number}: not a DICOM series UID: {cell[:80]!r}")
        uids.setdefault(cell, None)
    if not uids:
        raise ManifestError(f"{path}: lists no series UIDs")
    return list(uids)


def read_series_lists(paths: Iterable[Path]) -> list[str]:
    """Every UID of every file, first-seen order, each once."""
    return list(dict.fromkeys(u for p in paths for u in read_series_list(p)))


async def add_manifest(
    catalog: Catalog, client: DiscoveryClient, source_id: int, series_uids: Iterable[str]
) -> DiscoveryReport:
    """Queue the series a manifest lists; UIDs the archive does not know are reported."""
    uids = list(dict.fromkeys(u.strip() for u in series_uids if u.strip()))

    async def lookup(watched: Watched, again: bool) -> list[SeriesInfo]:
        found = await _lookup(watched, uids)
        await watched.confirm()  # "unknown" must not be a dead token's empty answer
        return found

    found = await trusting(client, "manifest lookup", lookup)
    known = {s.series_uid for s in found}
    unknown = tuple(u for u in uids if u not in known)
    if unknown:
        log.warning("discovery.manifest_unknown", count=len(unknown), first=unknown[0])
    await catalog.sources.record_collections(source_id, sorted({s.collection for s in found}))
    result = await catalog.sources.upsert_series(source_id, found) if found else UpsertResult()
    return DiscoveryReport(
        new=result.new,
        changed=result.changed,
        unchanged=result.unchanged,
        skipped=result.skipped,
        conflicts=result.conflicts,
        unknown=unknown,
    )
