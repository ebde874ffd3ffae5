"""One sync pass: start the run, join the fleet, discover each source once per fleet,
drain the queue, leave the fleet, finish the run.

The pass owns the run row and one client per source; the fleet bookkeeping (worker row,
heartbeat, liveness, discovery locks, giving the work back however the pass ends) is
the Membership it joins (catalog/membership.py).
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
from nbia_sync.catalog.membership import Membership
from nbia_sync.catalog.models import SeriesState
from nbia_sync.catalog.records import RunCounts
from nbia_sync.catalog.repository import Catalog
from nbia_sync.causes import network_cause, without_source
from nbia_sync.config import Settings, SourceSettings
from nbia_sync.discovery import DiscoveryOptions, DiscoveryReport, discover
from nbia_sync.errors import (
    ArchiveError,
    CatalogError,
    ConfigError,
    DiskSpaceError,
    NbiaSyncError,
    SourceUnusableError,
)
from nbia_sync.outcome import Outcome
from nbia_sync.progress import ProgressSink
from nbia_sync.storage import Mirror
from nbia_sync.transfer.pool import DrainReport, drain
from nbia_sync.withdrawals import remove_withdrawn

log = structlog.get_logger(__name__)


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
    """Start the run, join the fleet, discover each source once per fleet, drain the
    queue, leave the fleet, finish the run. `stop` set (a signal) ends the pass early as
    INTERRUPTED.

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
    log.info("pass_started", run_id=run_id, owner=owner, command=command)

    outcome, error = Outcome.ERROR, None
    tally = _Tally()
    counts: Mapping[SeriesState, tuple[int, int]] = {}
    try:
        async with catalog.fleet.join(
            settings, owner=owner, host=host, pid=pid, run_id=run_id, on_heartbeat=on_heartbeat
        ) as me:
            try:
                await _work(settings, catalog, me, tally, progress, stop, options)
                counts = await catalog.state_counts()
                outcome = _outcome(counts, interrupted=stop.is_set())
            except (SourceError, DiskSpaceError, CatalogError) as exc:
                # The pass cannot go on; what was placed stays, the rest waits for the next.
                error = str(exc)
                log.error("pass_failed", run_id=run_id, error=error, kind=type(exc).__name__)
        if me.leave_error is not None:
            outcome, error = Outcome.ERROR, error or str(me.leave_error)
    except anyio.get_cancelled_exc_class():
        outcome = Outcome.INTERRUPTED
        raise
    finally:
        with anyio.CancelScope(shield=True):
            try:
                await catalog.fleet.finish_run(run_id, outcome, tally.run_counts(counts))
            except CatalogError as exc:
                # Likely the error that stopped the pass again. The pass ends as an
                # error either way.
                log.error("pass_close_failed", run_id=run_id, error=str(exc))
                outcome, error = Outcome.ERROR, error or str(exc)
    duration = clock.monotonic() - t0
    log.info(
        "pass_finished",
        run_id=run_id,
        outcome=outcome,
        discovered=tally.discovered,
        done=tally.done,
        bytes=tally.bytes,
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
        discovered=tally.discovered,
        done=tally.done,
        files=tally.files,
        failed=_count(counts, SeriesState.FAILED),
        remaining=_queued(counts),
        bytes=tally.bytes,
        discovery_skipped=tuple(tally.skipped),
        error=error,
        state_counts=counts,
    )


@dataclass
class _Tally:
    """What the pass did so far: right however far it got (filled in as it goes)."""

    discovered: int = 0
    done: int = 0
    files: int = 0
    bytes: int = 0
    bad_records: int = 0
    skipped: list[str] = field(default_factory=list)  # sources left to another process

    def run_counts(self, counts: Mapping[SeriesState, tuple[int, int]]) -> RunCounts:
        return RunCounts(
            discovered=self.discovered,
            queued=_queued(counts),
            done=self.done,
            failed=_count(counts, SeriesState.FAILED),
            bytes=self.bytes,
            skipped=self.bad_records,
        )


async def _work(
    settings: Settings,
    catalog: Catalog,
    me: Membership,
    tally: _Tally,
    progress: ProgressSink,
    stop: anyio.Event,
    options: DiscoveryOptions,
) -> None:
    """Clean staging, discover each source once per fleet, remove withdrawn files, drain."""
    mirror = Mirror(settings.mirror.root, catalog.clock)
    await mirror.clean_staging(await me.live_owners())
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
                settings, catalog, me, clients[source.name], source, stop, options
            )
            if found is None:
                tally.skipped.append(source.name)
            else:
                tally.discovered += found.queued
                tally.bad_records += found.skipped
        if settings.mirror.on_withdrawn == "delete" and not stop.is_set():
            await remove_withdrawn(catalog, mirror)
        if stop.is_set():
            return
        # Filled in as series are placed: counts stay right when the drain stops on an
        # error (disk full, catalog down).
        drained = DrainReport()
        try:
            await drain(
                settings=settings,
                catalog=catalog,
                clients=clients,
                mirror=mirror,
                owner=me.owner,
                progress=progress,
                stop=stop,
                report=drained,
            )
        except SourceUnusableError as exc:
            # The token could not be renewed mid-drain (password revoked, login outage),
            # or the certificate is no longer trusted: the claims went back, no series
            # was failed for it.
            raise SourceError(str(exc)) from exc
        finally:
            tally.done, tally.files, tally.bytes = drained.done, drained.files, drained.bytes


async def _discover_source(
    settings: Settings,
    catalog: Catalog,
    me: Membership,
    client: NbiaClient,
    source: SourceSettings,
    stop: anyio.Event,
    options: DiscoveryOptions | None = None,
) -> DiscoveryReport | None:
    """What discovery found, or None when discovery was left to another process (see
    Membership.discovering: a fleet discovers each source once)."""
    source_id = await catalog.sources.ensure_source(source)
    forced = options is not None and options.full  # `sync --full`: not someone else's
    async with me.discovering(source, source_id, forced=forced, stop=stop) as ours:
        if not ours:
            return None
        try:
            return await discover(catalog, client, source, source_id, settings.schedule, options)
        except (ArchiveError, ConfigError) as exc:
            # api/ turns every HTTP and socket failure into an ArchiveError; ConfigError:
            # a manifest of a manifest-limited source cannot be read.
            raise SourceError(describe_source_failure(source, exc)) from exc


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
