"""`Membership`: one process's place in the fleet for the length of one pass.

`async with catalog.fleet.join(settings, owner=..., host=..., pid=..., run_id=...) as me:`
registers the worker, keeps it (and the locks it holds) alive with a heartbeat in its own
task group, forgets workers dead for long and takes back at once what dead processes of
this host held. On the way out, however the block ends (shielded from cancellation), it
releases the locks and the leases still held and unregisters the worker.

Inside, `me` answers the fleet's questions with the timing limits read once from the
settings: who is live (`is_live`, `live_owners`), whether a source was discovered by the
fleet already (`discovered_by_fleet`), and whose turn it is to discover (`discovering`).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

import anyio
import structlog

from nbia_sync.clock import sleep_or_stop
from nbia_sync.config import Settings, SourceSettings, forget_workers_after, stale_after
from nbia_sync.errors import CatalogError, sole_error

if TYPE_CHECKING:
    from nbia_sync.catalog.fleet import Fleet
    from nbia_sync.catalog.queue import Queue

log = structlog.get_logger(__name__)

# How often a process waiting for a peer's discovery looks at the lock again (seconds).
DISCOVERY_WAIT_POLL = 0.25


def discovery_lock(source: SourceSettings) -> str:
    """The name of the lock a process holds while it discovers `source`."""
    return f"discovery:{source.name}"


def _skipped(source: SourceSettings, reason: str) -> None:
    log.info("discovery_skipped", source=source.name, reason=reason)


class Membership:
    def __init__(
        self,
        fleet: Fleet,
        queue: Queue,
        settings: Settings,
        *,
        owner: str,
        host: str,
        pid: int,
        run_id: str,
        on_heartbeat: Callable[[], None] | None = None,
    ) -> None:
        self.owner, self.host, self.pid, self.run_id = owner, host, pid, run_id
        self._fleet, self._queue = fleet, queue
        self._clock = fleet.clock
        self._on_heartbeat = on_heartbeat
        # Seconds without a heartbeat after which a worker counts as dead.
        self.stale_after = stale_after(settings)
        # Long enough to survive missed heartbeats, short enough that a crashed holder's
        # lock frees itself soon.
        self.lock_ttl = self.stale_after
        self.forget_after = forget_workers_after(settings)
        self.heartbeat_interval = settings.transfer.heartbeat_interval
        # A fleet's discovery is as fresh as our own within one poll interval.
        self.fresh_for = settings.schedule.poll_interval
        self.held_locks: set[str] = set()
        # Set when leaving the fleet failed (the catalog is down, likely): what is left
        # expires on its own.
        self.leave_error: CatalogError | None = None

    # ---- liveness -----------------------------------------------------------------------

    async def is_live(self, owner: str) -> bool:
        return any(
            w.owner == owner and w.is_live(self.stale_after) for w in await self._fleet.workers()
        )

    async def live_owners(self) -> set[str]:
        """Owners whose staging must be kept: ours and every worker with a fresh heartbeat."""
        workers = await self._fleet.workers()
        return {self.owner} | {w.owner for w in workers if w.is_live(self.stale_after)}

    # ---- discovering each source once per fleet -----------------------------------------

    async def discovered_by_fleet(self, source_id: int) -> bool:
        """A discovery of the source committed while every live pass of the fleet (ours
        included) was running, and within the poll interval: as fresh as one we would run.

        Processes started together share one discovery even when some start late; a
        process that runs after the others have finished (a later sync, the daemon's next
        pass) discovers for itself.
        """
        last, workers = await self._fleet.discovery_and_workers(source_id)
        if last is None:
            return False
        if (self._clock.now() - last).total_seconds() >= self.fresh_for:
            return False
        starts = [w.started_at for w in workers if w.is_live(self.stale_after)]
        return bool(starts) and last >= min(starts)

    @contextlib.asynccontextmanager
    async def discovering(
        self, source: SourceSettings, source_id: int, *, forced: bool, stop: anyio.Event
    ) -> AsyncIterator[bool]:
        """True inside: this process holds the source's discovery lock and is to discover
        it now. False: leave it (the fleet discovered it already, a dead holder's lock
        has not run out yet, or `stop` was set while waiting).

        A process that finds the lock held by a live peer waits for that discovery to
        commit (so its drain sees the series) instead of draining an empty queue.
        `forced` (`sync --full`): a discovery of the fleet's does not count.
        """
        lock = discovery_lock(source)
        ours = await self._wait_for_lock(lock, source, source_id, forced=forced, stop=stop)
        if not ours:
            yield False
            return
        self.held_locks.add(lock)
        try:
            if not forced and await self.discovered_by_fleet(source_id):
                # Committed between our check and our lock: do not repeat it.
                _skipped(source, "discovered by another process of this fleet")
                yield False
            else:
                yield True
        finally:
            self.held_locks.discard(lock)
            with anyio.CancelScope(shield=True):
                await self._fleet.unlock(lock, self.owner)

    async def _wait_for_lock(
        self, lock: str, source: SourceSettings, source_id: int, *, forced: bool, stop: anyio.Event
    ) -> bool:
        while True:
            if not forced and await self.discovered_by_fleet(source_id):
                _skipped(source, "discovered by another process of this fleet")
                return False
            if await self._fleet.try_lock(lock, self.owner, self.lock_ttl):
                return True
            holder = await self._fleet.lock_holder(lock)
            if holder is not None and not await self.is_live(holder):
                # A dead holder: its lease runs out and the next pass discovers.
                _skipped(source, "another process holds the lock")
                return False
            if stop.is_set():
                return False
            log.debug("discovery_waiting", source=source.name, holder=holder)
            await sleep_or_stop(self._clock, DISCOVERY_WAIT_POLL, stop)

    # ---- joining and leaving ------------------------------------------------------------

    async def _heartbeat(self) -> None:
        """Keep the worker row (and any lock held) alive; the pool renews series leases."""
        while True:
            await self._clock.sleep(self.heartbeat_interval)
            try:
                alive = await self._fleet.worker_heartbeat(self.owner)
                for lock in list(self.held_locks):
                    await self._fleet.renew_lock(lock, self.owner, self.lock_ttl)
            except Exception as exc:  # a catalog hiccup must not kill the pass; retry next beat
                log.warning("heartbeat_failed", error=str(exc))
                continue
            if not alive:
                log.warning("worker_row_missing", owner=self.owner)
            if self._on_heartbeat is not None:
                self._on_heartbeat()

    async def _forget_dead_workers(self) -> None:
        """Drop the rows of processes killed long ago (they never unregister): `status`
        shows a dead process as STALE for `forget_after`, then no more.
        Housekeeping only: a failure here must not fail the pass."""
        try:
            gone = await self._fleet.prune_workers(self.forget_after)
        except CatalogError as exc:
            log.warning("worker_prune_failed", error=str(exc))
            return
        if gone:
            log.info("dead_workers_forgotten", owners=gone)

    async def _take_back_dead_local(self) -> None:
        """Leases of this host's processes that are gone (kill -9, crash) are freed now
        rather than when they expire. Housekeeping: a failure must not fail the pass."""
        try:
            gone = await self._fleet.take_back_dead_local(self.host, self.owner)
        except CatalogError as exc:
            log.warning("dead_local_takeback_failed", error=str(exc))
            return
        if gone:
            log.info("dead_local_workers_taken_back", owners=gone)

    async def _leave(self) -> None:
        try:
            for lock in list(self.held_locks):
                await self._fleet.unlock(lock, self.owner)
            await self._queue.release_leases(self.owner)
            await self._fleet.unregister_worker(self.owner)
        except CatalogError as exc:
            # Likely the error that stopped the pass again; leases and the worker row
            # expire on their own.
            log.error("fleet_leave_failed", owner=self.owner, error=str(exc))
            self.leave_error = exc


@contextlib.asynccontextmanager
async def join(
    fleet: Fleet,
    queue: Queue,
    settings: Settings,
    *,
    owner: str,
    host: str,
    pid: int,
    run_id: str,
    on_heartbeat: Callable[[], None] | None = None,
) -> AsyncIterator[Membership]:
    """See the module doc; `Fleet.join` is the way in."""
    me = Membership(
        fleet,
        queue,
        settings,
        owner=owner,
        host=host,
        pid=pid,
        run_id=run_id,
        on_heartbeat=on_heartbeat,
    )
    await fleet.register_worker(owner, host, pid, run_id)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(me._heartbeat)
            try:
                await me._forget_dead_workers()
                await me._take_back_dead_local()
                yield me
            finally:
                tg.cancel_scope.cancel()  # the heartbeat ends with the work
    except ExceptionGroup as group:
        # The task group wraps even one error of the block (a bug): raise that one.
        raise sole_error(group) from None
    finally:
        # Shielded: a cancelled pass must still give its work back to the fleet.
        with anyio.CancelScope(shield=True):
            await me._leave()
