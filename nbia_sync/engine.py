"""One sync pass: discover each source (under the fleet's lock), then drain the queue.

The pass owns the bookkeeping around the work: the run row, the worker row and its
heartbeat, one client per source, the discovery locks, and the clean-up that must happen
however the pass ends (leases released, worker unregistered, run row closed).
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

import anyio
import structlog

from nbia_sync.api.client import NbiaClient
from nbia_sync.catalog.models import SeriesState
from nbia_sync.catalog.records import RunCounts
from nbia_sync.catalog.repository import Catalog
from nbia_sync.causes import network_cause, without_source
from nbia_sync.clock import sleep_or_stop
from nbia_sync.config import Settings, SourceSettings, forget_workers_after, stale_after
from nbia_sync.discovery import DiscoveryOptions, DiscoveryReport, discover
from nbia_sync.errors import (
    ArchiveError,
    AuthError,
    CatalogError,
    ConfigError,
    DiskSpaceError,
    NbiaSyncError,
    sole_error,
)
from nbia_sync.outcome import Outcome
from nbia_sync.progress import ProgressSink
from nbia_sync.storage import Mirror
from nbia_sync.transfer.pool import DrainReport, drain
from nbia_sync.withdrawals import remove_withdrawn

log = structlog.get_logger(__name__)

# How often a process waiting for a peer's discovery looks at the lock again (seconds).
_DISCOVERY_WAIT_POLL = 0.25


class SourceError(NbiaSyncError):
    """A source could not be used at all this pass (unreachable, credentials refused)."""


@dataclass(frozen=True, slots=True)
class PassReport:
    run_id: str
    owner: str
    command: str
    outcome: Outcome
    started_at: datetime
    duration: float  # seconds
    discovered: int = 0  # series new or changed at the archive
    done: int = 0  # series placed by this pass
    files: int = 0  # files placed by this pass
    failed: int = 0  # series in state failed after the pass (whole catalog)
    remaining: int = 0  # series still wanted or pending after the pass
    bytes: int = 0  # bytes placed by this pass
    discovery_skipped: tuple[str, ...] = ()  # sources another process was discovering
    error: str | None = None  # what stopped the pass, for Outcome.ERROR
    state_counts: Mapping[SeriesState, tuple[int, int]] = field(default_factory=dict)


def make_owner(run_id: str | None = None, host: str | None = None, pid: int | None = None) -> str:
    """The fleet-wide identity of one pass of one process: host:pid:run_id.

    The same string names the worker row, the leases and the staging directory, so a
    stale one can be traced to its host, process and run.
    """
    run_id = run_id or uuid.uuid4().hex
    return f"{host or socket.gethostname()}:{os.getpid() if pid is None else pid}:{run_id}"


def run_id_of(owner: str) -> str:
    return owner.rsplit(":", 1)[-1]


def discovery_lock(source: SourceSettings) -> str:
    return f"discovery:{source.name}"


def describe_source_failure(source: SourceSettings, exc: BaseException) -> str:
    """One line naming the source and the problem; never a token (messages carry none).
    A network failure is said in plain words, without the request and library details."""
    detail = network_cause(exc) or without_source(str(exc), source.name) or type(exc).__name__
    return f"source {source.name!r} ({source.url}): {detail}"


async def run_pass(
    settings: Settings,
    catalog: Catalog,
    *,
    owner: str | None = None,
    progress: ProgressSink,
    stop: anyio.Event,
    command: str = "sync",
    on_heartbeat: Callable[[], None] | None = None,
    full: bool = False,
    allow_mass_withdrawal: bool = False,
) -> PassReport:
    """Discover then drain. `stop` set (a signal) ends the pass early as INTERRUPTED.

    `owner` is normally left None (a fresh host:pid:run_id); `on_heartbeat` is called
    after every successful worker heartbeat (the daemon's liveness signal). `full`
    forces a full listing now (`sync --full`), see discovery for withdrawals.
    """
    clock = catalog.clock
    options = DiscoveryOptions(
        full=full,
        allow_mass_withdrawal=allow_mass_withdrawal,
        max_withdrawn_share=settings.mirror.max_withdrawn_share,
    )
    host, pid = socket.gethostname(), os.getpid()
    owner = owner or make_owner(host=host, pid=pid)
    run_id = await catalog.fleet.start_run(owner, command, run_id_of(owner))
    started_at, t0 = clock.now(), clock.monotonic()
    held_locks: set[str] = set()
    log.info("pass_started", run_id=run_id, owner=owner, command=command)
    await catalog.fleet.register_worker(owner, host, pid, run_id)

    outcome, error = Outcome.ERROR, None
    discovered = done = files = placed_bytes = bad_records = 0
    skipped: list[str] = []
    counts: Mapping[SeriesState, tuple[int, int]] = {}
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_heartbeat, settings, catalog, owner, held_locks, on_heartbeat)
            try:
                await _forget_dead_workers(settings, catalog)
                await _take_back_dead_local(catalog, host, owner)
                mirror = Mirror(settings.mirror.root)
                await mirror.clean_staging(await _live_owners(settings, catalog, owner))
                async with contextlib.AsyncExitStack() as stack:
                    clients: dict[str, NbiaClient] = {}
                    for source in settings.sources:
                        clients[source.name] = await stack.enter_async_context(
                            NbiaClient(source, settings.transfer)
                        )
                    for source in settings.sources:
                        if stop.is_set():
                            break
                        found = await _discover_source(
                            settings,
                            catalog,
                            clients[source.name],
                            source,
                            owner,
                            held_locks,
                            stop,
                            options,
                        )
                        if found is None:
                            skipped.append(source.name)
                        else:
                            discovered += found.queued
                            bad_records += found.skipped
                    if settings.mirror.on_withdrawn == "delete" and not stop.is_set():
                        await remove_withdrawn(catalog, mirror)
                    if not stop.is_set():
                        # Filled in as series are placed: counts stay right when the drain
                        # stops on an error (disk full, catalog down).
                        drained = DrainReport()
                        try:
                            await drain(
                                settings=settings,
                                catalog=catalog,
                                clients=clients,
                                mirror=mirror,
                                owner=owner,
                                progress=progress,
                                stop=stop,
                                report=drained,
                            )
                        except AuthError as exc:
                            # The token could not be renewed mid-drain (password revoked,
                            # login outage): the claims went back, no series was failed for it.
                            raise SourceError(str(exc)) from exc
                        finally:
                            done, files, placed_bytes = drained.done, drained.files, drained.bytes
                counts = await catalog.state_counts()
                outcome = _outcome(counts, interrupted=stop.is_set())
            except (SourceError, DiskSpaceError, CatalogError) as exc:
                # The pass cannot go on; what was placed stays, the rest waits for the next.
                error = str(exc)
                log.error("pass_failed", run_id=run_id, error=error, kind=type(exc).__name__)
            finally:
                tg.cancel_scope.cancel()  # the heartbeat ends with the work
    except ExceptionGroup as group:
        # The task group wraps even one error (a bug): raise that one.
        raise sole_error(group) from None
    except anyio.get_cancelled_exc_class():
        outcome = Outcome.INTERRUPTED
        raise
    finally:
        # Shielded: a cancelled pass must still give its work back to the fleet.
        with anyio.CancelScope(shield=True):
            try:
                await _close_pass(
                    catalog,
                    run_id,
                    owner,
                    held_locks,
                    outcome,
                    counts,
                    RunCounts(
                        discovered=discovered,
                        queued=_queued(counts),
                        done=done,
                        failed=_count(counts, SeriesState.FAILED),
                        bytes=placed_bytes,
                        skipped=bad_records,
                    ),
                )
            except CatalogError as exc:
                # Likely the error that stopped the pass again; leases and the worker row
                # expire on their own. The pass ends as an error either way.
                log.error("pass_close_failed", run_id=run_id, error=str(exc))
                outcome, error = Outcome.ERROR, error or str(exc)
    duration = clock.monotonic() - t0
    log.info(
        "pass_finished",
        run_id=run_id,
        outcome=outcome,
        discovered=discovered,
        done=done,
        bytes=placed_bytes,
        failed=_count(counts, SeriesState.FAILED),
        seconds=round(duration, 3),
    )
    return PassReport(
        run_id=run_id,
        owner=owner,
        command=command,
        outcome=outcome,
        started_at=started_at,
        duration=duration,
        discovered=discovered,
        done=done,
        files=files,
        failed=_count(counts, SeriesState.FAILED),
        remaining=_queued(counts),
        bytes=placed_bytes,
        discovery_skipped=tuple(skipped),
        error=error,
        state_counts=counts,
    )


async def _discover_source(
    settings: Settings,
    catalog: Catalog,
    client: NbiaClient,
    source: SourceSettings,
    owner: str,
    held_locks: set[str],
    stop: anyio.Event,
    options: DiscoveryOptions | None = None,
) -> DiscoveryReport | None:
    """What discovery found, or None when discovery was left to another process.

    A fleet discovers each source once: a process that finds the lock held by a live
    peer waits for that discovery to commit (so its drain sees the series) instead of
    draining an empty queue, and a discovery already committed while the fleet's current
    passes run (and less than a poll interval ago) is not repeated. A lock left by a dead
    holder is skipped as before: its lease runs out and the next pass discovers.
    """
    lock = discovery_lock(source)
    source_id = await catalog.sources.ensure_source(source)
    forced = options is not None and options.full  # `sync --full`: not someone else's
    while True:
        if not forced and await _discovered_by_fleet(settings, catalog, source_id):
            log.info(
                "discovery_skipped",
                source=source.name,
                reason="discovered by another process of this fleet",
            )
            return None
        if await catalog.fleet.try_lock(lock, owner, _lock_ttl(settings)):
            break
        holder = await catalog.fleet.lock_holder(lock)
        if holder is not None and not await _is_live(settings, catalog, holder):
            log.info(
                "discovery_skipped", source=source.name, reason="another process holds the lock"
            )
            return None
        if stop.is_set():
            return None
        log.debug("discovery_waiting", source=source.name, holder=holder)
        await sleep_or_stop(catalog.clock, _DISCOVERY_WAIT_POLL, stop)
    held_locks.add(lock)
    try:
        if not forced and await _discovered_by_fleet(settings, catalog, source_id):
            # Committed between our check and our lock: do not repeat it.
            log.info(
                "discovery_skipped",
                source=source.name,
                reason="discovered by another process of this fleet",
            )
            return None
        report = await discover(catalog, client, source, source_id, settings.schedule, options)
    except (ArchiveError, ConfigError) as exc:
        # api/ turns every HTTP and socket failure into an ArchiveError; ConfigError: a
        # manifest of a manifest-limited source cannot be read.
        raise SourceError(describe_source_failure(source, exc)) from exc
    finally:
        held_locks.discard(lock)
        with anyio.CancelScope(shield=True):
            await catalog.fleet.unlock(lock, owner)
    return report


async def _is_live(settings: Settings, catalog: Catalog, owner: str) -> bool:
    limit = stale_after(settings)
    return any(w.owner == owner and w.heartbeat_age < limit for w in await catalog.fleet.workers())


async def _discovered_by_fleet(settings: Settings, catalog: Catalog, source_id: int) -> bool:
    """A discovery of the source committed while every live pass of the fleet (ours
    included) was running, and within the poll interval: as fresh as one we would run.

    Processes started together share one discovery even when some start late; a process
    that runs after the others have finished (a later sync, the daemon's next pass)
    discovers for itself.
    """
    last = await catalog.sources.last_discovery_at(source_id)
    if last is None:
        return False
    if (catalog.clock.now() - last).total_seconds() >= settings.schedule.poll_interval:
        return False
    limit = stale_after(settings)
    starts = [w.started_at for w in await catalog.fleet.workers() if w.heartbeat_age < limit]
    return bool(starts) and last >= min(starts)


async def _heartbeat(
    settings: Settings,
    catalog: Catalog,
    owner: str,
    held_locks: set[str],
    on_heartbeat: Callable[[], None] | None,
) -> None:
    """Keep the worker row (and any discovery lock) alive; the pool renews series leases."""
    while True:
        await catalog.clock.sleep(settings.transfer.heartbeat_interval)
        try:
            alive = await catalog.fleet.worker_heartbeat(owner)
            for lock in list(held_locks):
                await catalog.fleet.renew_lock(lock, owner, _lock_ttl(settings))
        except Exception as exc:  # a catalog hiccup must not kill the pass; the next beat retries
            log.warning("heartbeat_failed", error=str(exc))
            continue
        if not alive:
            log.warning("worker_row_missing", owner=owner)
        if on_heartbeat is not None:
            on_heartbeat()


async def _forget_dead_workers(settings: Settings, catalog: Catalog) -> None:
    """Drop the rows of processes killed long ago (they never unregister): `status`
    shows a dead process as STALE for `forget_workers_after`, then no more.
    Housekeeping only: a failure here must not fail the pass."""
    try:
        gone = await catalog.fleet.prune_workers(forget_workers_after(settings))
    except CatalogError as exc:
        log.warning("worker_prune_failed", error=str(exc))
        return
    if gone:
        log.info("dead_workers_forgotten", owners=gone)


async def _take_back_dead_local(catalog: Catalog, host: str, own: str) -> None:
    """Leases of this host's processes that are gone (kill -9, crash) are freed now
    rather than when they expire. Housekeeping: a failure must not fail the pass."""
    try:
        gone = await catalog.fleet.take_back_dead_local(host, own)
    except CatalogError as exc:
        log.warning("dead_local_takeback_failed", error=str(exc))
        return
    if gone:
        log.info("dead_local_workers_taken_back", owners=gone)


async def _live_owners(settings: Settings, catalog: Catalog, own: str) -> set[str]:
    """Owners whose staging must be kept: ours and every worker with a fresh heartbeat."""
    limit = stale_after(settings)
    return {own} | {w.owner for w in await catalog.fleet.workers() if w.heartbeat_age < limit}


async def _close_pass(
    catalog: Catalog,
    run_id: str,
    owner: str,
    held_locks: set[str],
    outcome: Outcome,
    counts: Mapping[SeriesState, tuple[int, int]],
    run_counts: RunCounts,
) -> None:
    for lock in list(held_locks):
        await catalog.fleet.unlock(lock, owner)
    await catalog.queue.release_leases(owner)
    await catalog.fleet.finish_run(run_id, outcome, run_counts)
    await catalog.fleet.unregister_worker(owner)


def _lock_ttl(settings: Settings) -> float:
    # Long enough to survive missed heartbeats, short enough that a crashed holder's
    # lock frees itself soon.
    return stale_after(settings)


def _count(counts: Mapping[SeriesState, tuple[int, int]], state: SeriesState) -> int:
    return counts.get(state, (0, 0))[0]


def _queued(counts: Mapping[SeriesState, tuple[int, int]]) -> int:
    return _count(counts, SeriesState.WANTED) + _count(counts, SeriesState.PENDING)


def _outcome(counts: Mapping[SeriesState, tuple[int, int]], *, interrupted: bool) -> Outcome:
    if interrupted:
        return Outcome.INTERRUPTED
    # A held identity conflict needs the user as much as a failed series does.
    if _count(counts, SeriesState.FAILED) or _count(counts, SeriesState.CONFLICT):
        return Outcome.FAILURES
    # Series other processes are downloading are theirs to finish; ours is done.
    if _queued(counts):
        return Outcome.INCOMPLETE
    return Outcome.OK
