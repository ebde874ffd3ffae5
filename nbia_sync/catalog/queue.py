"""The work queue over the series table: claim, heartbeat, place, fail, release.

A claim is a lease (owner + expiry) on a series *generation*. Everything that ends a
lease re-checks, under a row lock, that the lease is still ours and the generation
unchanged, so a worker that was presumed dead, or that fetched a version of the series
the archive has since replaced, can never overwrite newer state.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Collection, Sequence
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Select, Table, and_, case, delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from nbia_sync.catalog.db import Database
from nbia_sync.catalog.fleet import utcnow
from nbia_sync.catalog.models import Instance, Series, SeriesState, Source
from nbia_sync.catalog.records import Claim, InstanceRecord
from nbia_sync.errors import CatalogError

SERIES = cast(Table, Series.__table__)
SOURCES = cast(Table, Source.__table__)
INSTANCES = cast(Table, Instance.__table__)
MAX_ERROR_CHARS = 2000

_CLAIM_COLUMNS = (
    SERIES.c.id, SERIES.c.source_id, SERIES.c.series_uid, SERIES.c.study_uid,
    SERIES.c.collection, SERIES.c.patient_id, SERIES.c.modality, SERIES.c.image_count,
    SERIES.c.file_size, SERIES.c.generation, SERIES.c.attempts, SERIES.c.placed_path,
)
# Columns that end a lease and return the series to the queue.
_UNLEASED: dict[str, Any] = {"lease_owner": None, "lease_expires_at": None}


class LeaseLostError(CatalogError):
    """The series is no longer ours to place: lease taken over, or the series changed."""


class PlacementGuard:
    """Handed to the caller of `placing`; `done()` records what was placed."""

    def __init__(self) -> None:
        self.instances: Sequence[InstanceRecord] | None = None
        self.placed_path: str | None = None
        self.bytes = 0

    def done(self, instances: Sequence[InstanceRecord], placed_path: str, bytes: int) -> None:
        self.instances = instances
        self.placed_path = placed_path
        self.bytes = bytes


def _ready_queries(now: datetime) -> list[Select[Any]]:
    """Claimable series, one index-friendly query per kind (an OR defeats the index).

    Backed-off retries first (they have waited), then expired leases, then new work.
    """
    return [
        select(SERIES.c.id).where(
            SERIES.c.state == SeriesState.PENDING, SERIES.c.next_try_at <= now
        ).order_by(SERIES.c.next_try_at),
        select(SERIES.c.id).where(
            SERIES.c.state == SeriesState.DOWNLOADING, SERIES.c.lease_expires_at < now
        ),
        # No ORDER BY: walking the (state, next_try_at) index already yields rows in
        # insertion order on SQLite, and sorting a million wanted rows per claim would not.
        select(SERIES.c.id).where(SERIES.c.state == SeriesState.WANTED),
    ]


async def _source_names(conn: AsyncConnection, ids: Collection[int]) -> dict[int, str]:
    rows = await conn.execute(select(SOURCES.c.id, SOURCES.c.name).where(SOURCES.c.id.in_(ids)))
    return {int(i): str(n) for i, n in rows}


async def claim(
    db: Database,
    owner: str,
    *,
    limit: int,
    lease_seconds: float,
    source_ids: Collection[int] | None = None,
) -> list[Claim]:
    if limit <= 0:
        return []

    async def op(conn: AsyncConnection) -> list[Claim]:
        now = utcnow()
        ids: list[int] = []
        for query in _ready_queries(now):
            if source_ids is not None:
                query = query.where(SERIES.c.source_id.in_(list(source_ids)))
            # SKIP LOCKED: concurrent claimers on PostgreSQL pass over each other's rows
            # instead of queueing; SQLite ignores it (BEGIN IMMEDIATE serialises us).
            query = query.limit(limit - len(ids)).with_for_update(skip_locked=True)
            ids.extend((await conn.execute(query)).scalars())
            if len(ids) >= limit:
                break
        if not ids:
            return []
        rows = (
            await conn.execute(
                update(SERIES)
                .where(SERIES.c.id.in_(ids))
                .values(
                    # Reclaiming an expired lease counts as an attempt: a series that
                    # kills its worker must not be retried forever.
                    attempts=SERIES.c.attempts
                    + case((SERIES.c.state == SeriesState.DOWNLOADING, 1), else_=0),
                    state=SeriesState.DOWNLOADING,
                    lease_owner=owner,
                    lease_expires_at=now + timedelta(seconds=lease_seconds),
                    updated_at=now,
                )
                .returning(*_CLAIM_COLUMNS)
            )
        ).all()
        names = await _source_names(conn, {r.source_id for r in rows})
        return sorted((_to_claim(r, names) for r in rows), key=lambda c: ids.index(c.series_id))

    return await db.run_write(op)


def _to_claim(row: Any, names: dict[int, str]) -> Claim:
    return Claim(
        series_id=row.id, source_id=row.source_id, source_name=names.get(row.source_id, ""),
        series_uid=row.series_uid, study_uid=row.study_uid, collection=row.collection,
        patient_id=row.patient_id, modality=row.modality, image_count=row.image_count,
        file_size=row.file_size, generation=row.generation, attempts=row.attempts,
        placed_path=row.placed_path,
    )


def _owned(series_id: int, owner: str) -> Any:
    return and_(
        SERIES.c.id == series_id,
        SERIES.c.state == SeriesState.DOWNLOADING,
        SERIES.c.lease_owner == owner,
    )


async def heartbeat(
    db: Database, owner: str, series_ids: Collection[int], lease_seconds: float
) -> set[int]:
    if not series_ids:
        return set()

    async def op(conn: AsyncConnection) -> set[int]:
        result = await conn.execute(
            update(SERIES)
            .where(
                SERIES.c.id.in_(list(series_ids)),
                SERIES.c.state == SeriesState.DOWNLOADING,
                SERIES.c.lease_owner == owner,
            )
            .values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds))
            .returning(SERIES.c.id)
        )
        return set(result.scalars())

    return await db.run_write(op)


async def _lock_owned_row(conn: AsyncConnection, claim: Claim, owner: str) -> Any:
    return (
        await conn.execute(
            select(SERIES.c.generation, SERIES.c.attempts)
            .where(_owned(claim.series_id, owner))
            .with_for_update()
        )
    ).first()


async def _requeue(conn: AsyncConnection, series_id: int) -> None:
    await conn.execute(
        update(SERIES)
        .where(SERIES.c.id == series_id)
        .values(state=SeriesState.WANTED, next_try_at=None, updated_at=utcnow(), **_UNLEASED)
    )


@contextlib.asynccontextmanager
async def placing(db: Database, claim: Claim, owner: str) -> AsyncIterator[PlacementGuard]:
    """Hold the series row while the caller renames files into the mirror.

    Not retried: the caller's block has side effects. The transaction is short (local
    renames only) but holds the SQLite write lock, so nothing slow belongs inside.
    """
    changed = False
    async with db.write() as conn:
        row = await _lock_owned_row(conn, claim, owner)
        if row is None:
            raise LeaseLostError(f"series {claim.series_uid}: lease no longer held by this worker")
        if row.generation != claim.generation:
            # The archive changed the series while we fetched it: queue the new version now
            # rather than leave it leased to us until the lease runs out.
            await _requeue(conn, claim.series_id)
            changed = True
        else:
            guard = PlacementGuard()
            yield guard
            if guard.instances is None or guard.placed_path is None:
                raise CatalogError("placing block ended without guard.done(): nothing recorded")
            await _complete(conn, claim, guard)
    if changed:
        raise LeaseLostError(f"series {claim.series_uid}: changed on the archive; re-queued")


async def _complete(conn: AsyncConnection, claim: Claim, guard: PlacementGuard) -> None:
    now = utcnow()
    await conn.execute(
        update(SERIES)
        .where(SERIES.c.id == claim.series_id)
        .values(
            state=SeriesState.DONE, downloads=SERIES.c.downloads + 1, last_error=None,
            next_try_at=None, bytes=guard.bytes, placed_path=guard.placed_path, placed_at=now,
            updated_at=now, **_UNLEASED,
        )
    )
    await conn.execute(delete(INSTANCES).where(INSTANCES.c.series_id == claim.series_id))
    if guard.instances:
        await conn.execute(
            insert(INSTANCES),
            [
                {"series_id": claim.series_id, "sop_uid": i.sop_uid, "md5": i.md5,
                 "size": i.size, "path": i.path}
                for i in guard.instances
            ],
        )


async def fail(
    db: Database,
    claim: Claim,
    owner: str,
    *,
    error: str,
    retryable: bool,
    max_attempts: int,
    delay: float,
) -> SeriesState:
    """Count a failed attempt; the state the series ends in (unchanged if not ours)."""

    async def op(conn: AsyncConnection) -> SeriesState:
        row = await _lock_owned_row(conn, claim, owner)
        if row is None:
            current = await conn.scalar(
                select(SERIES.c.state).where(SERIES.c.id == claim.series_id)
            )
            return SeriesState(current) if current is not None else SeriesState.WANTED
        if row.generation != claim.generation:
            # A failure fetching a version that no longer exists says nothing about the new one.
            await _requeue(conn, claim.series_id)
            return SeriesState.WANTED
        now = utcnow()
        attempts = row.attempts + 1
        give_up = not retryable or attempts >= max_attempts
        state = SeriesState.FAILED if give_up else SeriesState.PENDING
        await conn.execute(
            update(SERIES)
            .where(SERIES.c.id == claim.series_id)
            .values(
                state=state, attempts=attempts, last_error=error[:MAX_ERROR_CHARS],
                next_try_at=None if give_up else now + timedelta(seconds=max(0.0, delay)),
                updated_at=now, **_UNLEASED,
            )
        )
        return state

    return await db.run_write(op)


async def release(db: Database, claim: Claim, owner: str) -> bool:
    """Give a series back without counting an attempt; False if it was not ours."""

    async def op(conn: AsyncConnection) -> bool:
        result = await conn.execute(
            update(SERIES)
            .where(_owned(claim.series_id, owner))
            .values(state=SeriesState.WANTED, next_try_at=None, updated_at=utcnow(), **_UNLEASED)
        )
        return result.rowcount > 0

    return await db.run_write(op)


async def release_leases(db: Database, owner: str) -> int:
    async def op(conn: AsyncConnection) -> int:
        result = await conn.execute(
            update(SERIES)
            .where(SERIES.c.state == SeriesState.DOWNLOADING, SERIES.c.lease_owner == owner)
            .values(state=SeriesState.WANTED, next_try_at=None, updated_at=utcnow(), **_UNLEASED)
        )
        return int(result.rowcount)

    return await db.run_write(op)


async def retry_failed(db: Database, source_id: int | None = None) -> int:
    async def op(conn: AsyncConnection) -> int:
        stmt = update(SERIES).where(SERIES.c.state == SeriesState.FAILED)
        if source_id is not None:
            stmt = stmt.where(SERIES.c.source_id == source_id)
        result = await conn.execute(
            stmt.values(
                state=SeriesState.WANTED, attempts=0, next_try_at=None, last_error=None,
                updated_at=utcnow(),
            )
        )
        return int(result.rowcount)

    return await db.run_write(op)


async def next_ready_at(db: Database, source_ids: Collection[int] | None = None) -> datetime | None:
    """When more work becomes claimable: now if any is wanted; None if nothing is left."""

    async def op(conn: AsyncConnection) -> datetime | None:
        def scoped(query: Select[Any]) -> Select[Any]:
            if source_ids is None:
                return query
            return query.where(SERIES.c.source_id.in_(list(source_ids)))

        wanted = await conn.scalar(
            scoped(select(SERIES.c.id).where(SERIES.c.state == SeriesState.WANTED).limit(1))
        )
        if wanted is not None:
            return utcnow()
        times = [
            await conn.scalar(
                scoped(
                    select(func.min(SERIES.c.next_try_at)).where(
                        SERIES.c.state == SeriesState.PENDING
                    )
                )
            ),
            await conn.scalar(
                scoped(
                    select(func.min(SERIES.c.lease_expires_at)).where(
                        SERIES.c.state == SeriesState.DOWNLOADING
                    )
                )
            ),
        ]
        found = [t for t in times if t is not None]
        return min(found) if found else None

    return await db.run_read(op)
