"""The worker pool: drain the catalog's queue into the mirror.

Workers each loop: claim one series, reserve its disk space, fetch it into staging,
then place it and mark it done in one catalog transaction (``catalog.queue.placing_many``).
A worker holds a download slot (``transfer.workers`` in all, a source's
``max_connections`` each) only while it fetches; there are TASKS_PER_SLOT workers per
slot, so while some wait for their group commit others download (all of them hold claims
on small series, LARGE_CLAIMS_PER_SLOT per slot on larger ones). The
catalog decides retries (attempts and next-try times live there, so a restart resumes the
schedule); the pool only classifies failures by their exception class:

* RetryableError (IntegrityError included): counted, retried after the policy's delay;
* PermanentError (HostileArchiveError, no access): failed for good;
* DiskSpaceError / CatalogError / SourceUnusableError (the credentials cannot be
  renewed, the TLS certificate is not accepted): the claim is released, no attempt is
  counted, and the whole drain stops;
* LeaseLostError: someone else owns the series now; our copy is dropped.

The drain ends when nothing is claimable and nothing will be (``next_ready_at`` is None),
so backoffs are waited out. A heartbeat keeps the leases of in-flight series alive.

Catalog writes are batched, because for small series they, not the network, set the
pace (bench/README.md): one SQLite writer serialises every transaction.

* Claims: a worker that needs work and finds none prefetched takes the claim lock and
  claims, in one transaction, a series for every worker then idle; the others pick
  theirs from ``_prefetched`` (workers that queued on the lock meanwhile find theirs
  there). Prefetched claims are heartbeated like running ones, dropped if their lease is
  lost, and released when the drain stops or ends. A claim that comes back short marks
  the queue dry: until a notice (a job ended, a connection came free) or an idle wait
  that runs out, idle workers skip the claim that would come back short again.
* Completions (group commit): a worker with a verified series queues it and
  takes the place lock; whoever holds it places every queued series in one
  ``placing_many`` transaction (ownership and generation re-checked per series under the
  row locks, renames inside it, each directory fsynced once), then wakes their workers.
  A lost lease or a failed rename affects only that series.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import structlog

from nbia_sync.api.client import NbiaClient
from nbia_sync.api.retry import RetryPolicy
from nbia_sync.catalog import Catalog, Claim, InstanceRecord, LeaseLostError, SeriesState
from nbia_sync.config import Settings
from nbia_sync.errors import (
    CatalogError,
    DiskSpaceError,
    Interrupted,
    PermanentError,
    RetryableError,
    SourceUnusableError,
    sole_error,
)
from nbia_sync.progress import ProgressSink
from nbia_sync.storage import Mirror
from nbia_sync.transfer._ratelimit import TokenBucket
from nbia_sync.transfer.download import FetchedSeries, fetch_series, is_small

log = structlog.get_logger(__name__)

# Longest the polling worker (one per drain, see _wait_for_work) sleeps, with nothing in
# flight, before it asks the catalog again: other processes add or finish work without
# telling us. In a fleet this is how late a process notices that a peer finished the
# last series it was waiting for (bench/bench_fleet.py: 5 s here cost a 2-process fleet
# ~30 % of its wall time). One indexed read per IDLE_POLL per process is cheap.
IDLE_POLL = 0.2
MIN_IDLE_POLL = 0.05
# With series in flight (each wakes the idle workers when it ends), how long the poller
# waits before it claims again, and the other idle workers for a notice before one of
# them polls in case the poller left to run a series it claimed.
IDLE_WAIT = 1.0
# Most series placed in one catalog transaction (bounds the time the write lock is held:
# a few renames and directory fsyncs per series).
MAX_PLACE_BATCH = 64
# Worker tasks per download slot. A worker holds its source's connection slot only while
# it downloads: waiting for its series' group commit, it leaves the slot to another, and
# the commits grow (3,000 one-file series: 8 series a commit with 2 tasks a slot, 18 with
# 4; 5,000 on a machine with slow syscalls: 17.7 with 4, 37.6 with 8 and ~15 % less wall
# time; bench/README.md). On larger series (download.SMALL_SERIES_BYTES and up), where a
# commit is short beside a download, only LARGE_CLAIMS_PER_SLOT of them hold a claim (one
# downloading, one ready to start): more would only wait for a slot while holding series
# the other processes of a fleet could be downloading.
TASKS_PER_SLOT = 8
LARGE_CLAIMS_PER_SLOT = 2
# Small series (download.SMALL_SERIES_BYTES) skip the download's per-file fsyncs: their
# data is synced once per group commit (Mirror.place_many(unsynced=...)). Larger ones
# fsync each file as it completes, overlapping the transfer, so a commit never waits for
# their writeback.


@dataclass
class DrainReport:
    done: int = 0
    failed: int = 0  # failed for good during this drain
    retried: int = 0  # failed attempts scheduled for a later try
    lease_lost: int = 0
    bytes: int = 0  # placed in the mirror
    files: int = 0
    duration: float = 0.0
    interrupted: bool = False


@dataclass(eq=False)
class _Placement:
    """A verified series waiting for the group commit; ``error`` once ``settled``."""

    claim: Claim
    fetched: FetchedSeries
    final: Path
    where: str  # final as the catalog records it (Mirror.relative)
    instances: list[InstanceRecord]
    settled: bool = False
    error: BaseException | None = None


@dataclass(eq=False)
class _Job:
    claim: Claim
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    lost: bool = False


class _Drain:
    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        clients: Mapping[str, NbiaClient],
        mirror: Mirror,
        owner: str,
        progress: ProgressSink,
    ) -> None:
        self.settings = settings
        self.transfer = settings.transfer
        self.catalog = catalog
        self.clients = clients
        self.mirror = mirror
        self.owner = owner
        self.progress = progress
        self.policy = RetryPolicy.from_settings(settings.transfer)
        limit = settings.transfer.bandwidth_limit
        self.limiter = (
            TokenBucket(limit, burst=max(limit, settings.transfer.chunk_size), clock=catalog.clock)
            if limit
            else None
        )
        workers = settings.transfer.workers
        # asyncio's semaphores, lock and event for what every series passes through: an
        # anyio Semaphore or Lock yields to the loop once more on each acquire (its
        # checkpoint), and each anyio Event asks which event loop runs: 6-9 % of the wall
        # on one-file series (bench/README.md). Cancel scopes still cancel them.
        self.slots = {
            name: asyncio.Semaphore(settings.source(name).max_connections or workers)
            for name in clients
        }
        self.source_ids: dict[str, int] = {}
        # Downloads at once: at most `workers` in all, and each source's max_connections.
        self.downloads = asyncio.Semaphore(workers)
        self.jobs: dict[int, _Job] = {}
        self.tasks = TASKS_PER_SLOT * workers
        # Claimed for workers that have not picked them up yet (see the module doc).
        self._prefetched: deque[Claim] = deque()
        self._claim_lock = anyio.Lock()
        self._polling = False  # an idle worker is asking the catalog for all of them
        self._to_place: list[_Placement] = []
        self._place_lock = asyncio.Lock()
        # The last claim found fewer series than asked for: placements stop claiming
        # for their workers (a wasted query each) until a claim comes back full again.
        self._queue_dry = False
        # The notice current when a claim came back short: until the next notice (a job
        # ended, a connection came free) or an idle wait that times out, a claim would
        # come back short again, so idle workers skip it. Without this, once the queue
        # runs dry, every idle worker (TASKS_PER_SLOT per slot) asked the catalog after
        # each series that ended: 84 empty write transactions over the last round of 48
        # ~1 MB series.
        self._dry_mark: asyncio.Event | None = None
        # The series claimed last were all small: their group commits set the pace, so
        # every worker claims (see _claimers). Until a claim says so, fewer do.
        self._small_queue = False
        self.report = DrainReport()
        self.fatal: BaseException | None = None
        self._changed = asyncio.Event()  # something finished: idle workers look again
        self._finished = False
        self._scope = anyio.CancelScope()

    # -- orchestration ------------------------------------------------------------

    async def run(self, stop: anyio.Event | None) -> DrainReport:
        started = time.monotonic()
        for name in self.clients:
            self.source_ids[name] = await self.catalog.sources.ensure_source(
                self.settings.source(name)
            )
        await self._plan()
        try:
            async with anyio.create_task_group() as tg:
                self._scope = tg.cancel_scope
                tg.start_soon(self._heartbeat_loop)
                if stop is not None:
                    tg.start_soon(self._watch_stop, stop, tg.cancel_scope)
                async with anyio.create_task_group() as workers:
                    for _ in range(self.tasks):
                        workers.start_soon(self._worker)
                tg.cancel_scope.cancel()  # the workers are done: end heartbeat and watcher
        except ExceptionGroup as group:
            # A task group wraps even one error: raise that one (see errors.sole_error).
            raise sole_error(group) from None
        await self._release_prefetched()
        if self.report.interrupted or self.fatal is not None:
            with anyio.CancelScope(shield=True):
                # Claims taken by a cancelled claim() call we never saw come back.
                try:
                    await self.catalog.queue.release_leases(self.owner)
                except CatalogError as exc:  # the leases run out on their own
                    log.warning("release_failed", owner=self.owner, error=str(exc))
        self.report.duration = time.monotonic() - started
        if self.fatal is not None:
            raise self.fatal
        return self.report

    async def _plan(self) -> None:
        counts = await self.catalog.state_counts()
        waiting = [counts.get(s, (0, 0)) for s in (SeriesState.WANTED, SeriesState.PENDING)]
        files = await self.catalog.queue.planned_files()
        self.progress.plan(sum(n for n, _ in waiting), sum(b for _, b in waiting), files)

    async def _watch_stop(self, stop: anyio.Event, scope: anyio.CancelScope) -> None:
        await stop.wait()
        log.info("drain_stopping", in_flight=len(self.jobs))
        self.report.interrupted = True
        scope.cancel()

    def _abort(self, exc: BaseException) -> None:
        """Stop the whole drain with ``exc`` (the first fatal error wins)."""
        if self.fatal is None:
            self.fatal = exc
            log.error("drain_aborted", error=str(exc), kind=type(exc).__name__)
        self._finished = True
        self._scope.cancel()  # in-flight downloads stop now and give their claims back

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # -- workers --------------------------------------------------------------------

    async def _worker(self) -> None:
        while not self._finished:
            claim = await self._claim()
            if claim is None:
                if not await self._wait_for_work():
                    return
                continue
            await self._run_job(claim)

    def _claimers(self) -> int:
        """How many workers may hold a claim: all of them on small series (downloads
        outpace their commits), else LARGE_CLAIMS_PER_SLOT per download slot."""
        if self._small_queue:
            return self.tasks
        return LARGE_CLAIMS_PER_SLOT * self.transfer.workers

    def _claimed(self, *, short: bool, quiet: bool) -> None:
        """After a claim, and any notice it sent: ``short``, it found fewer series than
        it asked for; ``quiet``, no other notice came while it asked (see _dry_mark)."""
        self._queue_dry = short
        self._dry_mark = self._changed if short and quiet else None

    def _took(self, claims: list[Claim]) -> None:
        self._prefetched.extend(claims)
        if claims:
            self._small_queue = all(_small(c) for c in claims)

    def _take_prefetched(self) -> Claim | None:
        """A prefetched claim, preferring one whose source has a free connection slot."""
        for claim in self._prefetched:
            if not self.slots[claim.source_name].locked():
                self._prefetched.remove(claim)
                return claim
        return self._prefetched.popleft() if self._prefetched else None

    async def _claim(self) -> Claim | None:
        claim = self._take_prefetched()
        if claim is not None or self._dry_mark is self._changed:
            return claim
        async with self._claim_lock:
            # Workers that queued here while another claimed find their series ready.
            claim = self._take_prefetched()
            if claim is not None or self._finished or self._dry_mark is self._changed:
                return claim
            free = [self.source_ids[name] for name, sem in self.slots.items() if not sem.locked()]
            # One series for every worker not running a job (this one included) that may
            # hold one: they would each claim one right after us otherwise.
            idle = self._claimers() - len(self.jobs)
            if not free or self.downloads.locked() or idle <= 0:
                return None
            asked = self._changed
            try:
                # Every catalog call of the pool is shielded from cancellation: they are
                # short, and a transaction cut half way can leave the driver's connection
                # unusable (seen with aiosqlite), or a committed claim that we never saw.
                with anyio.CancelScope(shield=True):
                    claims = await self.catalog.queue.claim(
                        self.owner,
                        limit=idle,
                        lease_seconds=self.transfer.lease_seconds,
                        source_ids=free,
                    )
            except CatalogError as exc:
                self._abort(exc)
                return None
            quiet = self._changed is asked
            self._took(claims)
            if len(claims) > 1:
                self._notify()  # idle workers waiting in _wait_for_work: work is here
            self._claimed(short=len(claims) < idle, quiet=quiet)
            return self._take_prefetched()

    async def _release_prefetched(self) -> None:
        """Give back claims no worker started (a stop, an abort, or a worker gone)."""
        with anyio.CancelScope(shield=True):
            while self._prefetched:
                claim = self._prefetched.popleft()
                try:
                    await self.catalog.queue.release(claim, self.owner)
                except CatalogError as exc:
                    log.warning("release_failed", series_uid=claim.series_uid, error=str(exc))

    async def _wait_for_work(self) -> bool:
        """Wait until more work may be claimable; False when the drain is over.

        One idle worker at a time polls: with series in flight it claims again after
        IDLE_WAIT; with none, it asks the catalog what is left for all of them every
        IDLE_POLL and claims only once the catalog says a series is ready. The others
        wait for a notice (a series ended, a connection came free, claims were made for
        them), so a dry queue costs one poll at a time, not one claim per idle worker
        (TASKS_PER_SLOT per slot). If the poller claims a series and runs it, another
        takes over the polling within IDLE_WAIT."""
        if self._finished:
            return False
        changed = self._changed
        if self._prefetched:
            return True
        if self._polling:
            with anyio.move_on_after(IDLE_WAIT):
                await changed.wait()
            return not self._finished
        self._polling = True
        try:
            wait = IDLE_WAIT  # a running job will wake us sooner
            due = True  # with series in flight, only a claim can tell
            if not self.jobs:
                try:
                    with anyio.CancelScope(shield=True):  # see _claim
                        ready = await self.catalog.queue.next_ready_at(
                            list(self.source_ids.values())
                        )
                except CatalogError as exc:
                    self._abort(exc)
                    return False
                if ready is None:
                    # Nothing queued, nothing backing off, nothing in flight: done.
                    self._finished = True
                    self._notify()
                    return False
                wait = (ready - self.catalog.clock.now()).total_seconds()
                # Nothing is claimable before this sleep ends (a backoff, a peer's lease):
                # the next poll reads again instead of claiming (a write) for nothing.
                due = wait <= IDLE_POLL
                wait = min(wait, IDLE_POLL)
            with anyio.move_on_after(max(wait, MIN_IDLE_POLL)) as waited:
                await changed.wait()
        finally:
            self._polling = False
        if waited.cancelled_caught and due:
            # Time, not a notice: a backoff ran out, a lease expired, or another
            # process queued work. The next claim asks the catalog again.
            self._dry_mark = None
        return not self._finished

    async def _run_job(self, claim: Claim) -> None:
        job = _Job(claim)
        self.jobs[claim.series_id] = job
        try:
            await self._attempt(job)
        finally:
            del self.jobs[claim.series_id]
            self._notify()

    async def _attempt(self, job: _Job) -> None:
        claim = job.claim
        staging = self.mirror.staging_dir(self.owner, claim.series_uid)
        try:
            fetched: FetchedSeries | None = None
            with job.scope:
                async with self.slots[claim.source_name], self.downloads:
                    started = time.monotonic()
                    self.progress.series_started(claim.series_uid, claim.file_size)
                    # Reserved only while downloading: then the bytes are on the disk.
                    min_free = self.settings.mirror.min_free_bytes
                    async with self.mirror.reserve(claim.file_size, min_free):
                        # Larger series: every file fsynced as it completes, outside any
                        # catalog transaction; small ones are synced at the group commit
                        # (download.SMALL_SERIES_BYTES).
                        fetched = await fetch_series(
                            self.clients[claim.source_name],
                            claim,
                            staging,
                            chunk_size=self.transfer.chunk_size,
                            progress=self.progress,
                            limiter=self.limiter,
                            check_dicom=self.settings.mirror.check_dicom,
                            sync=not _small(claim),
                            inline=self.mirror.on_local_disk,
                        )
                self._notify()  # its connection is free: a waiting worker may claim
            if fetched is None or job.lost:
                raise LeaseLostError(f"series {claim.series_uid}: lease lost mid-download")
            with anyio.CancelScope(shield=True):
                # A finished download is placed even when a stop arrives now: the
                # renames and one commit take milliseconds.
                await self._place(claim, fetched)
        except LeaseLostError as exc:
            await self.mirror.remove_staging(staging)
            self.report.lease_lost += 1
            log.warning("series_lease_lost", series_uid=claim.series_uid, reason=str(exc))
            self._finish(claim, ok=False, files=0, error=exc)
        except (DiskSpaceError, CatalogError, SourceUnusableError) as exc:
            # Not this series' fault, and no other series will do better: give it back
            # (no attempt counted) and stop the drain. SourceUnusableError: the token
            # could not be renewed (password revoked, login outage) or the certificate is
            # not trusted, so every later download fails too.
            await self._give_back(claim, staging)
            self._finish(claim, ok=False, files=0, error=exc)
            self._abort(exc)
        except (RetryableError, PermanentError) as exc:
            await self.mirror.remove_staging(staging)
            await self._failed(claim, exc)
        except anyio.get_cancelled_exc_class():
            await self._give_back(claim, staging)
            self._finish(claim, ok=False, files=0, error=Interrupted("interrupted"))
            raise
        except Exception as exc:  # a bug or a local I/O error: count it, keep draining
            log.exception("series_crashed", series_uid=claim.series_uid)
            await self.mirror.remove_staging(staging)
            await self._failed(claim, exc)
        else:
            seconds = time.monotonic() - started
            self.report.done += 1
            self.report.files += len(fetched.files)
            self.report.bytes += fetched.size
            if fetched.unverified:
                log.warning(
                    "series_unverified_files",
                    series_uid=claim.series_uid,
                    files=fetched.unverified,
                    reason="the archive's hash list has no MD5 for them",
                )
            log.info(
                "series_done",
                series_uid=claim.series_uid,
                files=len(fetched.files),
                bytes=fetched.size,
                seconds=round(seconds, 3),
            )
            self._finish(claim, ok=True, files=len(fetched.files), error=None)

    async def _place(self, claim: Claim, fetched: FetchedSeries) -> None:
        mirror = self.mirror
        final = mirror.series_dir(
            claim.collection, claim.patient_id, claim.study_uid, claim.series_uid
        )
        where = mirror.relative(final)
        instances = [
            InstanceRecord(f.sop_uid, f.md5, f.size, f"{where}/{f.path.name}")
            for f in fetched.files
        ]
        item = _Placement(claim, fetched, final, where, instances)
        self._to_place.append(item)
        # Group commit: whoever holds the lock places everything queued so far, ours
        # included unless an earlier holder already did.
        async with self._place_lock:
            if not item.settled:
                batch = self._to_place[:MAX_PLACE_BATCH]
                del self._to_place[:MAX_PLACE_BATCH]
                await self._place_batch(batch)
        assert item.settled
        if item.error is not None:
            raise item.error

    async def _place_batch(self, batch: list[_Placement]) -> None:
        """One transaction for ``batch``: each series re-checked under its row lock, the
        held ones renamed into the mirror (place_many fsyncs each touched directory once,
        before the commit), then all marked done in one commit."""
        mirror = self.mirror
        settled = False
        # The workers of this batch are about to want work: claim theirs in the same
        # transaction (one commit instead of two), unless the queue ran dry or we stop.
        claim_next = 0
        if not (self._queue_dry or self._finished or self.report.interrupted):
            running = len(self.jobs) - len(batch)
            claim_next = max(0, min(len(batch), self._claimers() - running - len(self._prefetched)))
        batch_sources = {p.claim.source_name for p in batch}
        sources = [
            self.source_ids[name]
            for name, sem in self.slots.items()
            if not sem.locked() or name in batch_sources
        ]
        asked = self._changed
        try:
            async with self.catalog.queue.placing_many(
                [p.claim for p in batch],
                self.owner,
                claim_next=claim_next,
                lease_seconds=self.transfer.lease_seconds,
                source_ids=sources,
            ) as held:
                ours = {c.series_id for c in held.held}
                todo = [p for p in batch if p.claim.series_id in ours]
                # A series the archive moved leaves its old place inside place_many,
                # before this commit: a crash can leave no unrecorded copy in the tree.
                errors = await mirror.place_many(
                    [
                        (
                            p.fetched.staging_dir,
                            p.final,
                            mirror.root / p.claim.placed_path if p.claim.placed_path else None,
                        )
                        for p in todo
                    ],
                    unsynced=[p.fetched.staging_dir for p in todo if _small(p.claim)],
                    unwritten={
                        p.fetched.staging_dir: p.fetched.unwritten
                        for p in todo
                        if p.fetched.in_memory
                    },
                )
                for p, err in zip(todo, errors, strict=True):
                    if err is None:
                        held.done(
                            p.claim,
                            p.instances,
                            p.where,
                            p.fetched.size,
                            p.fetched.unverified,
                        )
                    else:
                        p.error = err  # still leased to us: its worker records the failure
            for p in batch:
                lost = held.lost.get(p.claim.series_id)
                if lost is not None:
                    p.error = lost
            settled = True
            if claim_next:
                quiet = self._changed is asked
                self._took(held.claimed)
                if held.claimed:
                    self._notify()
                self._claimed(short=len(held.claimed) < claim_next, quiet=quiet)
        except Exception as exc:
            # Nothing of this transaction was committed: every series of it failed alike,
            # as one `placing` each would have.
            for p in batch:
                p.error = exc
            settled = True
        finally:
            for p in batch:
                if not settled:  # only a BaseException gets here: report it as a failure
                    p.error = CatalogError("placement interrupted; nothing recorded")
                p.settled = True

    async def _failed(self, claim: Claim, exc: Exception) -> None:
        retryable = not isinstance(exc, PermanentError)
        retry_after = exc.retry_after if isinstance(exc, RetryableError) else None
        delay = self.policy.delay(claim.attempts, retry_after) if retryable else 0.0
        error = str(exc) or type(exc).__name__
        with anyio.CancelScope(shield=True):
            try:
                state = await self.catalog.queue.fail(
                    claim,
                    self.owner,
                    error=error,
                    retryable=retryable,
                    max_attempts=self.transfer.max_attempts,
                    delay=delay,
                )
            except CatalogError as cexc:
                self._abort(cexc)
                return
        if state is SeriesState.FAILED:
            self.report.failed += 1
            log.warning(
                "series_failed",
                series_uid=claim.series_uid,
                reason=error,
                kind=type(exc).__name__,
                attempts=claim.attempts + 1,
            )
        else:
            self.report.retried += 1
            log.info(
                "retry_scheduled",
                series_uid=claim.series_uid,
                reason=error,
                delay=round(delay, 3),
                attempts=claim.attempts + 1,
            )
        self._finish(claim, ok=False, files=0, error=exc)

    async def _give_back(self, claim: Claim, staging: Path) -> None:
        with anyio.CancelScope(shield=True):
            await self.mirror.remove_staging(staging)
            try:
                await self.catalog.queue.release(claim, self.owner)
            except CatalogError as exc:
                log.warning("release_failed", series_uid=claim.series_uid, error=str(exc))

    def _finish(self, claim: Claim, *, ok: bool, files: int, error: BaseException | None) -> None:
        self.progress.series_finished(claim.series_uid, ok=ok, files=files, error=error)

    # -- leases -----------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        while True:
            await self.catalog.clock.sleep(self.transfer.heartbeat_interval)
            ids = list(self.jobs) + [c.series_id for c in self._prefetched]
            if not ids:
                continue
            try:
                with anyio.CancelScope(shield=True):
                    held = await self.catalog.queue.heartbeat(
                        self.owner, ids, self.transfer.lease_seconds
                    )
            except CatalogError as exc:
                log.warning("heartbeat_failed", error=str(exc))
                continue
            lost = set(ids) - held
            if lost:
                self._prefetched = deque(c for c in self._prefetched if c.series_id not in lost)
            for series_id in lost:
                job = self.jobs.get(series_id)
                if job is not None:
                    job.lost = True
                    job.scope.cancel()


def _small(claim: Claim) -> bool:
    return is_small(claim.file_size)


async def drain(
    *,
    settings: Settings,
    catalog: Catalog,
    clients: Mapping[str, NbiaClient],
    mirror: Mirror,
    owner: str,
    progress: ProgressSink,
    stop: anyio.Event | None = None,
    report: DrainReport | None = None,
) -> DrainReport:
    """Download every claimable series of the sources in ``clients`` until none is left
    (waiting out backoffs), or until ``stop`` is set. Raises DiskSpaceError, CatalogError
    or SourceUnusableError when the pass cannot go on; the claims in flight are released
    first.
    ``report``, when given, is the one filled in (so its counts survive such an error)."""
    pool = _Drain(settings, catalog, clients, mirror, owner, progress)
    if report is not None:
        pool.report = report
    return await pool.run(stop)
