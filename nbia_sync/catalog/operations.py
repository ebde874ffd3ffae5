"""Operator jobs on the catalog: withdrawn series, repairs, manifest look-ups.

Free functions over a Database (the `Catalog` façade exposes them); each is one short
transaction, or one per batch of UIDs.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from nbia_sync.catalog.db import Database
from nbia_sync.catalog.models import Instance, Series, SeriesState, Source

SERIES = cast(Table, Series.__table__)
INSTANCES = cast(Table, Instance.__table__)
SOURCES = cast(Table, Source.__table__)
# UIDs per statement: far below every dialect's bound-parameter limit.
_BATCH = 500
# States a full listing may turn into withdrawn: a conflict is held back for its own
# reason, and a withdrawn series is already withdrawn.
_LISTABLE = [s for s in SeriesState if s not in (SeriesState.WITHDRAWN, SeriesState.CONFLICT)]


@dataclass(frozen=True, slots=True)
class WithdrawnInfo:
    series_uid: str
    source_name: str
    collection: str
    withdrawn_at: datetime | None
    files_deleted: bool  # its files left the mirror (on_withdrawn = "delete")


@dataclass(frozen=True, slots=True)
class PlacedWithdrawn:
    series_id: int
    series_uid: str
    placed_path: str


def _batches(items: Sequence[str]) -> Iterable[list[str]]:
    for start in range(0, len(items), _BATCH):
        yield list(items[start : start + _BATCH])


def _in_collection(collection: str) -> Any:
    # The archive spells collection names differently between endpoints.
    return func.lower(SERIES.c.collection) == collection.lower()


async def held_in_collection(
    db: Database, source_id: int, collection: str, patients: Collection[str] = ()
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

    return await db.run_read(op)


async def withdraw(db: Database, source_id: int, collection: str, uids: Sequence[str]) -> int:
    """Mark series withdrawn; only those still filed under `collection` (a series moved
    to another collection meanwhile was listed there and is not withdrawn). A lease is
    dropped: the worker's placement re-check then refuses to place the series."""
    total = 0
    for batch in _batches(sorted(uids)):

        async def op(conn: AsyncConnection, batch: list[str] = batch) -> int:
            now = db.clock.now()
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

        total += await db.run_write(op)
    return total


async def withdrawn(db: Database) -> list[WithdrawnInfo]:
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

    return await db.run_read(op)


async def placed_withdrawn(db: Database) -> list[PlacedWithdrawn]:
    """Withdrawn series whose files are still in the mirror."""

    async def op(conn: AsyncConnection) -> list[PlacedWithdrawn]:
        rows = await conn.execute(
            select(SERIES.c.id, SERIES.c.series_uid, SERIES.c.placed_path)
            .where(SERIES.c.state == SeriesState.WITHDRAWN, SERIES.c.placed_path.is_not(None))
            .order_by(SERIES.c.id)
        )
        return [PlacedWithdrawn(int(r.id), str(r.series_uid), str(r.placed_path)) for r in rows]

    return await db.run_read(op)


async def forget_placement(db: Database, series_id: int) -> bool:
    """The files of a withdrawn series left the mirror: say so (no path, no instances,
    no bytes). False when the series is no longer withdrawn (it reappeared)."""

    async def op(conn: AsyncConnection) -> bool:
        result = await conn.execute(
            update(SERIES)
            .where(SERIES.c.id == series_id, SERIES.c.state == SeriesState.WITHDRAWN)
            .values(placed_path=None, bytes=0, updated_at=db.clock.now())
        )
        if not result.rowcount:
            return False
        await conn.execute(delete(INSTANCES).where(INSTANCES.c.series_id == series_id))
        return True

    return await db.run_write(op)


async def requeue_done(db: Database, uids: Sequence[str], reason: str) -> int:
    """Queue placed series again (verify --repair): the next pass downloads them afresh
    and places them over the damaged copy."""
    total = 0
    for batch in _batches(sorted(set(uids))):

        async def op(conn: AsyncConnection, batch: list[str] = batch) -> int:
            result = await conn.execute(
                update(SERIES)
                .where(SERIES.c.series_uid.in_(batch), SERIES.c.state == SeriesState.DONE)
                .values(
                    state=SeriesState.WANTED,
                    attempts=0,
                    next_try_at=None,
                    last_error=reason,
                    updated_at=db.clock.now(),
                )
            )
            return int(result.rowcount)

        total += await db.run_write(op)
    return total


async def series_states(
    db: Database, source_id: int, uids: Sequence[str]
) -> dict[str, SeriesState]:
    """State of each of `uids` the catalog holds for the source (absent: unknown)."""
    found: dict[str, SeriesState] = {}
    for batch in _batches(list(dict.fromkeys(uids))):

        async def op(conn: AsyncConnection, batch: list[str] = batch) -> dict[str, SeriesState]:
            rows = await conn.execute(
                select(SERIES.c.series_uid, SERIES.c.state).where(
                    SERIES.c.source_id == source_id, SERIES.c.series_uid.in_(batch)
                )
            )
            return {str(uid): SeriesState(state) for uid, state in rows}

        found.update(await db.run_read(op))
    return found


async def planned_files(db: Database) -> int:
    """Files the queue's series hold, by the archive's image counts (progress totals)."""

    async def op(conn: AsyncConnection) -> int:
        total = await conn.scalar(
            select(func.coalesce(func.sum(SERIES.c.image_count), 0)).where(
                SERIES.c.state.in_([SeriesState.WANTED, SeriesState.PENDING])
            )
        )
        return int(total or 0)

    return await db.run_read(op)
