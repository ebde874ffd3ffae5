"""Fleet bookkeeping: runs, live workers and named lease locks.

`Fleet` is the catalog's part for them (`catalog.fleet`); every method is one short
transaction; a process takes part in the fleet through `Fleet.join` (membership.py).
Locks are rows with an expiry (not PostgreSQL advisory locks) so the same code works on
SQLite and survives a holder that dies: its lease simply runs out.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import delete, func, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from nbia_sync.catalog.db import Database
from nbia_sync.catalog.membership import Membership, join
from nbia_sync.catalog.models import SeriesState
from nbia_sync.catalog.queue import Queue
from nbia_sync.catalog.records import RunCounts, RunInfo, WorkerInfo
from nbia_sync.catalog.tables import LOCKS, RUNS, SERIES, SOURCES, WORKERS, insert_for
from nbia_sync.clock import Clock
from nbia_sync.config import Settings

# ---- runs -------------------------------------------------------------------------------


# ---- workers ----------------------------------------------------------------------------


def process_start(pid: int) -> int | None:
    """The start time of process `pid` in clock ticks since boot (Linux: field 22 of
    /proc/<pid>/stat), or None when it cannot be read (no such process, not Linux).

    With the PID it names one process for good: a PID reused after a crash (or a reboot)
    comes with another start time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may itself hold spaces or ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    try:
        return int(fields[19])  # fields after the name start at field 3: 22 - 3 = 19
    except (IndexError, ValueError):
        return None


def process_gone(pid: int, started: int | None) -> bool:
    """True when no process `pid` runs on this host, or when the one that does is not the
    one that started at `started` (its PID was reused). Unknown start time: only a
    missing PID counts as gone."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # it exists, under another user
    now = process_start(pid)
    return started is not None and now is not None and now != started


async def _workers(conn: AsyncConnection, now: datetime) -> list[WorkerInfo]:
    counted = await conn.execute(
        select(SERIES.c.lease_owner, func.count())
        .where(SERIES.c.state == SeriesState.DOWNLOADING)
        .group_by(SERIES.c.lease_owner)
    )
    in_flight = {str(lease_owner): int(n) for lease_owner, n in counted}
    rows = (await conn.execute(select(WORKERS).order_by(WORKERS.c.started_at))).all()
    return [
        WorkerInfo(
            owner=r.owner,
            host=r.host,
            pid=r.pid,
            run_id=r.run_id,
            started_at=r.started_at,
            heartbeat_at=r.heartbeat_at,
            heartbeat_age=max(0.0, (now - r.heartbeat_at).total_seconds()),
            in_flight=in_flight.get(r.owner, 0),
        )
        for r in rows
    ]


# ---- named locks ------------------------------------------------------------------------


class Fleet:
    """Runs, the workers of the fleet and named lease locks; `join` to take part."""

    def __init__(self, db: Database, *, queue: Queue) -> None:
        self._db = db
        # For members: leaving gives their leases back to the queue.
        self._queue = queue

    @property
    def clock(self) -> Clock:
        return self._db.clock

    def join(
        self,
        settings: Settings,
        *,
        owner: str,
        host: str,
        pid: int,
        run_id: str,
        on_heartbeat: Callable[[], None] | None = None,
    ) -> AbstractAsyncContextManager[Membership]:
        """Take part in the fleet for one pass (see membership.py)."""
        return join(
            self,
            self._queue,
            settings,
            owner=owner,
            host=host,
            pid=pid,
            run_id=run_id,
            on_heartbeat=on_heartbeat,
        )

    async def start_run(self, owner: str, command: str, run_id: str | None = None) -> str:
        # The engine may choose the id itself: its owner name (host:pid:run_id) embeds it.
        run_id = run_id or uuid.uuid4().hex

        async def op(conn: AsyncConnection) -> None:
            await conn.execute(
                insert(RUNS).values(
                    run_id=run_id,
                    owner=owner,
                    command=command,
                    started_at=self._db.clock.now(),
                    discovered=0,
                    queued=0,
                    done=0,
                    failed=0,
                    bytes=0,
                )
            )

        await self._db.run_write(op)
        return run_id

    async def finish_run(self, run_id: str, outcome: str, counts: RunCounts) -> None:
        async def op(conn: AsyncConnection) -> None:
            await conn.execute(
                update(RUNS)
                .where(RUNS.c.run_id == run_id)
                .values(
                    finished_at=self._db.clock.now(),
                    outcome=outcome,
                    discovered=counts.discovered,
                    queued=counts.queued,
                    done=counts.done,
                    failed=counts.failed,
                    bytes=counts.bytes,
                    skipped=counts.skipped,
                )
            )

        await self._db.run_write(op)

    async def last_run(self) -> RunInfo | None:
        async def op(conn: AsyncConnection) -> RunInfo | None:
            row = (
                await conn.execute(
                    select(RUNS).order_by(RUNS.c.started_at.desc(), RUNS.c.id.desc())
                )
            ).first()
            if row is None:
                return None
            return RunInfo(
                run_id=row.run_id,
                owner=row.owner,
                command=row.command,
                started_at=row.started_at,
                finished_at=row.finished_at,
                outcome=row.outcome,
                discovered=row.discovered,
                queued=row.queued,
                done=row.done,
                failed=row.failed,
                bytes=row.bytes,
                skipped=row.skipped,
            )

        return await self._db.run_read(op)

    async def register_worker(self, owner: str, host: str, pid: int, run_id: str) -> None:
        # Only a process on this host can be told apart from a later one with its PID.
        started = process_start(pid) if host == socket.gethostname() else None

        async def op(conn: AsyncConnection) -> None:
            now = self._db.clock.now()
            # A restarted process may reuse an owner name: replace, do not fail.
            await conn.execute(delete(WORKERS).where(WORKERS.c.owner == owner))
            await conn.execute(
                insert(WORKERS).values(
                    owner=owner,
                    host=host,
                    pid=pid,
                    run_id=run_id,
                    started_at=now,
                    heartbeat_at=now,
                    process_start=started,
                )
            )

        await self._db.run_write(op)

    async def worker_heartbeat(self, owner: str) -> bool:
        """Returns False when the row is gone (someone cleaned us up as dead)."""

        async def op(conn: AsyncConnection) -> bool:
            result = await conn.execute(
                update(WORKERS)
                .where(WORKERS.c.owner == owner)
                .values(heartbeat_at=self._db.clock.now())
            )
            return result.rowcount > 0

        return await self._db.run_write(op)

    async def unregister_worker(self, owner: str) -> None:
        async def op(conn: AsyncConnection) -> None:
            await conn.execute(delete(WORKERS).where(WORKERS.c.owner == owner))

        await self._db.run_write(op)

    async def prune_workers(self, older_than: float) -> list[str]:
        """Delete the rows of workers that have not heartbeated for ``older_than`` seconds
        (processes killed without unregistering); returns their owners."""

        async def op(conn: AsyncConnection) -> list[str]:
            cutoff = self._db.clock.now() - timedelta(seconds=older_than)
            gone = await conn.execute(
                delete(WORKERS).where(WORKERS.c.heartbeat_at < cutoff).returning(WORKERS.c.owner)
            )
            return sorted(str(owner) for owner in gone.scalars())

        return await self._db.run_write(op)

    async def take_back_dead_local(self, host: str, own: str) -> list[str]:
        """Free at once what processes of this host that are gone (killed -9, crashed, or
        their PID now another process's) held: their leases expire now, so the next claim
        takes their series (counting an attempt, as any reclaim does), their locks are
        released and their worker rows deleted (so their staging is cleaned). Returns their
        owners. Processes of other hosts are left to their lease expiry.

        Safe only when one host name means one PID namespace: containers sharing a host
        name (`--uts=host`, `--network=host`) must not share a catalog.
        """

        async def read(conn: AsyncConnection) -> list[tuple[str, int, int | None]]:
            rows = await conn.execute(
                select(WORKERS.c.owner, WORKERS.c.pid, WORKERS.c.process_start).where(
                    WORKERS.c.host == host, WORKERS.c.owner != own
                )
            )
            return [(str(o), int(p), None if s is None else int(s)) for o, p, s in rows]

        dead = [
            owner
            for owner, pid, started in await self._db.run_read(read)
            if process_gone(pid, started)
        ]
        if not dead:
            return []

        async def op(conn: AsyncConnection) -> None:
            now = self._db.clock.now()
            await conn.execute(
                update(SERIES)
                .where(SERIES.c.state == SeriesState.DOWNLOADING, SERIES.c.lease_owner.in_(dead))
                .values(lease_expires_at=now - timedelta(seconds=1))
            )
            await conn.execute(delete(LOCKS).where(LOCKS.c.owner.in_(dead)))
            await conn.execute(delete(WORKERS).where(WORKERS.c.owner.in_(dead)))

        await self._db.run_write(op)
        return sorted(dead)

    async def workers(self) -> list[WorkerInfo]:
        return await self._db.run_read(lambda conn: _workers(conn, self._db.clock.now()))

    async def discovery_and_workers(
        self, source_id: int
    ) -> tuple[datetime | None, list[WorkerInfo]]:
        """When the source's last discovery committed, and the workers: one read."""

        async def op(conn: AsyncConnection) -> tuple[datetime | None, list[WorkerInfo]]:
            last = await conn.scalar(
                select(SOURCES.c.last_discovery_at).where(SOURCES.c.id == source_id)
            )
            return last, await _workers(conn, self._db.clock.now())

        return await self._db.run_read(op)

    async def try_lock(self, name: str, owner: str, ttl: float) -> bool:
        """Take (or re-take) a named lease; True when `owner` holds it afterwards."""

        async def op(conn: AsyncConnection) -> bool:
            now = self._db.clock.now()
            expires = now + timedelta(seconds=ttl)
            taken = await conn.execute(
                update(LOCKS)
                .where(LOCKS.c.name == name, or_(LOCKS.c.owner == owner, LOCKS.c.expires_at < now))
                .values(owner=owner, expires_at=expires)
            )
            if taken.rowcount > 0:
                return True
            # No row, or a live foreign one: insert-if-absent decides, race-free on both dialects.
            ins = insert_for("sqlite" if self._db.is_sqlite else "postgresql", LOCKS)
            created = await conn.execute(
                ins.values(name=name, owner=owner, expires_at=expires).on_conflict_do_nothing(
                    index_elements=["name"]
                )
            )
            return created.rowcount > 0

        return await self._db.run_write(op)

    async def renew_lock(self, name: str, owner: str, ttl: float) -> bool:
        async def op(conn: AsyncConnection) -> bool:
            result = await conn.execute(
                update(LOCKS)
                .where(LOCKS.c.name == name, LOCKS.c.owner == owner)
                .values(expires_at=self._db.clock.now() + timedelta(seconds=ttl))
            )
            return result.rowcount > 0

        return await self._db.run_write(op)

    async def lock_holder(self, name: str) -> str | None:
        """Who holds the named lease now (None when free or expired)."""

        async def op(conn: AsyncConnection) -> str | None:
            owner = await conn.scalar(
                select(LOCKS.c.owner).where(
                    LOCKS.c.name == name, LOCKS.c.expires_at >= self._db.clock.now()
                )
            )
            return None if owner is None else str(owner)

        return await self._db.run_read(op)

    async def unlock(self, name: str, owner: str) -> None:
        async def op(conn: AsyncConnection) -> None:
            await conn.execute(delete(LOCKS).where(LOCKS.c.name == name, LOCKS.c.owner == owner))

        await self._db.run_write(op)
