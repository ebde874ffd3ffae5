"""`Catalog`: the one object the rest of nbia-sync opens to read and change the catalog.

It exposes its parts, each bound to the same Database: `catalog.sources` (what each
source lists: sources.py), `catalog.queue` (the work queue: queue.py) and
`catalog.fleet` (runs, workers, locks, membership: fleet.py). This module keeps opening
and closing, the clock and the whole-catalog reports. Every method is one short
transaction (or a few, for batches) and never spans network I/O.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import TracebackType
from typing import Self

import structlog
from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from nbia_sync.catalog import migrate
from nbia_sync.catalog.db import Database, describe_url
from nbia_sync.catalog.fleet import Fleet
from nbia_sync.catalog.models import SeriesState
from nbia_sync.catalog.queue import Queue
from nbia_sync.catalog.records import FailureInfo, InstanceRecord
from nbia_sync.catalog.sources import Sources
from nbia_sync.catalog.tables import INSTANCES, SERIES, SOURCES
from nbia_sync.clock import SYSTEM_CLOCK, Clock
from nbia_sync.errors import CatalogError

log = structlog.get_logger(__name__)

# Series per page when streaming done instances (one short read transaction each).
_VERIFY_PAGE = 200


class Catalog:
    def __init__(self, db: Database) -> None:
        self._db = db
        self.sources = Sources(db)
        self.queue = Queue(db)
        self.fleet = Fleet(db, queue=self.queue)

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
