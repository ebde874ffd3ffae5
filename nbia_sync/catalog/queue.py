"""`Queue`: the work queue over the series table (`catalog.queue`): claim, heartbeat,
place, fail, release.

A claim is a lease (owner + expiry) on a series *generation*. Everything that ends a
lease re-checks, under a row lock, that the lease is still ours and the generation
unchanged, so a worker that was presumed dead, or that fetched a version of the series
the archive has since replaced, can never overwrite newer state.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Collection, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    Select,
    and_,
    bindparam,
    case,
    delete,
    func,
    insert,
    select,
    union_all,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.elements import BindParameter

from nbia_sync.catalog.db import Database
from nbia_sync.catalog.models import SeriesState
from nbia_sync.catalog.records import Claim, InstanceRecord
from nbia_sync.catalog.tables import INSTANCES, SERIES, SOURCES, batches
from nbia_sync.errors import CatalogError
from nbia_sync.redaction import redact_text

MAX_ERROR_CHARS = 2000

_CLAIM_COLUMNS = (
    SERIES.c.id,
    SERIES.c.source_id,
    SERIES.c.series_uid,
    SERIES.c.study_uid,
    SERIES.c.collection,
    SERIES.c.patient_id,
    SERIES.c.modality,
    SERIES.c.image_count,
    SERIES.c.file_size,
    SERIES.c.generation,
    SERIES.c.attempts,
    SERIES.c.placed_path,
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
        self.unverified = 0

    def done(
        self,
        instances: Sequence[InstanceRecord],
        placed_path: str,
        bytes: int,
        unverified: int = 0,
    ) -> None:
        """``unverified``: files accepted without an MD5 (the archive listed none)."""
        self.instances = instances
        self.placed_path = placed_path
        self.bytes = bytes
        self.unverified = unverified


class BatchPlacement:
    """Handed to the caller of `placing_many`.

    ``held``: the claims still ours at the same generation, their rows locked; the caller
    places their files, then calls ``done()`` for each one placed. ``lost``: the others,
    by series id, each with the LeaseLostError its worker should see (a changed series
    is re-queued in the same transaction). A held claim without ``done()`` is left as it
    was (still leased to the caller, e.g. to record a failure after its rename failed).
    """

    def __init__(self, held: list[Claim], lost: dict[int, LeaseLostError]) -> None:
        self.held = held
        self.lost = lost
        self.placed: dict[int, tuple[Claim, PlacementGuard]] = {}
        # New claims taken in the same transaction (``claim_next``), once it committed.
        self.claimed: list[Claim] = []

    def done(
        self,
        claim: Claim,
        instances: Sequence[InstanceRecord],
        placed_path: str,
        bytes: int,
        unverified: int = 0,
    ) -> None:
        if all(c.series_id != claim.series_id for c in self.held):
            raise CatalogError(f"series {claim.series_uid} is not held by this placement")
        guard = PlacementGuard()
        guard.done(instances, placed_path, bytes, unverified)
        self.placed[claim.series_id] = (claim, guard)


# The hot statements are built once, with bind parameters (building and cache-keying a
# statement per call cost more than running it): ``q_*`` names never clash with columns.
# Untyped: each takes the type of the column it meets (UTCDateTime for the times).
_NOW: BindParameter[Any] = bindparam("q_now")
_OWNER: BindParameter[Any] = bindparam("q_owner")
_EXPIRES: BindParameter[Any] = bindparam("q_expires")
_LIMIT: BindParameter[Any] = bindparam("q_limit")


def _ready_queries(scoped: bool) -> list[Select[Any]]:
    """Claimable series, one index-friendly query per kind (an OR defeats the index).

    Backed-off retries first (they have waited), then expired leases, then new work.
    ``scoped``: only the sources in the expanding parameter ``q_sources``.
    """
    queries = [
        select(SERIES.c.id)
        .where(SERIES.c.state == SeriesState.PENDING, SERIES.c.next_try_at <= _NOW)
        .order_by(SERIES.c.next_try_at),
        select(SERIES.c.id).where(
            SERIES.c.state == SeriesState.DOWNLOADING, SERIES.c.lease_expires_at < _NOW
        ),
        # No ORDER BY: walking the (state, next_try_at) index already yields rows in
        # insertion order on SQLite, and sorting a million wanted rows per claim would not.
        select(SERIES.c.id).where(SERIES.c.state == SeriesState.WANTED),
    ]
    if scoped:
        sources: BindParameter[Any] = bindparam("q_sources", expanding=True)
        queries = [q.where(SERIES.c.source_id.in_(sources)) for q in queries]
    return queries


def _lease(ids: Any) -> Any:
    """UPDATE ... RETURNING that leases the series ``ids`` selects to ``q_owner``."""
    return (
        update(SERIES)
        .where(SERIES.c.id.in_(ids))
        .values(
            # Reclaiming an expired lease counts as an attempt: a series that kills its
            # worker must not be retried forever.
            attempts=SERIES.c.attempts
            + case((SERIES.c.state == SeriesState.DOWNLOADING, 1), else_=0),
            state=SeriesState.DOWNLOADING,
            lease_owner=_OWNER,
            lease_expires_at=_EXPIRES,
            updated_at=_NOW,
        )
        .returning(*_CLAIM_COLUMNS)
    )


@functools.cache
def _claim_statements(dialect: str, scoped: bool) -> tuple[Any, ...]:
    """SQLite: one statement. PostgreSQL: the ready queries, then the lease update."""
    queries = _ready_queries(scoped)
    if dialect == "sqlite":
        # One statement instead of four: each kind of ready work stays its own
        # index-friendly subquery, UNION ALL keeps their priority under the LIMIT, and
        # BEGIN IMMEDIATE already serialises claimers (SQLite has no row locks to take).
        parts = [select(q.limit(_LIMIT).subquery().c.id) for q in queries]
        return (_lease(union_all(*parts).limit(_LIMIT).scalar_subquery()),)
    # SKIP LOCKED: concurrent claimers on PostgreSQL pass over each other's rows
    # instead of queueing.
    ready = tuple(q.limit(_LIMIT).with_for_update(skip_locked=True) for q in queries)
    return (*ready, _lease(bindparam("q_ids", expanding=True)))


def _source_names(conn: Connection, ids: Collection[int], cache: dict[int, str]) -> dict[int, str]:
    """Names of sources, read once per process (a statement less per claim)."""
    missing = [i for i in ids if i not in cache]
    if missing:
        rows = conn.execute(select(SOURCES.c.id, SOURCES.c.name).where(SOURCES.c.id.in_(missing)))
        cache.update({int(i): str(n) for i, n in rows})
    return cache


def _claim_in(
    conn: Connection,
    db: Database,
    owner: str,
    limit: int,
    lease_seconds: float,
    source_ids: Collection[int] | None,
) -> list[Claim]:
    """The claim, inside the caller's write transaction (a step of `Database.transaction`)."""
    now = db.clock.now()
    params: dict[str, Any] = {
        "q_now": now,
        "q_owner": owner,
        "q_expires": now + timedelta(seconds=lease_seconds),
        "q_limit": limit,
    }
    if source_ids is not None:
        params["q_sources"] = list(source_ids)
    *ready, lease = _claim_statements(conn.dialect.name, source_ids is not None)
    if not ready:
        rows = conn.execute(lease, params).all()
        order = {int(r.id): i for i, r in enumerate(sorted(rows, key=lambda r: r.id))}
    else:
        ids: list[int] = []
        for query in ready:
            ids.extend(conn.execute(query, {**params, "q_limit": limit - len(ids)}).scalars())
            if len(ids) >= limit:
                break
        if not ids:
            return []
        rows = conn.execute(lease, {**params, "q_ids": ids}).all()
        order = {series_id: i for i, series_id in enumerate(ids)}
    if not rows:
        return []
    names = _source_names(conn, {r.source_id for r in rows}, db.source_names)
    return sorted((_to_claim(r, names) for r in rows), key=lambda c: order[c.series_id])


def _to_claim(row: Any, names: dict[int, str]) -> Claim:
    return Claim(
        series_id=row.id,
        source_id=row.source_id,
        source_name=names.get(row.source_id, ""),
        series_uid=row.series_uid,
        study_uid=row.study_uid,
        collection=row.collection,
        patient_id=row.patient_id,
        modality=row.modality,
        image_count=row.image_count,
        file_size=row.file_size,
        generation=row.generation,
        attempts=row.attempts,
        placed_path=row.placed_path,
    )


_OWNED = and_(
    SERIES.c.id == bindparam("q_id"),
    SERIES.c.state == SeriesState.DOWNLOADING,
    SERIES.c.lease_owner == _OWNER,
)
_LOCK_OWNED = select(SERIES.c.generation, SERIES.c.attempts).where(_OWNED).with_for_update()
# Every lease and generation of a group commit, in one locking read.
_LOCK_HELD = (
    select(SERIES.c.id, SERIES.c.generation)
    .where(
        SERIES.c.id.in_(bindparam("q_ids", expanding=True)),
        SERIES.c.state == SeriesState.DOWNLOADING,
        SERIES.c.lease_owner == _OWNER,
    )
    .order_by(SERIES.c.id)  # one lock order for every placer (PostgreSQL)
    .with_for_update()
)
_REQUEUE = (
    update(SERIES)
    .where(SERIES.c.id.in_(bindparam("q_ids", expanding=True)))
    .values(state=SeriesState.WANTED, next_try_at=None, updated_at=_NOW, **_UNLEASED)
)
_RELEASE = (
    update(SERIES)
    .where(_OWNED)
    .values(state=SeriesState.WANTED, next_try_at=None, updated_at=_NOW, **_UNLEASED)
)
_FAIL = (
    update(SERIES)
    .where(SERIES.c.id == bindparam("q_id"))
    .values(
        state=bindparam("q_state"),
        attempts=bindparam("q_attempts"),
        last_error=bindparam("q_error"),
        next_try_at=bindparam("q_next_try"),
        updated_at=_NOW,
        **_UNLEASED,
    )
)
_STATE_OF = select(SERIES.c.state).where(SERIES.c.id == bindparam("q_id"))
_COMPLETE = (
    update(SERIES)
    .where(SERIES.c.id == bindparam("b_id"))
    .values(
        state=SeriesState.DONE,
        downloads=SERIES.c.downloads + 1,
        last_error=None,
        next_try_at=None,
        bytes=bindparam("b_bytes"),
        unverified_files=bindparam("b_unverified"),
        placed_path=bindparam("b_path"),
        placed_at=bindparam("b_now"),
        updated_at=bindparam("b_now"),
        **_UNLEASED,
    )
)
_DROP_INSTANCES = delete(INSTANCES).where(
    INSTANCES.c.series_id.in_(bindparam("q_ids", expanding=True))
)
_ADD_INSTANCES = insert(INSTANCES)


def _check_leases(
    conn: Connection, claims: Sequence[Claim], owner: str, now: datetime
) -> tuple[list[Claim], dict[int, LeaseLostError]]:
    """The first step of a group commit: which claims are still ours at the same
    generation (their rows now locked); the others, each with its worker's error (a
    changed series is re-queued in the same transaction)."""
    ids = sorted({c.series_id for c in claims})
    generations: dict[int, int] = {}
    if ids:
        rows = conn.execute(_LOCK_HELD, {"q_ids": ids, "q_owner": owner})
        generations = {int(r.id): int(r.generation) for r in rows}
    held: list[Claim] = []
    lost: dict[int, LeaseLostError] = {}
    changed: list[int] = []
    for c in claims:
        gen = generations.get(c.series_id)
        if gen is None:
            lost[c.series_id] = LeaseLostError(
                f"series {c.series_uid}: lease no longer held by this worker"
            )
        elif gen != c.generation:
            changed.append(c.series_id)
            lost[c.series_id] = LeaseLostError(
                f"series {c.series_uid}: changed on the archive; re-queued"
            )
        else:
            held.append(c)
    if changed:
        conn.execute(_REQUEUE, {"q_ids": changed, "q_now": now})
    return held, lost


def _complete_many(
    conn: Connection, placed: Sequence[tuple[Claim, PlacementGuard]], now: datetime
) -> None:
    """Mark series done and replace their instances: three statements for any number."""
    if not placed:
        return
    conn.execute(
        _COMPLETE,
        [
            {
                "b_id": c.series_id,
                "b_bytes": g.bytes,
                "b_unverified": g.unverified,
                "b_path": g.placed_path,
                "b_now": now,
            }
            for c, g in placed
        ],
    )
    # Instances exist only for a series placed before (completion writes them together
    # with placed_path, and only the lease holder completes): a first placement has none.
    replaced = [c.series_id for c, _ in placed if c.placed_path is not None]
    if replaced:
        conn.execute(_DROP_INSTANCES, {"q_ids": replaced})
    rows = [
        {
            "series_id": c.series_id,
            "sop_uid": i.sop_uid,
            "md5": i.md5,
            "size": i.size,
            "path": i.path,
        }
        for c, g in placed
        for i in g.instances or ()
    ]
    if rows:
        conn.execute(_ADD_INSTANCES, rows)


def _fail(
    conn: Connection,
    db: Database,
    claim: Claim,
    owner: str,
    error: str,
    retryable: bool,
    max_attempts: int,
    delay: float,
) -> SeriesState:
    row = conn.execute(_LOCK_OWNED, {"q_id": claim.series_id, "q_owner": owner}).first()
    now = db.clock.now()
    if row is None:
        current = conn.execute(_STATE_OF, {"q_id": claim.series_id}).scalar()
        return SeriesState(current) if current is not None else SeriesState.WANTED
    if row.generation != claim.generation:
        # A failure fetching a version that no longer exists says nothing about the new one.
        conn.execute(_REQUEUE, {"q_ids": [claim.series_id], "q_now": now})
        return SeriesState.WANTED
    attempts = row.attempts + 1
    give_up = not retryable or attempts >= max_attempts
    state = SeriesState.FAILED if give_up else SeriesState.PENDING
    conn.execute(
        _FAIL,
        {
            "q_id": claim.series_id,
            "q_state": state,
            "q_attempts": attempts,
            "q_error": redact_text(error)[:MAX_ERROR_CHARS],  # before cutting: no fragments
            "q_next_try": None if give_up else now + _retry_delay(delay),
            "q_now": now,
        },
    )
    return state


def _release(conn: Connection, db: Database, claim: Claim, owner: str) -> bool:
    params = {"q_id": claim.series_id, "q_owner": owner, "q_now": db.clock.now()}
    return conn.execute(_RELEASE, params).rowcount > 0


def _finish_batch(
    conn: Connection,
    db: Database,
    placed: Sequence[tuple[Claim, PlacementGuard]],
    owner: str,
    claim_next: int,
    lease_seconds: float,
    source_ids: Collection[int] | None,
) -> list[Claim]:
    """The last step of a group commit: record the placed series, claim the next ones."""
    _complete_many(conn, placed, db.clock.now())
    if claim_next <= 0:
        return []
    return _claim_in(conn, db, owner, claim_next, lease_seconds, source_ids)


def _retry_delay(seconds: float) -> timedelta:
    # Clamped (and NaN-proof): a delay from a hostile Retry-After must not overflow datetime.
    return timedelta(seconds=min(max(0.0, seconds), 366 * 24 * 3600.0))


class Queue:
    """The work queue: claims are leases on series generations (see the module doc)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def claim(
        self,
        owner: str,
        *,
        limit: int,
        lease_seconds: float,
        source_ids: Collection[int] | None = None,
    ) -> list[Claim]:
        if limit <= 0:
            return []
        return await self._db.run_write_sync(
            _claim_in, self._db, owner, limit, lease_seconds, source_ids
        )

    async def heartbeat(
        self, owner: str, series_ids: Collection[int], lease_seconds: float
    ) -> set[int]:
        """Extend our leases on ``series_ids``; the ids still ours (the others are lost).

        Never waits for a row lock on PostgreSQL: a row another transaction holds (our own
        group commit placing it, typically, which keeps its rows locked across renames and
        directory fsyncs) is skipped, not queued behind; a heartbeat that waited there would
        stop renewing every other in-flight lease for as long as the placement lasts. A
        skipped row counts as held if its last committed state is ours: the lock holder is
        finishing it, or it is re-checked on the next beat (and every placement re-checks
        ownership under the row lock anyway). SQLite has no row locks: one writer at a time.
        """
        if not series_ids:
            return set()
        ids = list(series_ids)
        mine = and_(
            SERIES.c.id.in_(ids),
            SERIES.c.state == SeriesState.DOWNLOADING,
            SERIES.c.lease_owner == owner,
        )

        async def op(conn: AsyncConnection) -> set[int]:
            expires = self._db.clock.now() + timedelta(seconds=lease_seconds)
            if conn.dialect.name == "sqlite":
                result = await conn.execute(
                    update(SERIES)
                    .where(mine)
                    .values(lease_expires_at=expires)
                    .returning(SERIES.c.id)
                )
                return set(result.scalars())
            free = select(SERIES.c.id).where(mine).with_for_update(skip_locked=True)
            result = await conn.execute(
                update(SERIES)
                .where(SERIES.c.id.in_(free.scalar_subquery()))
                .values(lease_expires_at=expires)
                .returning(SERIES.c.id)
            )
            held = set(result.scalars())
            if len(held) < len(ids):
                # A plain read never waits on row locks: rows locked by someone else, as
                # last committed.
                held.update(
                    (
                        await conn.execute(
                            select(SERIES.c.id).where(mine, SERIES.c.id.not_in(held))
                        )
                    ).scalars()
                )
            return held

        return await self._db.run_write(op)

    @contextlib.asynccontextmanager
    async def placing(self, claim: Claim, owner: str) -> AsyncIterator[PlacementGuard]:
        """`placing_many` for one series: hold its row while the caller renames its files.

        Raises LeaseLostError before the block runs if the lease is gone or the series
        changed on the archive (re-queued, committed). The block must call ``guard.done()``.
        """
        lost: LeaseLostError | None = None
        async with self.placing_many([claim], owner) as batch:
            lost = batch.lost.get(claim.series_id)
            if lost is None:
                guard = PlacementGuard()
                yield guard
                if guard.instances is None or guard.placed_path is None:
                    raise CatalogError("placing block ended without guard.done(): nothing recorded")
                batch.done(claim, guard.instances, guard.placed_path, guard.bytes, guard.unverified)
        if lost is not None:
            raise lost

    @contextlib.asynccontextmanager
    async def placing_many(
        self,
        claims: Sequence[Claim],
        owner: str,
        *,
        claim_next: int = 0,
        lease_seconds: float = 0.0,
        source_ids: Collection[int] | None = None,
    ) -> AsyncIterator[BatchPlacement]:
        """`placing` for several series in one transaction (a group commit).

        One locking read checks every lease and generation; the caller renames the held
        series into the mirror inside the block, and every ``done()`` is recorded with a few
        multi-row statements before the one commit. A lost lease or a changed series affects
        only that series (reported in ``lost``), never the others. If the block raises, the
        whole transaction rolls back (re-queues included), as with `placing`.

        ``claim_next``: also `claim` up to that many series (``lease_seconds``,
        ``source_ids`` as there) in the same transaction, for the workers this placement
        frees; they are in ``claimed`` after the block. Saves a transaction per batch.
        """
        async with self._db.catalog_errors(), self._db.transaction() as txn:
            held, lost = await txn.step(_check_leases, claims, owner, self._db.clock.now())
            batch = BatchPlacement(held, lost)
            yield batch
            claimed = await txn.last(
                _finish_batch,
                self._db,
                list(batch.placed.values()),
                owner,
                claim_next,
                lease_seconds,
                source_ids,
            )
        batch.claimed = claimed  # only now: a rolled-back claim must never be handed out

    async def fail(
        self,
        claim: Claim,
        owner: str,
        *,
        error: str,
        retryable: bool,
        max_attempts: int,
        delay: float,
    ) -> SeriesState:
        """Count a failed attempt; the state the series ends in (unchanged if not ours)."""

        return await self._db.run_write_sync(
            _fail, self._db, claim, owner, error, retryable, max_attempts, delay
        )

    async def release(self, claim: Claim, owner: str) -> bool:
        """Give a series back without counting an attempt; False if it was not ours."""
        return await self._db.run_write_sync(_release, self._db, claim, owner)

    async def release_leases(self, owner: str) -> int:
        async def op(conn: AsyncConnection) -> int:
            result = await conn.execute(
                update(SERIES)
                .where(SERIES.c.state == SeriesState.DOWNLOADING, SERIES.c.lease_owner == owner)
                .values(
                    state=SeriesState.WANTED,
                    next_try_at=None,
                    updated_at=self._db.clock.now(),
                    **_UNLEASED,
                )
            )
            return int(result.rowcount)

        return await self._db.run_write(op)

    async def retry_failed(self, source_id: int | None = None) -> int:
        async def op(conn: AsyncConnection) -> int:
            stmt = update(SERIES).where(SERIES.c.state == SeriesState.FAILED)
            if source_id is not None:
                stmt = stmt.where(SERIES.c.source_id == source_id)
            result = await conn.execute(
                stmt.values(
                    state=SeriesState.WANTED,
                    attempts=0,
                    next_try_at=None,
                    last_error=None,
                    updated_at=self._db.clock.now(),
                )
            )
            return int(result.rowcount)

        return await self._db.run_write(op)

    async def next_ready_at(self, source_ids: Collection[int] | None = None) -> datetime | None:
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
                return self._db.clock.now()
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

        return await self._db.run_read(op)

    async def requeue_done(self, uids: Sequence[str], reason: str) -> int:
        """Queue placed series again (verify --repair): the next pass downloads them afresh
        and places them over the damaged copy."""
        total = 0
        for batch in batches(sorted(set(uids))):

            async def op(conn: AsyncConnection, batch: list[str] = batch) -> int:
                result = await conn.execute(
                    update(SERIES)
                    .where(SERIES.c.series_uid.in_(batch), SERIES.c.state == SeriesState.DONE)
                    .values(
                        state=SeriesState.WANTED,
                        attempts=0,
                        next_try_at=None,
                        last_error=reason,
                        updated_at=self._db.clock.now(),
                    )
                )
                return int(result.rowcount)

            total += await self._db.run_write(op)
        return total

    async def planned_files(self) -> int:
        """Files the queue's series hold, by the archive's image counts (progress totals)."""

        async def op(conn: AsyncConnection) -> int:
            total = await conn.scalar(
                select(func.coalesce(func.sum(SERIES.c.image_count), 0)).where(
                    SERIES.c.state.in_([SeriesState.WANTED, SeriesState.PENDING])
                )
            )
            return int(total or 0)

        return await self._db.run_read(op)
