"""The worker pool: drain the catalog's queue into the mirror.

N workers each loop: claim one series, reserve its disk space, fetch it into staging,
then place it and mark it done in one catalog transaction (``catalog.placing``). The
catalog decides retries (attempts and next-try times live there, so a restart resumes the
schedule); the pool only classifies failures by their exception class:

* RetryableError (IntegrityError included): counted, retried after the policy's delay;
* PermanentError (HostileArchiveError, no access): failed for good;
* DiskSpaceError / CatalogError: the claim is released and the whole drain stops;
* LeaseLostError: someone else owns the series now; our copy is dropped.

The drain ends when nothing is claimable and nothing will be (``next_ready_at`` is None),
so backoffs are waited out. A heartbeat keeps the leases of in-flight series alive.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import anyio
import structlog

from nbia_sync.api.client import NbiaClient
from nbia_sync.api.retry import RetryPolicy
from nbia_sync.catalog import Catalog, Claim, InstanceRecord, LeaseLostError, SeriesState
from nbia_sync.config import Settings
from nbia_sync.errors import CatalogError, DiskSpaceError, PermanentError, RetryableError
from nbia_sync.progress import ProgressSink
from nbia_sync.storage import Mirror
from nbia_sync.transfer._ratelimit import TokenBucket
from nbia_sync.transfer.download import FetchedSeries, fetch_series

log = structlog.get_logger(__name__)

# Longest an idle worker sleeps before asking the catalog again (other processes may add
# or finish work without telling us).
# In a fleet this is also how late a process notices that a peer finished the last series
# it was waiting for (bench/bench_fleet.py: 5 s here cost a 2-process fleet ~30 % of its
# wall time); one short indexed read per idle worker per second is cheap.
MAX_IDLE_POLL = 1.0
MIN_IDLE_POLL = 0.05


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
            TokenBucket(limit, burst=max(limit, settings.transfer.chunk_size)) if limit else None
        )
        workers = settings.transfer.workers
        self.slots = {
            name: anyio.Semaphore(settings.source(name).max_connections or workers)
            for name in clients
        }
        self.source_ids: dict[str, int] = {}
        self.jobs: dict[int, _Job] = {}
        self.report = DrainReport()
        self.fatal: BaseException | None = None
        self._changed = anyio.Event()  # something finished: idle workers look again
        self._finished = False
        self._scope = anyio.CancelScope()

    # -- orchestration ------------------------------------------------------------

    async def run(self, stop: anyio.Event | None) -> DrainReport:
        started = time.monotonic()
        for name in self.clients:
            self.source_ids[name] = await self.catalog.ensure_source(self.settings.source(name))
        await self._plan()
        async with anyio.create_task_group() as tg:
            self._scope = tg.cancel_scope
            tg.start_soon(self._heartbeat_loop)
            if stop is not None:
                tg.start_soon(self._watch_stop, stop, tg.cancel_scope)
            async with anyio.create_task_group() as workers:
                for _ in range(self.transfer.workers):
                    workers.start_soon(self._worker)
            tg.cancel_scope.cancel()  # the workers are done: end heartbeat and watcher
        if self.report.interrupted or self.fatal is not None:
            with anyio.CancelScope(shield=True):
                # Claims taken by a cancelled claim() call we never saw come back.
                await self.catalog.release_leases(self.owner)
        self.report.duration = time.monotonic() - started
        if self.fatal is not None:
            raise self.fatal
        return self.report

    async def _plan(self) -> None:
        counts = await self.catalog.state_counts()
        waiting = [counts.get(s, (0, 0)) for s in (SeriesState.WANTED, SeriesState.PENDING)]
        self.progress.plan(sum(n for n, _ in waiting), sum(b for _, b in waiting))

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
        self._changed = anyio.Event()

    # -- workers --------------------------------------------------------------------

    async def _worker(self) -> None:
        while not self._finished:
            claim = await self._claim()
            if claim is None:
                if not await self._wait_for_work():
                    return
                continue
            await self._run_job(claim)

    async def _claim(self) -> Claim | None:
        free = [self.source_ids[name] for name, sem in self.slots.items() if sem.value > 0]
        if not free:
            return None
        try:
            # Every catalog call of the pool is shielded from cancellation: they are short,
            # and a transaction cut half way can leave the driver's connection unusable
            # (seen with aiosqlite), or a committed claim that we never saw.
            with anyio.CancelScope(shield=True):
                claims = await self.catalog.claim(
                    self.owner, limit=1, lease_seconds=self.transfer.lease_seconds,
                    source_ids=free,
                )
        except CatalogError as exc:
            self._abort(exc)
            return None
        return claims[0] if claims else None

    async def _wait_for_work(self) -> bool:
        """Wait until more work may be claimable; False when the drain is over."""
        if self._finished:
            return False
        changed = self._changed
        if not self.jobs:
            try:
                with anyio.CancelScope(shield=True):  # see _claim
                    ready = await self.catalog.next_ready_at(list(self.source_ids.values()))
            except CatalogError as exc:
                self._abort(exc)
                return False
            if ready is None:
                # Nothing queued, nothing backing off, nothing in flight: done.
                self._finished = True
                self._notify()
                return False
            wait = (ready - datetime.now(UTC)).total_seconds()
        else:
            wait = MAX_IDLE_POLL  # a running job will wake us when it ends
        with anyio.move_on_after(min(max(wait, MIN_IDLE_POLL), MAX_IDLE_POLL)):
            await changed.wait()
        return not self._finished

    async def _run_job(self, claim: Claim) -> None:
        job = _Job(claim)
        self.jobs[claim.series_id] = job
        try:
            async with self.slots[claim.source_name]:
                await self._attempt(job)
        finally:
            del self.jobs[claim.series_id]
            self._notify()

    async def _attempt(self, job: _Job) -> None:
        claim = job.claim
        staging = self.mirror.staging_dir(self.owner, claim.series_uid)
        started = time.monotonic()
        self.progress.series_started(claim.series_uid, claim.file_size)
        try:
            async with self.mirror.reserve(claim.file_size, self.settings.mirror.min_free_bytes):
                fetched: FetchedSeries | None = None
                with job.scope:
                    fetched = await fetch_series(
                        self.clients[claim.source_name], claim, staging,
                        chunk_size=self.transfer.chunk_size, progress=self.progress,
                        limiter=self.limiter, check_dicom=self.settings.mirror.check_dicom,
                    )
                    await self.mirror.sync_staged(staging)
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
            self._finish(claim, ok=False, files=0, error=str(exc))
        except DiskSpaceError as exc:
            await self._give_back(claim, staging)
            self._finish(claim, ok=False, files=0, error=str(exc))
            self._abort(exc)
        except CatalogError as exc:
            await self._give_back(claim, staging)
            self._finish(claim, ok=False, files=0, error=str(exc))
            self._abort(exc)
        except (RetryableError, PermanentError) as exc:
            await self.mirror.remove_staging(staging)
            await self._failed(claim, exc)
        except anyio.get_cancelled_exc_class():
            await self._give_back(claim, staging)
            self._finish(claim, ok=False, files=0, error="interrupted")
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
            log.info("series_done", series_uid=claim.series_uid, files=len(fetched.files),
                     bytes=fetched.size, seconds=round(seconds, 3))
            self._finish(claim, ok=True, files=len(fetched.files), error=None)

    async def _place(self, claim: Claim, fetched: FetchedSeries) -> None:
        mirror = self.mirror
        final = mirror.series_dir(
            claim.collection, claim.patient_id, claim.study_uid, claim.series_uid)
        instances = [
            InstanceRecord(f.sop_uid, f.md5, f.size, mirror.relative(final / f.path.name))
            for f in fetched.files
        ]
        async with self.catalog.placing(claim, self.owner) as guard:
            await mirror.place_series(fetched.staging_dir, final, fsync_files=False)
            guard.done(instances, mirror.relative(final), fetched.size)
        if claim.placed_path and (mirror.root / claim.placed_path) != final:
            # The archive moved the series (new patient or study): drop the old copy.
            await mirror.remove_series(mirror.root / claim.placed_path)

    async def _failed(self, claim: Claim, exc: Exception) -> None:
        retryable = not isinstance(exc, PermanentError)
        retry_after = exc.retry_after if isinstance(exc, RetryableError) else None
        delay = self.policy.delay(claim.attempts, retry_after) if retryable else 0.0
        error = str(exc) or type(exc).__name__
        with anyio.CancelScope(shield=True):
            try:
                state = await self.catalog.fail(
                    claim, self.owner, error=error, retryable=retryable,
                    max_attempts=self.transfer.max_attempts, delay=delay,
                )
            except CatalogError as cexc:
                self._abort(cexc)
                return
        if state is SeriesState.FAILED:
            self.report.failed += 1
            log.warning("series_failed", series_uid=claim.series_uid, reason=error,
                        kind=type(exc).__name__, attempts=claim.attempts + 1)
        else:
            self.report.retried += 1
            log.info("retry_scheduled", series_uid=claim.series_uid, reason=error,
                     delay=round(delay, 3), attempts=claim.attempts + 1)
        # The class name first: metrics count errors by kind (see metrics.error_kind).
        self._finish(claim, ok=False, files=0, error=f"{type(exc).__name__}: {error}")

    async def _give_back(self, claim: Claim, staging: Path) -> None:
        with anyio.CancelScope(shield=True):
            await self.mirror.remove_staging(staging)
            try:
                await self.catalog.release(claim, self.owner)
            except CatalogError as exc:
                log.warning("release_failed", series_uid=claim.series_uid, error=str(exc))

    def _finish(self, claim: Claim, *, ok: bool, files: int, error: str | None) -> None:
        self.progress.series_finished(claim.series_uid, ok=ok, files=files, error=error)

    # -- leases -----------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        while True:
            await anyio.sleep(self.transfer.heartbeat_interval)
            ids = list(self.jobs)
            if not ids:
                continue
            try:
                with anyio.CancelScope(shield=True):
                    held = await self.catalog.heartbeat(
                        self.owner, ids, self.transfer.lease_seconds)
            except CatalogError as exc:
                log.warning("heartbeat_failed", error=str(exc))
                continue
            for series_id in set(ids) - held:
                job = self.jobs.get(series_id)
                if job is not None:
                    job.lost = True
                    job.scope.cancel()


async def drain(
    *,
    settings: Settings,
    catalog: Catalog,
    clients: Mapping[str, NbiaClient],
    mirror: Mirror,
    owner: str,
    progress: ProgressSink,
    stop: anyio.Event | None = None,
) -> DrainReport:
    """Download every claimable series of the sources in ``clients`` until none is left
    (waiting out backoffs), or until ``stop`` is set. Raises DiskSpaceError or
    CatalogError when the pass cannot go on; the claims in flight are released first."""
    return await _Drain(settings, catalog, clients, mirror, owner, progress).run(stop)
