"""`Sources`: what each source lists, merged into the catalog (`catalog.sources`).

Its row and watermarks, the collections, patients, studies and series discovery found,
and the series a full listing no longer returns (withdrawals).

A series is CHANGED when the archive reports a different DateReleased, ImageCount or
FileSize (an attribute the archive omitted is "unknown", never a change), or files it
under another collection, patient or study (the series UID stays, its mirror path does
not). Changed series
go back to the queue with a new generation; unchanged ones are not written at all.
Work is done in batches, comparing only each batch's UIDs, so the cost follows the size
of the increment, not of the catalog.

Bad records (``SeriesInfo.problem``) are skipped with a warning naming the series, and
counted. Identity rule (README "Bad records and identity conflicts"): one series UID has
one place in the mirror. A pass that lists a UID under two places, or a source listing a
UID another source already holds, holds that series as CONFLICT (the row keeps the place
it had: first listed or placed wins) and never downloads it until a full listing sees it
under one place only. Because a move (listed under a new place only) and a duplicate
(listed under both) look alike until the pass has seen everything, moves are applied at
the end of the pass, by `Sources.finish_listing`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any, cast

import structlog
from sqlalchemy import Table, bindparam, delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from nbia_sync.api.models import PatientInfo, SeriesInfo, StudyInfo
from nbia_sync.catalog.db import Database
from nbia_sync.catalog.models import SeriesState
from nbia_sync.catalog.records import (
    DiscoveryStart,
    PlacedWithdrawn,
    UpsertResult,
    WithdrawnInfo,
)
from nbia_sync.catalog.tables import (
    COLLECTIONS,
    INSTANCES,
    PATIENTS,
    SERIES,
    SOURCES,
    STUDIES,
    batches,
    insert_for,
)
from nbia_sync.config import SourceSettings

log = structlog.get_logger(__name__)

# States a full listing may turn into withdrawn: a conflict is held back for its own
# reason, and a withdrawn series is already withdrawn.
_LISTABLE = [s for s in SeriesState if s not in (SeriesState.WITHDRAWN, SeriesState.CONFLICT)]


def as_utc(value: datetime | None) -> datetime | None:
    """The archive's dates carry no zone; they are taken as UTC."""
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _json_default(value: object) -> str:
    if isinstance(value, datetime | date):
        return value.isoformat()
    return str(value)


# What the archive said of a series, as stored: every field but ``problem`` (ours).
_REMOTE_FIELDS = tuple(f.name for f in dataclasses.fields(SeriesInfo) if f.name != "problem")


def _remote_json(info: SeriesInfo) -> str:
    # Not dataclasses.asdict: its recursive deep copy was 5 % of a 5,000-series listing.
    record = {name: getattr(info, name) for name in _REMOTE_FIELDS}
    return json.dumps(record, default=_json_default, sort_keys=True)


Place = tuple[str, str, str]  # collection, patient ID, study UID: where a series lives


def _place(item: Any) -> Place:
    return (item.collection, item.patient_id, item.study_uid)


def _shown(place: Place) -> str:
    return "/".join(place)


@dataclass
class Listing:
    """What one discovery pass has seen of one source, for the identity rule.

    Holds a hash of each UID listed and of its place (about 100 bytes a series, far less
    than the listing itself), plus the few moves and conflicts found.
    """

    full: bool = False  # a full listing: conflicts it no longer sees are resolved
    seen: dict[int, int] = field(default_factory=dict)
    moves: dict[str, SeriesInfo] = field(default_factory=dict)
    conflicts: dict[str, set[Place]] = field(default_factory=dict)
    # Places of new rows whose insert lost a race (to this pass's other batch, or to a
    # fleet peer): a conflict's first place may only be known from here.
    raced: dict[str, set[Place]] = field(default_factory=dict)

    def note(self, info: SeriesInfo) -> None:
        here = _place(info)
        first = self.seen.setdefault(hash(info.series_uid), hash(here))
        if first != hash(here) or info.series_uid in self.conflicts:
            self.conflicts.setdefault(info.series_uid, set()).add(here)


def _metadata(info: SeriesInfo, now: datetime) -> dict[str, Any]:
    return {
        "study_uid": info.study_uid,
        "collection": info.collection,
        "patient_id": info.patient_id,
        "modality": info.modality,
        "body_part": info.body_part,
        "description": info.series_description,
        "image_count": info.image_count,
        "file_size": info.file_size,
        "date_released": as_utc(info.date_released),
        "remote_json": _remote_json(info),
        "updated_at": now,
    }


def is_changed(row: Any, info: SeriesInfo) -> bool:
    released = as_utc(info.date_released)
    return (
        # Moved: same SeriesInstanceUID, another place in the tree.
        (info.collection, info.patient_id, info.study_uid)
        != (row.collection, row.patient_id, row.study_uid)
        or (released is not None and released != row.date_released)
        or (info.image_count is not None and info.image_count != row.image_count)
        or (info.file_size is not None and info.file_size != row.file_size)
    )


# Rows per INSERT statement of a batch of new series (SQLAlchemy's insertmanyvalues page).
# Its default puts a whole batch of 500 into one statement of 10,000 parameters, which
# SQLite compiles and the driver keeps in its statement cache for the process's life:
# ~1.7 MiB of peak memory. 100 rows a statement cost no measurable CPU more.
_INSERT_PAGE = 100

# Updates for changed series, run as executemany; b_* names avoid clashing with columns.
_META_COLUMNS = (
    "study_uid",
    "collection",
    "patient_id",
    "modality",
    "body_part",
    "description",
    "image_count",
    "file_size",
    "date_released",
    "remote_json",
    "updated_at",
)
_META_VALUES: dict[str, Any] = {c: bindparam(f"b_{c}") for c in _META_COLUMNS}
_REQUEUE = (
    update(SERIES)
    .where(SERIES.c.id == bindparam("b_id"))
    .values(
        state=SeriesState.WANTED,
        attempts=0,
        next_try_at=None,
        last_error=None,
        conflict=None,
        lease_owner=None,
        lease_expires_at=None,
        withdrawn_at=None,
        generation=SERIES.c.generation + 1,
        **_META_VALUES,
    )
)
# In flight: keep the lease (the worker's staging area stays its own) but bump the
# generation, so its placement is refused and the series is queued again then.
_BUMP_IN_FLIGHT = (
    update(SERIES)
    .where(SERIES.c.id == bindparam("b_id"))
    .values(attempts=0, generation=SERIES.c.generation + 1, **_META_VALUES)
)


# Held back: no worker may take it (claims only pick wanted/pending/expired leases), and
# a worker holding it now loses its lease, so its copy is never placed.
_HOLD = (
    update(SERIES)
    .where(SERIES.c.id == bindparam("b_id"))
    .values(
        state=SeriesState.CONFLICT,
        conflict=bindparam("b_conflict"),
        lease_owner=None,
        lease_expires_at=None,
        next_try_at=None,
        generation=SERIES.c.generation + 1,
        updated_at=bindparam("b_now"),
    )
)


def _without_bad(series: Sequence[SeriesInfo]) -> tuple[list[SeriesInfo], int]:
    good = []
    for s in series:
        if s.problem is None:
            good.append(s)
        else:
            log.warning("record_skipped", series_uid=s.series_uid or None, reason=s.problem)
    return good, len(series) - len(good)


async def _other_sources(
    conn: AsyncConnection, source_id: int, uids: Sequence[str]
) -> dict[str, str]:
    """UID -> name of another source that holds it (not as a conflict, nor withdrawn)."""
    if not uids:
        return {}
    # By source id, so the (source_id, series_uid) index serves it; one source: no query.
    others = list(
        (await conn.execute(select(SOURCES.c.id).where(SOURCES.c.id != source_id))).scalars()
    )
    if not others:
        return {}
    rows = await conn.execute(
        select(SERIES.c.series_uid, SOURCES.c.name)
        .join(SOURCES, SOURCES.c.id == SERIES.c.source_id)
        .where(
            SERIES.c.source_id.in_(others),
            SERIES.c.state.not_in([SeriesState.CONFLICT, SeriesState.WITHDRAWN]),
            SERIES.c.series_uid.in_(list(uids)),
        )
    )
    return {r.series_uid: r.name for r in rows}


async def _upsert_batch(
    conn: AsyncConnection,
    source_id: int,
    batch: Sequence[SeriesInfo],
    listing: Listing,
    now: datetime,
) -> UpsertResult:
    existing = {
        row.series_uid: row
        for row in await conn.execute(
            select(
                SERIES.c.id,
                SERIES.c.series_uid,
                SERIES.c.state,
                SERIES.c.date_released,
                SERIES.c.image_count,
                SERIES.c.file_size,
                SERIES.c.collection,
                SERIES.c.patient_id,
                SERIES.c.study_uid,
                SERIES.c.conflict,
            )
            .where(
                SERIES.c.source_id == source_id,
                SERIES.c.series_uid.in_([s.series_uid for s in batch]),
            )
            # Locked while read (PostgreSQL; SQLite has one writer anyway), in id order as
            # placers lock them: a concurrent writer of the same series, such as another
            # query of this pass listing it too, waits and then reads our change, instead
            # of both judging it against the old row (a change counted, and bumped, twice).
            .order_by(SERIES.c.id)
            .with_for_update()
        )
    }
    elsewhere = await _other_sources(
        conn, source_id, [s.series_uid for s in batch if s.series_uid not in existing]
    )
    new_rows: list[dict[str, Any]] = []
    requeue: list[dict[str, Any]] = []
    bump: list[dict[str, Any]] = []
    deferred = 0
    for info in batch:
        row = existing.get(info.series_uid)
        if row is None:
            other = elsewhere.get(info.series_uid)
            if other is not None:
                log.warning(
                    "series_conflict",
                    series_uid=info.series_uid,
                    reason=f"also listed by source {other!r}",
                )
            new_rows.append(
                {
                    "source_id": source_id,
                    "series_uid": info.series_uid,
                    # The later claimant is held: the mirror has one place per UID.
                    "state": SeriesState.WANTED if other is None else SeriesState.CONFLICT,
                    "conflict": None if other is None else f"also listed by source {other!r}",
                    "attempts": 0,
                    "generation": 1,
                    "downloads": 0,
                    "discovered_at": now,
                    **_metadata(info, now),
                }
            )
        elif _place(info) != _place(row):
            # A move or a duplicate: only the end of the pass can tell (finish_listing).
            listing.moves[info.series_uid] = info
            deferred += 1
        elif row.state == SeriesState.CONFLICT:
            continue  # re-judged by finish_listing
        elif is_changed(row, info) or row.state == SeriesState.WITHDRAWN:
            # A withdrawn series listed again is wanted again.
            params = {"b_id": row.id, **{f"b_{k}": v for k, v in _metadata(info, now).items()}}
            (bump if row.state == SeriesState.DOWNLOADING else requeue).append(params)
    inserted: set[str] = set()
    if new_rows:
        # DO NOTHING: a second discoverer racing us (fleet without the discovery lock),
        # or this pass listing the UID under two places at once, must not abort the
        # batch; the row written first is kept (and counted once: RETURNING).
        insert_new = (
            insert_for(conn.dialect.name, SERIES)
            .on_conflict_do_nothing(index_elements=["source_id", "series_uid"])
            .returning(SERIES.c.series_uid)
            .execution_options(insertmanyvalues_page_size=_INSERT_PAGE)
        )
        inserted = set((await conn.execute(insert_new, new_rows)).scalars())
        for r in new_rows:
            if r["series_uid"] not in inserted:
                place = (r["collection"], r["patient_id"], r["study_uid"])
                listing.raced.setdefault(r["series_uid"], set()).add(place)
    if requeue:
        await conn.execute(_REQUEUE, requeue)
    if bump:
        await conn.execute(_BUMP_IN_FLIGHT, bump)
    changed = len(requeue) + len(bump)
    held = sum(
        1 for r in new_rows if r["series_uid"] in inserted and r["state"] == SeriesState.CONFLICT
    )
    unchanged = len(batch) - len(inserted) - changed - deferred
    return UpsertResult(
        new=len(inserted) - held, changed=changed, unchanged=unchanged, conflicts=held
    )


async def _rows(conn: AsyncConnection, source_id: int, uids: Iterable[str]) -> list[Any]:
    rows: list[Any] = []
    for batch in batches(sorted(uids)):
        rows += await conn.execute(
            select(SERIES).where(SERIES.c.source_id == source_id, SERIES.c.series_uid.in_(batch))
        )
    return rows


async def _hold_conflicts(
    conn: AsyncConnection, source_id: int, listing: Listing, now: datetime
) -> int:
    holds = []
    for row in await _rows(conn, source_id, listing.conflicts):
        places = (
            {_place(row)}
            | listing.conflicts[row.series_uid]
            | listing.raced.get(row.series_uid, set())
        )
        move = listing.moves.get(row.series_uid)
        if move is not None:
            places.add(_place(move))
        others = sorted(_shown(p) for p in places - {_place(row)})
        reason = f"SeriesInstanceUID listed under {_shown(_place(row))} and " + ", ".join(others)
        if row.state == SeriesState.CONFLICT and row.conflict == reason:
            continue
        log.warning("series_conflict", series_uid=row.series_uid, reason=reason)
        holds.append({"b_id": row.id, "b_conflict": reason, "b_now": now})
    if holds:
        await conn.execute(_HOLD, holds)
    return len(holds)


async def _release_resolved(
    conn: AsyncConnection, source_id: int, listing: Listing, now: datetime
) -> set[str]:
    """Conflicts a full listing saw under one place only (and no other source holds):
    queued again, at that place. Never-placed conflicts it did not list are forgotten."""
    rows = (
        await conn.execute(
            select(SERIES).where(
                SERIES.c.source_id == source_id, SERIES.c.state == SeriesState.CONFLICT
            )
        )
    ).all()
    candidates = [r for r in rows if r.series_uid not in listing.conflicts]
    unseen = [
        r.id for r in candidates if hash(r.series_uid) not in listing.seen and r.placed_path is None
    ]
    if unseen:
        await conn.execute(delete(SERIES).where(SERIES.c.id.in_(unseen)))
    seen = [r for r in candidates if hash(r.series_uid) in listing.seen]
    still_elsewhere = await _other_sources(conn, source_id, [r.series_uid for r in seen])
    released = set()
    params = []
    for row in seen:
        if row.series_uid in still_elsewhere:
            continue
        info = listing.moves.get(row.series_uid)
        meta = _metadata(info, now) if info is not None else {}
        params.append(
            {
                "b_id": row.id,
                **{f"b_{c}": getattr(row, c) for c in _META_COLUMNS},
                **{f"b_{k}": v for k, v in meta.items()},
                "b_updated_at": now,
            }
        )
        released.add(row.series_uid)
        log.info("series_conflict_resolved", series_uid=row.series_uid)
    if params:
        await conn.execute(_REQUEUE, params)
    return released


async def _apply_moves(
    conn: AsyncConnection, source_id: int, moved: Sequence[SeriesInfo], now: datetime
) -> int:
    by_uid = {info.series_uid: info for info in moved}
    requeue: list[dict[str, Any]] = []
    bump: list[dict[str, Any]] = []
    for row in await _rows(conn, source_id, by_uid):
        info = by_uid[row.series_uid]
        if row.state == SeriesState.CONFLICT or not is_changed(row, info):
            continue
        params = {"b_id": row.id, **{f"b_{k}": v for k, v in _metadata(info, now).items()}}
        (bump if row.state == SeriesState.DOWNLOADING else requeue).append(params)
    if requeue:
        await conn.execute(_REQUEUE, requeue)
    if bump:
        await conn.execute(_BUMP_IN_FLIGHT, bump)
    return len(requeue) + len(bump)


async def _insert_absent(
    db: Database, table: Table, rows: list[dict[str, Any]], key: list[str]
) -> None:
    for chunk in batches(rows):

        async def op(conn: AsyncConnection, chunk: list[dict[str, Any]] = chunk) -> None:
            await conn.execute(
                insert_for(conn.dialect.name, table).on_conflict_do_nothing(index_elements=key),
                chunk,
            )

        await db.run_write(op)


# ---- withdrawals -----------------------------------------------------------------------


def _in_collection(collection: str) -> Any:
    # The archive spells collection names differently between endpoints.
    return func.lower(SERIES.c.collection) == collection.lower()


# ---- the source rows --------------------------------------------------------------------


async def _known_collections(conn: AsyncConnection, source_id: int) -> list[str]:
    rows = await conn.execute(
        select(COLLECTIONS.c.name)
        .where(COLLECTIONS.c.source_id == source_id)
        .order_by(COLLECTIONS.c.name)
    )
    return [str(n) for n in rows.scalars()]


async def _source_column(db: Database, source_id: int, column: Any) -> datetime | None:
    async def op(conn: AsyncConnection) -> datetime | None:
        value = await conn.scalar(select(column).where(SOURCES.c.id == source_id))
        return cast(datetime | None, value)

    return await db.run_read(op)


class Sources:
    """What each source lists: its row, watermarks, discovery results, withdrawals."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._ensured: dict[tuple[str, str, str], int] = {}  # (name, url, api) -> id

    async def ensure_source(self, source: SourceSettings) -> int:
        """The source's id, creating its row (or updating its url/api) as needed.

        Asked once a pass by discovery and once by the drain: the answer is kept (a source
        row is never renamed or deleted), and a row already as configured is only read,
        so a pass takes no write lock for it."""
        key = (source.name, source.url, source.api)
        known = self._ensured.get(key)
        if known is not None:
            return known

        async def read(conn: AsyncConnection) -> int | None:
            row = (
                await conn.execute(
                    select(SOURCES.c.id).where(
                        SOURCES.c.name == source.name,
                        SOURCES.c.url == source.url,
                        SOURCES.c.api == source.api,
                    )
                )
            ).first()
            return None if row is None else int(row.id)

        async def op(conn: AsyncConnection) -> int:
            # Insert-if-absent first: fleet processes starting together must not collide.
            await conn.execute(
                insert_for(conn.dialect.name, SOURCES)
                .values(name=source.name, url=source.url, api=source.api)
                .on_conflict_do_nothing(index_elements=["name"])
            )
            row = (
                await conn.execute(
                    select(SOURCES.c.id, SOURCES.c.url, SOURCES.c.api).where(
                        SOURCES.c.name == source.name
                    )
                )
            ).one()
            if (row.url, row.api) != (source.url, source.api):
                await conn.execute(
                    update(SOURCES)
                    .where(SOURCES.c.id == row.id)
                    .values(url=source.url, api=source.api)
                )
            return int(row.id)

        found = await self._db.run_read(read)
        self._ensured[key] = found if found is not None else await self._db.run_write(op)
        return self._ensured[key]

    async def get_watermark(self, source_id: int) -> datetime | None:
        return await _source_column(self._db, source_id, SOURCES.c.watermark)

    async def last_full_listing_at(self, source_id: int) -> datetime | None:
        return await _source_column(self._db, source_id, SOURCES.c.last_full_listing_at)

    async def set_watermark(
        self, source_id: int, value: datetime | None, *, full_listing: bool = False
    ) -> None:
        """Record a committed discovery pass: its watermark (None keeps the old one)."""

        async def op(conn: AsyncConnection) -> None:
            now = self._db.clock.now()
            values: dict[str, Any] = {"last_discovery_at": now}
            if value is not None:
                values["watermark"] = as_utc(value)
            if full_listing:
                values["last_full_listing_at"] = now
            await conn.execute(update(SOURCES).where(SOURCES.c.id == source_id).values(**values))

        await self._db.run_write(op)

    async def record_collections(self, source_id: int, names: Iterable[str]) -> None:
        now = self._db.clock.now()
        rows = [
            {"source_id": source_id, "name": n, "discovered_at": now} for n in sorted(set(names))
        ]
        await _insert_absent(self._db, COLLECTIONS, rows, ["source_id", "name"])

    async def known_collections(self, source_id: int) -> list[str]:
        return await self._db.run_read(lambda conn: _known_collections(conn, source_id))

    async def discovery_start(self, source_id: int) -> DiscoveryStart:
        """Watermark, last full listing and known collections: one read."""

        async def op(conn: AsyncConnection) -> DiscoveryStart:
            row = (
                await conn.execute(
                    select(SOURCES.c.watermark, SOURCES.c.last_full_listing_at).where(
                        SOURCES.c.id == source_id
                    )
                )
            ).first()
            collections = await _known_collections(conn, source_id)
            if row is None:
                return DiscoveryStart(None, None, collections)
            return DiscoveryStart(row.watermark, row.last_full_listing_at, collections)

        return await self._db.run_read(op)

    async def record_patients(self, source_id: int, patients: Iterable[PatientInfo]) -> None:
        now = self._db.clock.now()
        keys = sorted({(p.collection, p.patient_id) for p in patients if p.problem is None})
        rows = [
            {"source_id": source_id, "collection": c, "patient_id": p, "discovered_at": now}
            for c, p in keys
        ]
        await _insert_absent(self._db, PATIENTS, rows, ["source_id", "collection", "patient_id"])

    async def record_studies(self, source_id: int, studies: Iterable[StudyInfo]) -> None:
        now = self._db.clock.now()
        by_uid = {s.study_uid: s for s in studies if s.problem is None}
        rows = [
            {
                "source_id": source_id,
                "collection": s.collection,
                "patient_id": s.patient_id,
                "study_uid": uid,
                "study_date": s.study_date.isoformat() if s.study_date else None,
                "description": s.study_description,
                "discovered_at": now,
            }
            for uid, s in sorted(by_uid.items())
        ]
        await _insert_absent(self._db, STUDIES, rows, ["source_id", "study_uid"])

    async def upsert_series(
        self, source_id: int, series: Sequence[SeriesInfo], listing: Listing | None = None
    ) -> UpsertResult:
        """Merge ``series`` into the catalog. ``listing`` is the discovery pass's memory
        (see Listing); without one the call is a pass of its own, finished here."""
        good, skipped = _without_bad(series)
        own = listing is None
        listing = Listing() if listing is None else listing
        for s in good:
            listing.note(s)
        # Last report of a UID wins; sorted so that concurrent writers cut the same batches.
        unique = sorted({s.series_uid: s for s in good}.values(), key=lambda s: s.series_uid)
        total = UpsertResult(skipped=skipped)
        for batch in batches(unique):

            async def op(conn: AsyncConnection, b: Sequence[SeriesInfo] = batch) -> UpsertResult:
                return await _upsert_batch(conn, source_id, b, listing, self._db.clock.now())

            total += await self._db.run_write(op)
        if own:
            total += await self.finish_listing(source_id, listing)
        return total

    async def finish_listing(self, source_id: int, listing: Listing) -> UpsertResult:
        """End of a pass: hold its conflicts, apply its moves, and (full listing) release the
        conflicts it saw resolved. Counts moves as changed and newly held series as conflicts."""
        if not (listing.full or listing.moves or listing.conflicts):
            return UpsertResult()  # nothing to judge: no write transaction

        async def op(conn: AsyncConnection) -> UpsertResult:
            now = self._db.clock.now()
            held = await _hold_conflicts(conn, source_id, listing, now)
            released = (
                await _release_resolved(conn, source_id, listing, now) if listing.full else set()
            )
            moved = [
                info
                for uid, info in sorted(listing.moves.items())
                if uid not in listing.conflicts and uid not in released
            ]
            result = await _apply_moves(conn, source_id, moved, now)
            return UpsertResult(changed=result + len(released), conflicts=held)

        return await self._db.run_write(op)

    async def held_in_collection(
        self, source_id: int, collection: str, patients: Collection[str] = ()
    ) -> set[str]:
        """UIDs of the series the catalog holds in `collection` (of `patients` only, when
        given) that a full listing of it should still return."""

        async def op(conn: AsyncConnection) -> set[str]:
            query = select(SERIES.c.series_uid).where(
                SERIES.c.source_id == source_id,
                _in_collection(collection),
                SERIES.c.state.in_(_LISTABLE),
            )
            if patients:
                query = query.where(SERIES.c.patient_id.in_(list(patients)))
            return {str(uid) for uid in (await conn.execute(query)).scalars()}

        return await self._db.run_read(op)

    async def withdraw(self, source_id: int, collection: str, uids: Sequence[str]) -> int:
        """Mark series withdrawn; only those still filed under `collection` (a series moved
        to another collection meanwhile was listed there and is not withdrawn). A lease is
        dropped: the worker's placement re-check then refuses to place the series."""
        total = 0
        for batch in batches(sorted(uids)):

            async def op(conn: AsyncConnection, batch: list[str] = batch) -> int:
                now = self._db.clock.now()
                result = await conn.execute(
                    update(SERIES)
                    .where(
                        SERIES.c.source_id == source_id,
                        _in_collection(collection),
                        SERIES.c.series_uid.in_(batch),
                        SERIES.c.state.in_(_LISTABLE),
                    )
                    .values(
                        state=SeriesState.WITHDRAWN,
                        withdrawn_at=now,
                        next_try_at=None,
                        lease_owner=None,
                        lease_expires_at=None,
                        updated_at=now,
                    )
                )
                return int(result.rowcount)

            total += await self._db.run_write(op)
        return total

    async def withdrawn(self) -> list[WithdrawnInfo]:
        async def op(conn: AsyncConnection) -> list[WithdrawnInfo]:
            rows = await conn.execute(
                select(
                    SERIES.c.series_uid,
                    SOURCES.c.name,
                    SERIES.c.collection,
                    SERIES.c.withdrawn_at,
                    SERIES.c.placed_path,
                    SERIES.c.placed_at,
                )
                .join(SOURCES, SOURCES.c.id == SERIES.c.source_id)
                .where(SERIES.c.state == SeriesState.WITHDRAWN)
                .order_by(SERIES.c.withdrawn_at.desc(), SERIES.c.series_uid)
            )
            return [
                WithdrawnInfo(
                    series_uid=r.series_uid,
                    source_name=r.name,
                    collection=r.collection,
                    withdrawn_at=r.withdrawn_at,
                    # Placed once (placed_at) and no longer in the tree (placed_path).
                    files_deleted=r.placed_path is None and r.placed_at is not None,
                )
                for r in rows
            ]

        return await self._db.run_read(op)

    async def placed_withdrawn(self) -> list[PlacedWithdrawn]:
        """Withdrawn series whose files are still in the mirror."""

        async def op(conn: AsyncConnection) -> list[PlacedWithdrawn]:
            rows = await conn.execute(
                select(SERIES.c.id, SERIES.c.series_uid, SERIES.c.placed_path)
                .where(SERIES.c.state == SeriesState.WITHDRAWN, SERIES.c.placed_path.is_not(None))
                .order_by(SERIES.c.id)
            )
            return [PlacedWithdrawn(int(r.id), str(r.series_uid), str(r.placed_path)) for r in rows]

        return await self._db.run_read(op)

    async def forget_placement(self, series_id: int) -> bool:
        """The files of a withdrawn series left the mirror: say so (no path, no instances,
        no bytes). False when the series is no longer withdrawn (it reappeared)."""

        async def op(conn: AsyncConnection) -> bool:
            result = await conn.execute(
                update(SERIES)
                .where(SERIES.c.id == series_id, SERIES.c.state == SeriesState.WITHDRAWN)
                .values(placed_path=None, bytes=0, updated_at=self._db.clock.now())
            )
            if not result.rowcount:
                return False
            await conn.execute(delete(INSTANCES).where(INSTANCES.c.series_id == series_id))
            return True

        return await self._db.run_write(op)

    async def series_states(self, source_id: int, uids: Sequence[str]) -> dict[str, SeriesState]:
        """State of each of `uids` the catalog holds for the source (absent: unknown)."""
        found: dict[str, SeriesState] = {}
        for batch in batches(list(dict.fromkeys(uids))):

            async def op(conn: AsyncConnection, batch: list[str] = batch) -> dict[str, SeriesState]:
                rows = await conn.execute(
                    select(SERIES.c.series_uid, SERIES.c.state).where(
                        SERIES.c.source_id == source_id, SERIES.c.series_uid.in_(batch)
                    )
                )
                return {str(uid): SeriesState(state) for uid, state in rows}

            found.update(await self._db.run_read(op))
        return found
