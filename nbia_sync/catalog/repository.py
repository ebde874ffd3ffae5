"""`Catalog`: the one object the rest of nbia-sync uses to read and change the catalog.

A façade: the SQL lives in upsert.py (discovery results), queue.py (the work queue) and
fleet.py (runs, workers, locks); this module adds sources, reports and opening/closing.
Every method is one short transaction (or a few, for batches) and never spans network I/O.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from types import TracebackType
from typing import Any, Self, cast

import structlog
from sqlalchemy import Table, func, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from nbia_sync.api.models import PatientInfo, SeriesInfo, StudyInfo
from nbia_sync.catalog import fleet, migrate, operations, queue, upsert
from nbia_sync.catalog.db import Database, describe_url
from nbia_sync.catalog.models import Collection as CollectionRow
from nbia_sync.catalog.models import Instance, Series, SeriesState, Source
from nbia_sync.catalog.operations import PlacedWithdrawn, WithdrawnInfo
from nbia_sync.catalog.queue import BatchPlacement, PlacementGuard
from nbia_sync.catalog.records import (
    Claim,
    FailureInfo,
    InstanceRecord,
    RunCounts,
    RunInfo,
    UpsertResult,
    WorkerInfo,
)
from nbia_sync.clock import SYSTEM_CLOCK, Clock
from nbia_sync.config import SourceSettings
from nbia_sync.errors import CatalogError

log = structlog.get_logger(__name__)

SOURCES = cast(Table, Source.__table__)
SERIES = cast(Table, Series.__table__)
INSTANCES = cast(Table, Instance.__table__)
COLLECTIONS = cast(Table, CollectionRow.__table__)
# Series per page when streaming done instances (one short read transaction each).
_VERIFY_PAGE = 200


class Catalog:
    def __init__(self, db: Database) -> None:
        self._db = db

    # ---- lifecycle ----------------------------------------------------------------------

    @classmethod
    async def open(cls, url: str, *, clock: Clock = SYSTEM_CLOCK) -> Catalog:
        """Connect and migrate to the newest schema (CatalogError when impossible)."""
        db = await Database.connect(url, clock)
        try:
            await migrate.upgrade(db)
        except CatalogError:
            await db.dispose()
            raise
        except DBAPIError as exc:
            await db.dispose()
            raise CatalogError(
                f"cannot migrate the catalog ({describe_url(db.url)}): {type(exc.orig).__name__}"
            ) from None
        log.debug("catalog.opened", where=describe_url(db.url))
        return cls(db)

    async def close(self) -> None:
        await self._db.dispose()

    @property
    def clock(self) -> Clock:
        """The clock of every catalog timestamp; the engine compares against it."""
        return self._db.clock

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def database(self) -> Database:
        return self._db

    @property
    def description(self) -> str:
        return describe_url(self._db.url)

    # ---- sources ------------------------------------------------------------------------

    async def ensure_source(self, source: SourceSettings) -> int:
        """The source's id, creating its row (or updating its url/api) as needed."""

        async def op(conn: AsyncConnection) -> int:
            # Insert-if-absent first: fleet processes starting together must not collide.
            await conn.execute(
                upsert.insert_for(conn, SOURCES)
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

        return await self._db.run_write(op)

    async def get_watermark(self, source_id: int) -> datetime | None:
        return await self._source_column(source_id, SOURCES.c.watermark)

    async def last_full_listing_at(self, source_id: int) -> datetime | None:
        return await self._source_column(source_id, SOURCES.c.last_full_listing_at)

    async def last_discovery_at(self, source_id: int) -> datetime | None:
        """When a discovery of the source (by any process of the fleet) last committed."""
        return await self._source_column(source_id, SOURCES.c.last_discovery_at)

    async def _source_column(self, source_id: int, column: Any) -> datetime | None:
        async def op(conn: AsyncConnection) -> datetime | None:
            value = await conn.scalar(select(column).where(SOURCES.c.id == source_id))
            return cast(datetime | None, value)

        return await self._db.run_read(op)

    async def set_watermark(
        self, source_id: int, value: datetime | None, *, full_listing: bool = False
    ) -> None:
        """Record a committed discovery pass: its watermark (None keeps the old one)."""

        async def op(conn: AsyncConnection) -> None:
            now = self._db.clock.now()
            values: dict[str, Any] = {"last_discovery_at": now}
            if value is not None:
                values["watermark"] = upsert.as_utc(value)
            if full_listing:
                values["last_full_listing_at"] = now
            await conn.execute(update(SOURCES).where(SOURCES.c.id == source_id).values(**values))

        await self._db.run_write(op)

    # ---- discovery results --------------------------------------------------------------

    async def record_collections(self, source_id: int, names: Collection[str]) -> None:
        await upsert.record_collections(self._db, source_id, names)

    async def known_collections(self, source_id: int) -> list[str]:
        async def op(conn: AsyncConnection) -> list[str]:
            rows = await conn.execute(
                select(COLLECTIONS.c.name)
                .where(COLLECTIONS.c.source_id == source_id)
                .order_by(COLLECTIONS.c.name)
            )
            return [str(n) for n in rows.scalars()]

        return await self._db.run_read(op)

    async def record_patients(self, source_id: int, patients: list[PatientInfo]) -> None:
        await upsert.record_patients(self._db, source_id, patients)

    async def record_studies(self, source_id: int, studies: list[StudyInfo]) -> None:
        await upsert.record_studies(self._db, source_id, studies)

    async def upsert_series(
        self, source_id: int, series: Sequence[SeriesInfo], listing: upsert.Listing | None = None
    ) -> UpsertResult:
        return await upsert.upsert_series(self._db, source_id, series, listing)

    async def finish_listing(self, source_id: int, listing: upsert.Listing) -> UpsertResult:
        """End a discovery pass: hold its identity conflicts, apply its moves."""
        return await upsert.finish_listing(self._db, source_id, listing)

    # ---- the work queue -----------------------------------------------------------------

    async def claim(
        self,
        owner: str,
        *,
        limit: int,
        lease_seconds: float,
        source_ids: Collection[int] | None = None,
    ) -> list[Claim]:
        return await queue.claim(
            self._db, owner, limit=limit, lease_seconds=lease_seconds, source_ids=source_ids
        )

    async def heartbeat(
        self, owner: str, series_ids: Collection[int], lease_seconds: float
    ) -> set[int]:
        return await queue.heartbeat(self._db, owner, series_ids, lease_seconds)

    def placing(self, claim: Claim, owner: str) -> AbstractAsyncContextManager[PlacementGuard]:
        return queue.placing(self._db, claim, owner)

    def placing_many(
        self,
        claims: Sequence[Claim],
        owner: str,
        *,
        claim_next: int = 0,
        lease_seconds: float = 0.0,
        source_ids: Collection[int] | None = None,
    ) -> AbstractAsyncContextManager[BatchPlacement]:
        """`placing` for several series in one transaction, optionally claiming the
        next ones in it too (see queue.placing_many)."""
        return queue.placing_many(
            self._db,
            claims,
            owner,
            claim_next=claim_next,
            lease_seconds=lease_seconds,
            source_ids=source_ids,
        )

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
        return await queue.fail(
            self._db,
            claim,
            owner,
            error=error,
            retryable=retryable,
            max_attempts=max_attempts,
            delay=delay,
        )

    async def release(self, claim: Claim, owner: str) -> bool:
        return await queue.release(self._db, claim, owner)

    async def release_leases(self, owner: str) -> int:
        return await queue.release_leases(self._db, owner)

    async def retry_failed(self, source_id: int | None = None) -> int:
        return await queue.retry_failed(self._db, source_id)

    async def next_ready_at(self, source_ids: Collection[int] | None = None) -> datetime | None:
        return await queue.next_ready_at(self._db, source_ids)

    # ---- operator jobs: withdrawals, repairs, manifests (see operations.py) --------------

    async def held_in_collection(
        self, source_id: int, collection: str, patients: Collection[str] = ()
    ) -> set[str]:
        return await operations.held_in_collection(self._db, source_id, collection, patients)

    async def withdraw(self, source_id: int, collection: str, uids: Sequence[str]) -> int:
        return await operations.withdraw(self._db, source_id, collection, uids)

    async def withdrawn(self) -> list[WithdrawnInfo]:
        return await operations.withdrawn(self._db)

    async def placed_withdrawn(self) -> list[PlacedWithdrawn]:
        return await operations.placed_withdrawn(self._db)

    async def forget_placement(self, series_id: int) -> bool:
        return await operations.forget_placement(self._db, series_id)

    async def requeue_done(self, uids: Sequence[str], reason: str) -> int:
        return await operations.requeue_done(self._db, uids, reason)

    async def series_states(self, source_id: int, uids: Sequence[str]) -> dict[str, SeriesState]:
        return await operations.series_states(self._db, source_id, uids)

    async def planned_files(self) -> int:
        return await operations.planned_files(self._db)

    # ---- reports ------------------------------------------------------------------------

    async def state_counts(self) -> dict[SeriesState, tuple[int, int]]:
        """Per state: (series, bytes) — bytes placed when done, else the archive's size."""

        async def op(conn: AsyncConnection) -> dict[SeriesState, tuple[int, int]]:
            size = func.coalesce(SERIES.c.bytes, SERIES.c.file_size, 0)
            rows = await conn.execute(
                select(SERIES.c.state, func.count(), func.coalesce(func.sum(size), 0)).group_by(
                    SERIES.c.state
                )
            )
            counts = {state: (0, 0) for state in SeriesState}
            for state, n, total in rows:
                counts[SeriesState(state)] = (int(n), int(total))
            return counts

        return await self._db.run_read(op)

    async def unverified_files(self) -> tuple[int, int]:
        """(series, files) placed without an MD5 check: the archive listed a blank hash."""

        async def op(conn: AsyncConnection) -> tuple[int, int]:
            row = (
                await conn.execute(
                    select(func.count(), func.coalesce(func.sum(SERIES.c.unverified_files), 0))
                    .select_from(SERIES)
                    .where(SERIES.c.unverified_files > 0)
                )
            ).one()
            return int(row[0]), int(row[1])

        return await self._db.run_read(op)

    async def failures(self, limit: int = 50) -> list[FailureInfo]:
        """Series that failed for good, those backing off after an error, and identity
        conflicts (their reason as last_error); newest first."""

        async def op(conn: AsyncConnection) -> list[FailureInfo]:
            rows = await conn.execute(
                select(
                    SERIES.c.series_uid,
                    SOURCES.c.name,
                    SERIES.c.collection,
                    SERIES.c.state,
                    SERIES.c.attempts,
                    func.coalesce(SERIES.c.conflict, SERIES.c.last_error).label("last_error"),
                    SERIES.c.next_try_at,
                )
                .join(SOURCES, SOURCES.c.id == SERIES.c.source_id)
                .where(
                    SERIES.c.state.in_(
                        [SeriesState.FAILED, SeriesState.PENDING, SeriesState.CONFLICT]
                    )
                )
                .order_by(SERIES.c.updated_at.desc())
                .limit(limit)
            )
            return [
                FailureInfo(
                    series_uid=r.series_uid,
                    source_name=r.name,
                    collection=r.collection,
                    state=SeriesState(r.state),
                    attempts=r.attempts,
                    last_error=r.last_error,
                    next_try_at=r.next_try_at,
                )
                for r in rows
            ]

        return await self._db.run_read(op)

    async def iter_done_instances(self) -> AsyncIterator[tuple[str, list[InstanceRecord]]]:
        """Every done series with its instances, a page at a time (for `verify`)."""
        after = 0
        while True:

            async def page(
                conn: AsyncConnection, after: int = after
            ) -> list[tuple[int, str, list[InstanceRecord]]]:
                series = (
                    await conn.execute(
                        select(SERIES.c.id, SERIES.c.series_uid)
                        # Withdrawn series kept in the mirror are checked too, and so are
                        # the files a held conflict had placed.
                        .where(
                            SERIES.c.state.in_(
                                [SeriesState.DONE, SeriesState.WITHDRAWN, SeriesState.CONFLICT]
                            ),
                            SERIES.c.placed_path.is_not(None),
                            SERIES.c.id > after,
                        )
                        .order_by(SERIES.c.id)
                        .limit(_VERIFY_PAGE)
                    )
                ).all()
                found: dict[int, list[InstanceRecord]] = {sid: [] for sid, _ in series}
                if series:
                    rows = await conn.execute(
                        select(INSTANCES)
                        .where(INSTANCES.c.series_id.in_(list(found)))
                        .order_by(INSTANCES.c.series_id, INSTANCES.c.sop_uid)
                    )
                    for r in rows:
                        found[r.series_id].append(InstanceRecord(r.sop_uid, r.md5, r.size, r.path))
                return [(sid, uid, found[sid]) for sid, uid in series]

            batch = await self._db.run_read(page)
            if not batch:
                return
            for _sid, uid, instances in batch:
                yield uid, instances
            after = batch[-1][0]

    # ---- runs, workers, locks -----------------------------------------------------------

    async def start_run(self, owner: str, command: str, run_id: str | None = None) -> str:
        return await fleet.start_run(self._db, owner, command, run_id)

    async def finish_run(self, run_id: str, outcome: str, counts: RunCounts) -> None:
        await fleet.finish_run(self._db, run_id, outcome, counts)

    async def last_run(self) -> RunInfo | None:
        return await fleet.last_run(self._db)

    async def register_worker(self, owner: str, host: str, pid: int, run_id: str) -> None:
        await fleet.register_worker(self._db, owner, host, pid, run_id)

    async def worker_heartbeat(self, owner: str) -> bool:
        return await fleet.worker_heartbeat(self._db, owner)

    async def take_back_dead_local(self, host: str, own: str) -> list[str]:
        return await fleet.take_back_dead_local(self._db, host, own)

    async def unregister_worker(self, owner: str) -> None:
        await fleet.unregister_worker(self._db, owner)

    async def workers(self) -> list[WorkerInfo]:
        return await fleet.workers(self._db)

    async def prune_workers(self, older_than: float) -> list[str]:
        return await fleet.prune_workers(self._db, older_than)

    async def try_lock(self, name: str, owner: str, ttl: float) -> bool:
        return await fleet.try_lock(self._db, name, owner, ttl)

    async def renew_lock(self, name: str, owner: str, ttl: float) -> bool:
        return await fleet.renew_lock(self._db, name, owner, ttl)

    async def lock_holder(self, name: str) -> str | None:
        return await fleet.lock_holder(self._db, name)

    async def unlock(self, name: str, owner: str) -> None:
        await fleet.unlock(self._db, name, owner)
