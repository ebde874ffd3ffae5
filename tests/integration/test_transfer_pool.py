"""drain() end to end: simulator -> client -> pool -> mirror, with the real catalog."""

from __future__ import annotations

import asyncio
import hashlib
import os
import ssl
from collections.abc import AsyncIterator, Callable, Collection
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import pytest
import trustme
from served_apps import serving
from sqlalchemy.exc import OperationalError

from nbia_sync.api.client import NbiaClient
from nbia_sync.api.models import SeriesInfo
from nbia_sync.catalog import Catalog, SeriesState
from nbia_sync.catalog import queue as catalog_queue
from nbia_sync.clock import SYSTEM_CLOCK, Clock, FakeClock
from nbia_sync.config import Settings, settings_from_dict
from nbia_sync.errors import AuthError, CatalogError, DiskSpaceError, UntrustedServerError
from nbia_sync.sim import SimArchive, SimFaults, SimServer
from nbia_sync.sim.testing import running_sim
from nbia_sync.storage import Mirror
from nbia_sync.transfer.pool import DrainReport, drain

pytestmark = pytest.mark.asyncio


@pytest.fixture
def clock(request: pytest.FixtureRequest) -> Clock:
    """The catalog's clock; a test parametrized with "fake" gets a FakeClock it advances."""
    return FakeClock(autojump=False) if getattr(request, "param", None) == "fake" else SYSTEM_CLOCK


OWNER = "test-host:1:run"


@pytest.fixture
def pool(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The pool module, its idle workers polling every 50 ms (IDLE_POLL, IDLE_WAIT)."""
    from nbia_sync.transfer import pool

    monkeypatch.setattr(pool, "IDLE_POLL", 0.05)
    monkeypatch.setattr(pool, "IDLE_WAIT", 0.05)
    return pool


class Recorder:
    def __init__(self, series: int = 8) -> None:
        self.planned: tuple[int, int, int] | None = None
        self.started: list[str] = []
        self.any_started = anyio.Event()
        self.all_started = anyio.Event()  # `series` downloads have begun
        self._series = series
        self.finished: list[tuple[str, bool]] = []
        self.bytes = 0
        self.files_arrived: dict[str, int] = {}

    def plan(self, series: int, total_bytes: int, files: int) -> None:
        self.planned = (series, total_bytes, files)

    def series_started(self, series_uid: str, expected_bytes: int | None) -> None:
        self.started.append(series_uid)
        self.any_started.set()
        if len(self.started) >= self._series:
            self.all_started.set()

    def bytes_received(self, n: int) -> None:
        self.bytes += n

    def files_received(self, series_uid: str, n: int) -> None:
        self.files_arrived[series_uid] = self.files_arrived.get(series_uid, 0) + n

    def series_finished(
        self, series_uid: str, *, ok: bool, files: int, error: BaseException | None
    ) -> None:
        self.finished.append((series_uid, ok))


def make_settings(root: Path, sim: SimServer, **transfer: Any) -> Settings:
    base: dict[str, Any] = {
        "workers": 4,
        "retry_base_delay": 0.01,
        "retry_max_delay": 0.05,
        "read_timeout": 0.5,
        "connect_timeout": 2.0,
        "max_attempts": 30,
        "request_attempts": 3,
        "chunk_size": 16 << 10,
    }
    base.update(transfer)
    return settings_from_dict(
        {
            "mirror": {"root": str(root), "min_free_bytes": 0},
            "transfer": base,
            "sources": [{"name": "sim", "url": sim.url, "api": "v2"}],
        },
        env={},
    )


async def queue_all(
    catalog: Catalog,
    settings: Settings,
    archive: SimArchive,
    source: int = 0,
    only: Collection[str] | None = None,
) -> None:
    """Queue the archive's series (``only`` these UIDs, when given)."""
    source_id = await catalog.sources.ensure_source(settings.sources[source])
    await catalog.sources.upsert_series(
        source_id,
        [
            SeriesInfo(
                series_uid=s.uid,
                study_uid=s.study_uid,
                collection=s.collection,
                patient_id=s.patient_id,
                modality=s.modality,
                image_count=s.image_count,
                file_size=s.file_size,
                date_released=s.date_released,
            )
            for s in archive.series.values()
            if only is None or s.uid in only
        ],
    )


@asynccontextmanager
async def clients_for(settings: Settings) -> AsyncIterator[dict[str, NbiaClient]]:
    async with NbiaClient(settings.sources[0], settings.transfer) as client:
        yield {"sim": client}


def count_calls(monkeypatch: pytest.MonkeyPatch, owner: type, name: str) -> Callable[[], int]:
    """Count the calls of the coroutine method ``owner.name`` (still called through)."""
    real = getattr(owner, name)
    calls = 0

    async def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return await real(*args, **kwargs)

    monkeypatch.setattr(owner, name, counting)
    return lambda: calls


def hold_fetches(monkeypatch: pytest.MonkeyPatch, uids: Collection[str]) -> anyio.Event:
    """Downloads of these series wait (their connection slot taken) until the returned
    event is set."""
    from nbia_sync.transfer import pool

    release = anyio.Event()
    fetch_series = pool.fetch_series

    async def holding(client: Any, claim: Any, *args: Any, **kwargs: Any) -> Any:
        if claim.series_uid in uids:
            await release.wait()
        return await fetch_series(client, claim, *args, **kwargs)

    monkeypatch.setattr(pool, "fetch_series", holding)
    return release


async def run_drain(
    settings: Settings, catalog: Catalog, progress: Any = None, stop: anyio.Event | None = None
) -> DrainReport:
    async with clients_for(settings) as clients:
        return await drain(
            settings=settings,
            catalog=catalog,
            clients=clients,
            mirror=Mirror(settings.mirror.root),
            owner=OWNER,
            progress=progress or Recorder(),
            stop=stop,
        )


def mirror_state(root: Path, archive: SimArchive) -> dict[str, dict[str, str]]:
    """{series: {sop: md5}} read back from disk, checking each path is where it belongs."""
    found: dict[str, dict[str, str]] = {}
    for p in root.rglob("*.dcm"):
        rel = p.relative_to(root)
        if rel.parts[0] == ".nbia-sync":
            continue
        collection, patient, study, series, name = rel.parts
        s = archive.series[series]
        assert (collection, patient, study) == (s.collection, s.patient_id, s.study_uid)
        found.setdefault(series, {})[name.removesuffix(".dcm")] = hashlib.md5(
            p.read_bytes()
        ).hexdigest()
    return found


def evil_files(root: Path) -> list[Path]:
    return list(root.rglob("evil*"))


def staging_files(root: Path) -> list[Path]:
    return [p for p in (root / ".nbia-sync" / "staging").rglob("*") if p.is_file()]


async def downloading(catalog: Catalog) -> int:
    return (await catalog.state_counts()).get(SeriesState.DOWNLOADING, (0, 0))[0]


async def test_drain_fetches_every_series_and_reports_progress(
    catalog: Catalog, sim: SimServer, sim_archive: SimArchive, tmp_path: Path
) -> None:
    settings = make_settings(tmp_path / "mirror", sim)
    await queue_all(catalog, settings, sim_archive)
    progress = Recorder()
    report = await run_drain(settings, catalog, progress)
    assert mirror_state(tmp_path / "mirror", sim_archive) == sim_archive.truth()
    total = sum(s.file_size for s in sim_archive.series.values())
    assert (report.done, report.failed, report.files, report.bytes) == (8, 0, 24, total)
    assert progress.planned == (8, total, 24)  # series, bytes, files: read before any claim
    assert sorted(progress.started) == sorted(sim_archive.series)
    assert all(ok for _, ok in progress.finished) and len(progress.finished) == 8
    assert progress.bytes > total  # the ZIP wrapping on top of the files
    assert staging_files(tmp_path / "mirror") == []


async def test_files_are_reported_as_they_arrive_not_only_when_placed(
    catalog: Catalog, sim: SimServer, sim_archive: SimArchive, tmp_path: Path
) -> None:
    settings = make_settings(tmp_path / "mirror", sim)
    await queue_all(catalog, settings, sim_archive)
    progress = Recorder()
    await run_drain(settings, catalog, progress)
    assert progress.files_arrived == {
        uid: len(s.instances) for uid, s in sim_archive.series.items()
    }


async def test_retryable_failures_are_retried_after_backoff_until_done(
    catalog: Catalog, sim: SimServer, sim_archive: SimArchive, tmp_path: Path
) -> None:
    settings = make_settings(tmp_path / "mirror", sim)
    await queue_all(catalog, settings, sim_archive)
    uid = next(iter(sim_archive.series))
    sim.faults.script_series(uid, ["truncate", "corrupt", "reset"])
    report = await run_drain(settings, catalog)
    assert (report.done, report.retried, report.failed) == (8, 3, 0)
    assert mirror_state(tmp_path / "mirror", sim_archive) == sim_archive.truth()


async def test_hostile_series_fails_for_good_and_the_rest_completes(
    catalog: Catalog, sim: SimServer, sim_archive: SimArchive, tmp_path: Path
) -> None:
    settings = make_settings(tmp_path / "mirror", sim)
    await queue_all(catalog, settings, sim_archive)
    uid = next(iter(sim_archive.series))
    sim.faults.script_series(uid, ["hostile"])
    report = await run_drain(settings, catalog)
    assert (report.done, report.failed, report.retried) == (7, 1, 0)
    truth = sim_archive.truth()
    del truth[uid]
    assert mirror_state(tmp_path / "mirror", sim_archive) == truth
    assert evil_files(tmp_path) == []
    failures = await catalog.failures()
    assert [f.series_uid for f in failures] == [uid]


async def test_disk_space_error_stops_the_drain_and_releases_claims(
    catalog: Catalog, sim: SimServer, sim_archive: SimArchive, tmp_path: Path
) -> None:
    settings = make_settings(tmp_path / "mirror", sim)
    settings = replace(settings, mirror=replace(settings.mirror, min_free_bytes=1 << 62))
    await queue_all(catalog, settings, sim_archive)
    with pytest.raises(DiskSpaceError, match="bytes free"):
        await run_drain(settings, catalog)
    assert await downloading(catalog) == 0
    counts = await catalog.state_counts()
    assert counts.get(SeriesState.WANTED, (0, 0))[0] == 8


async def test_stop_cancels_in_flight_downloads_and_releases_them(
    catalog: Catalog, sim_archive: SimArchive, tmp_path: Path
) -> None:
    async with running_sim(sim_archive, SimFaults(bandwidth=20_000)) as sim:
        settings = make_settings(tmp_path / "mirror", sim)
        await queue_all(catalog, settings, sim_archive)
        stop = anyio.Event()
        progress = Recorder()
        async with anyio.create_task_group() as tg:

            async def stop_soon() -> None:
                await progress.any_started.wait()
                await anyio.sleep(0.1)
                stop.set()

            tg.start_soon(stop_soon)
            with anyio.fail_after(10):
                report = await run_drain(settings, catalog, progress, stop)
    assert report.interrupted
    assert report.done < 8
    assert await downloading(catalog) == 0
    assert staging_files(tmp_path / "mirror") == []
    placed = mirror_state(tmp_path / "mirror", sim_archive)
    assert len(placed) == report.done


@pytest.mark.parametrize("clock", ["fake"], indirect=True)
async def test_heartbeat_keeps_leases_of_slow_downloads(
    catalog: Catalog, clock: FakeClock, sim_archive: SimArchive, tmp_path: Path
) -> None:
    # The downloads are held in flight while the catalog's clock runs through four of
    # their 0.3 s leases, one heartbeat interval at a time; a thief tries after each beat.
    gate = asyncio.Event()
    async with running_sim(sim_archive, SimFaults(hold=gate)) as sim:
        settings = make_settings(
            tmp_path / "mirror",
            sim,
            workers=8,
            lease_seconds=0.3,
            heartbeat_interval=0.1,
            read_timeout=60.0,
        )
        await queue_all(catalog, settings, sim_archive)
        stolen: list[object] = []
        in_flight_at_release: list[int] = []
        progress = Recorder()

        async def run_the_clock() -> None:
            await progress.all_started.wait()
            for _ in range(12):
                await clock.until_sleeping()  # the pool's heartbeat waits for its next beat
                clock.advance(0.1)
                await clock.until_sleeping()  # ... and has renewed the leases
                stolen.extend(await catalog.queue.claim("thief", limit=8, lease_seconds=60))
            in_flight_at_release.append(8 - sum(sim.counters.downloads_completed.values()))
            gate.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(run_the_clock)
            with anyio.fail_after(30):  # a stolen series would be waited for in fake time
                report = await run_drain(settings, catalog, progress)
    assert stolen == []
    assert in_flight_at_release == [8]
    assert (report.done, report.lease_lost) == (8, 0)


@pytest.mark.chaos
async def test_every_fault_at_once_converges_on_the_truth_and_never_shows_a_wrong_file(
    catalog: Catalog, tmp_path: Path
) -> None:
    archive = SimArchive.generate(
        collections=("SIM-CT", "SIM-MR", "SIM-PT"), patients=3, series=2, images=3, image_size=8192
    )
    faults = SimFaults(
        error_5xx=0.1,
        rate_429=0.1,
        retry_after=0.05,
        reset=0.1,
        truncate=0.1,
        corrupt=0.1,
        stall=0.05,
        stall_seconds=1.0,
        hostile=0.05,
        html_instead_of_zip=0.05,
        seed=7,
    )
    root = tmp_path / "mirror"
    truth = archive.truth()
    bad: list[str] = []

    def scan() -> int:
        seen = 0
        # os.walk, not rglob: directories vanish mid-walk (renames) and walk shrugs that off.
        for dirpath, dirnames, filenames in os.walk(root):
            if ".nbia-sync" in dirnames:
                dirnames.remove(".nbia-sync")
            seen += check(Path(dirpath), filenames)
        return seen

    def check(dirpath: Path, filenames: list[str]) -> int:
        seen = 0
        for p in (dirpath / f for f in filenames):
            try:
                md5 = hashlib.md5(p.read_bytes()).hexdigest()
            except FileNotFoundError:  # replaced between listing and reading
                continue
            seen += 1
            if truth.get(p.parent.name, {}).get(p.stem) != md5:
                bad.append(str(p))
        return seen

    seen_per_scan: list[int] = []

    async def watch() -> None:
        while True:
            seen_per_scan.append(await anyio.to_thread.run_sync(scan))
            await anyio.sleep(0.005)

    async with running_sim(archive, faults) as sim:
        settings = make_settings(root, sim)
        await queue_all(catalog, settings, archive)
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            rounds = 0
            with anyio.fail_after(60):
                while True:
                    rounds += 1
                    report = await run_drain(settings, catalog)
                    if not report.failed:
                        break
                    # Hostile downloads fail for good; the operator's retry-failed.
                    await catalog.queue.retry_failed()
            tg.cancel_scope.cancel()
        assert sum(sim.counters.downloads_started.values()) > len(truth)  # faults did hit
    assert bad == []
    assert any(0 < n < 54 for n in seen_per_scan)  # the watcher saw the tree mid-drain
    assert mirror_state(root, archive) == truth
    assert staging_files(root) == []
    assert evil_files(tmp_path) == []


async def test_a_stop_releases_claims_no_worker_started(
    catalog: Catalog, sim: SimServer, sim_archive: SimArchive, tmp_path: Path
) -> None:
    from nbia_sync.transfer.pool import _Drain

    settings = make_settings(tmp_path / "mirror", sim)
    await queue_all(catalog, settings, sim_archive)
    stop = anyio.Event()
    stop.set()
    async with clients_for(settings) as clients:
        d = _Drain(settings, catalog, clients, Mirror(settings.mirror.root), OWNER, Recorder())
        # As the claimer leaves them: prefetched for workers that never get to run.
        d._prefetched.extend(await catalog.queue.claim(OWNER, limit=5, lease_seconds=60))
        report = await d.run(stop)
    assert report.interrupted
    assert not d._prefetched
    assert await downloading(catalog) == 0
    counts = await catalog.state_counts()
    assert counts.get(SeriesState.WANTED, (0, 0))[0] + report.done == 8


async def test_many_small_series_are_placed_in_group_commits(
    catalog: Catalog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Series that finish while a commit is under way share the next one: the first
    batch is held until the other workers have queued theirs, so the next batch must
    carry several series (it cannot with MAX_PLACE_BATCH = 1)."""
    from nbia_sync.transfer import pool

    archive = SimArchive.generate(
        collections=("SIM-CT",), patients=24, studies=1, series=1, images=1, image_size=2000, seed=5
    )
    batches: list[int] = []
    commits: list[int] = []
    real_place = pool._Drain._place
    real_batch = pool._Drain._place_batch
    real_placing = catalog_queue.Queue.placing_many
    placed = 0
    three_queued = anyio.Event()

    async def place(self: Any, claim: Any, fetched: Any) -> None:
        nonlocal placed
        placed += 1
        if placed == 4:  # the first one's and three more, queued before they await
            three_queued.set()
        await real_place(self, claim, fetched)

    async def spy(self: Any, batch: list[Any]) -> None:
        if not batches:
            # The other workers finish their downloads and queue behind this one.
            with anyio.fail_after(20):
                await three_queued.wait()
        batches.append(len(batch))
        await real_batch(self, batch)

    def counting(self: catalog_queue.Queue, claims: Any, *args: Any, **kwargs: Any) -> Any:
        commits.append(len(claims))
        return real_placing(self, claims, *args, **kwargs)

    monkeypatch.setattr(pool._Drain, "_place", place)
    monkeypatch.setattr(pool._Drain, "_place_batch", spy)
    monkeypatch.setattr(catalog_queue.Queue, "placing_many", counting)
    async with running_sim(archive, SimFaults()) as sim:
        settings = make_settings(tmp_path / "mirror", sim, workers=8)
        await queue_all(catalog, settings, archive)
        report = await run_drain(settings, catalog)
    assert (report.done, report.failed, report.lease_lost) == (24, 0, 0)
    assert sum(batches) == 24
    assert batches[1] >= 3  # everything queued during the first commit, in one
    assert commits == batches  # one transaction per batch
    assert len(commits) < 24
    assert await downloading(catalog) == 0
    assert len(mirror_state(tmp_path / "mirror", archive)) == 24


def fill_disk_after_first_claim(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every claim after the first fails as a full SQLite disk does."""
    real = catalog_queue._claim_in
    calls = 0

    def claim_in(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise OperationalError("UPDATE series", {}, Exception("database or disk is full"))
        return real(*args, **kwargs)

    monkeypatch.setattr(catalog_queue, "_claim_in", claim_in)


async def test_catalog_error_mid_drain_stops_it_and_releases_claims(
    catalog: Catalog,
    sim: SimServer,
    sim_archive: SimArchive,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = make_settings(tmp_path / "mirror", sim, workers=2)
    await queue_all(catalog, settings, sim_archive)
    fill_disk_after_first_claim(monkeypatch)
    with anyio.fail_after(20), pytest.raises(CatalogError, match="disk is full") as info:
        await run_drain(settings, catalog)
    assert "catalog" in str(info.value)
    assert await downloading(catalog) == 0
    counts = await catalog.state_counts()
    assert counts.get(SeriesState.FAILED, (0, 0))[0] == 0
    assert staging_files(tmp_path / "mirror") == []


async def test_refused_credentials_mid_drain_stop_it_without_failing_series(
    catalog: Catalog, sim: SimServer, sim_archive: SimArchive, tmp_path: Path
) -> None:
    settings = make_settings(tmp_path / "mirror", sim, workers=4, read_timeout=5.0)
    await queue_all(catalog, settings, sim_archive)
    sim.faults.bandwidth = 20_000
    progress = Recorder(series=4)

    async def revoke_soon() -> None:
        await progress.all_started.wait()
        sim.users.clear()  # the password is revoked: the token cannot be renewed
        sim.revoke_all_tokens()

    raised: list[BaseException] = []

    async def drain_it() -> None:
        try:
            await run_drain(settings, catalog, progress)
        except Exception as exc:
            raised.append(exc)

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(revoke_soon)
            await drain_it()
    [exc] = raised
    assert isinstance(exc, AuthError), repr(exc)
    assert await downloading(catalog) == 0
    counts = await catalog.state_counts()
    assert counts.get(SeriesState.FAILED, (0, 0))[0] == 0
    assert counts.get(SeriesState.PENDING, (0, 0))[0] == 0  # no attempt was counted
    assert counts.get(SeriesState.WANTED, (0, 0))[0] + counts.get(SeriesState.DONE, (0, 0))[0] == 8
    assert await catalog.failures() == []
    assert staging_files(tmp_path / "mirror") == []


async def test_an_untrusted_certificate_stops_the_drain_without_failing_series(
    catalog: Catalog, sim_archive: SimArchive, tmp_path: Path
) -> None:
    # The archive serves a certificate no CA of this process's trust store signed: no
    # request can succeed, so none is retried and no series is failed for it.
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("127.0.0.1").configure_cert(context)
    async with SimServer(sim_archive, tls=context) as sim:
        settings = make_settings(tmp_path / "mirror", sim)
        await queue_all(catalog, settings, sim_archive)
        with anyio.fail_after(20), pytest.raises(UntrustedServerError, match="not accepted"):
            await run_drain(settings, catalog)
    assert await downloading(catalog) == 0
    counts = await catalog.state_counts()
    assert counts.get(SeriesState.WANTED, (0, 0))[0] == len(sim_archive.series)
    assert await catalog.failures() == []
    assert staging_files(tmp_path / "mirror") == []


def tree_files(root: Path) -> set[str]:
    """Every file of the mirror tree (the bookkeeping area aside), relative to the root."""
    return {
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and p.relative_to(root).parts[0] != ".nbia-sync"
    }


async def catalog_files(catalog: Catalog) -> set[str]:
    return {r.path async for _, recs in catalog.iter_done_instances() for r in recs}


@pytest.mark.parametrize("move", ["patient_id", "collection", "study_uid"])
async def test_series_moved_by_the_archive_is_placed_anew_and_the_old_copy_dropped(
    catalog: Catalog, sim: SimServer, sim_archive: SimArchive, tmp_path: Path, move: str
) -> None:
    root = tmp_path / "mirror"
    settings = make_settings(root, sim)
    await queue_all(catalog, settings, sim_archive)
    await run_drain(settings, catalog)
    uid = next(s.uid for s in sim_archive.series.values() if s.patient_id == "SIM-CT-0001")
    before = {f for f in tree_files(root) if f"/{uid}/" in f}
    assert len(before) == 3
    s = sim_archive.series[uid]
    listed = (s.image_count, s.file_size, s.date_released)
    # Same-length names keep the files' sizes: only the place of the series changes.
    to = {"patient_id": "SIM-CT-0002", "collection": "SIM-MR", "study_uid": "2" + s.study_uid[1:]}[
        move
    ]
    sim_archive.move_series(uid, **{move: to})
    assert (s.image_count, s.file_size, s.date_released) == listed
    await queue_all(catalog, settings, sim_archive)
    report = await run_drain(settings, catalog)
    assert (report.done, report.failed) == (1, 0)
    # mirror_state also checks each file sits under its series' new collection/patient/study.
    assert mirror_state(root, sim_archive) == sim_archive.truth()
    assert not before & tree_files(root)
    assert tree_files(root) == await catalog_files(catalog)


async def test_crash_right_after_placing_a_moved_series_leaves_no_orphan(
    catalog: Catalog,
    sim: SimServer,
    sim_archive: SimArchive,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The process dies after the commit, before anything is deleted: the tree must
    still hold exactly what the catalog says (the old copy is out of it already, in the
    trash, which the next start empties)."""
    from nbia_sync import storage

    root = tmp_path / "mirror"
    settings = make_settings(root, sim)
    await queue_all(catalog, settings, sim_archive)
    await run_drain(settings, catalog)
    uid = sorted(sim_archive.series)[0]
    sim_archive.move_series(uid, patient_id="SIM-MOVED")
    await queue_all(catalog, settings, sim_archive)

    with monkeypatch.context() as m:
        # Killed before any deletion: nothing in the trash is removed.
        m.setattr(storage, "_rmtree", lambda path: None)
        assert (await run_drain(settings, catalog)).done == 1
    assert tree_files(root) == await catalog_files(catalog)
    assert mirror_state(root, sim_archive) == sim_archive.truth()
    await Mirror(root).clean_staging([])
    assert not any((root / ".nbia-sync" / "trash").rglob("*"))


async def test_a_deflate_bomb_fails_its_series_and_the_pass_goes_on(
    catalog: Catalog, sim_archive: SimArchive, tmp_path: Path
) -> None:
    bomb = next(iter(sim_archive.series))
    faults = SimFaults(bomb_bytes=256 << 20)
    faults.script_series(bomb, ["bomb"])
    async with running_sim(sim_archive, faults) as sim:
        settings = make_settings(tmp_path / "mirror", sim)
        await queue_all(catalog, settings, sim_archive)
        report = await run_drain(settings, catalog)
    assert (report.done, report.failed) == (len(sim_archive.series) - 1, 1)
    truth = sim_archive.truth()
    del truth[bomb]
    assert mirror_state(tmp_path / "mirror", sim_archive) == truth
    (failure,) = await catalog.failures()
    assert failure.series_uid == bomb and "declared size" in (failure.last_error or "")
    assert staging_files(tmp_path / "mirror") == []


async def test_blank_hashes_are_counted_in_the_catalog(
    catalog: Catalog, sim_archive: SimArchive, tmp_path: Path
) -> None:
    async with running_sim(sim_archive, SimFaults(md5_blank=0.3)) as sim:
        settings = make_settings(tmp_path / "mirror", sim)
        await queue_all(catalog, settings, sim_archive)
        report = await run_drain(settings, catalog)
    assert report.failed == 0
    assert mirror_state(tmp_path / "mirror", sim_archive) == sim_archive.truth()
    series, files = await catalog.unverified_files()
    assert series > 0 and 0 < files < sum(s.image_count for s in sim_archive.series.values())


async def test_idle_workers_ask_the_catalog_once_when_the_drain_ends(
    catalog: Catalog,
    sim: SimServer,
    sim_archive: SimArchive,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = make_settings(tmp_path / "mirror", sim)
    await queue_all(catalog, settings, sim_archive)
    asked = count_calls(monkeypatch, type(catalog.queue), "next_ready_at")
    report = await run_drain(settings, catalog)
    assert report.done == len(sim_archive.series)
    # Every worker went idle at the end; one of them asked for all.
    assert settings.transfer.workers > 1
    assert asked() == 1


async def test_after_a_claim_comes_back_short_workers_ask_again_only_after_a_notice_or_a_wait(
    catalog: Catalog,
    sim: SimServer,
    sim_archive: SimArchive,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    pool: ModuleType,
) -> None:
    settings = make_settings(tmp_path / "mirror", sim)
    await queue_all(catalog, settings, sim_archive)
    asked = count_calls(monkeypatch, type(catalog.queue), "claim")
    async with clients_for(settings) as clients:
        d = pool._Drain(settings, catalog, clients, Mirror(settings.mirror.root), OWNER, Recorder())
        d.source_ids["sim"] = await catalog.sources.ensure_source(settings.sources[0])
        taken = [await d._claim() for _ in range(len(sim_archive.series))]
        assert None not in taken and asked() == 1  # one claim took all eight
        assert await d._claim() is None and asked() == 2  # the queue is empty now
        assert [await d._claim() for _ in range(20)] == [None] * 20
        assert asked() == 2  # nothing changed since: nobody asked
        d._notify()  # a series ended
        assert [await d._claim() for _ in range(20)] == [None] * 20
        assert asked() == 3  # the first idle worker asked, once
        d.jobs[0] = pool._Job(taken[0])  # a job runs: the poller waits IDLE_WAIT
        assert await d._wait_for_work()
        assert await d._claim() is None
        assert asked() == 4  # the wait ran out, not noticed: the catalog may hold more now


async def test_while_a_series_downloads_one_idle_worker_polls_the_dry_queue(
    catalog: Catalog,
    sim: SimServer,
    sim_archive: SimArchive,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    pool: ModuleType,
) -> None:
    # With a series in flight the poller claims every IDLE_WAIT, not every IDLE_POLL.
    monkeypatch.setattr(pool, "IDLE_POLL", 0.01)
    monkeypatch.setattr(pool, "IDLE_WAIT", 0.1)
    settings = make_settings(tmp_path / "mirror", sim)
    await queue_all(catalog, settings, sim_archive)
    release = hold_fetches(monkeypatch, {min(sim_archive.series)})
    asked = count_calls(monkeypatch, type(catalog.queue), "claim")
    others = anyio.Event()

    class Progress(Recorder):
        def series_finished(self, series_uid: str, **kwargs: Any) -> None:
            super().series_finished(series_uid, **kwargs)
            if len(self.finished) == len(sim_archive.series) - 1:
                others.set()

    progress = Progress()
    polled = -1

    async def watch() -> None:
        nonlocal polled
        with anyio.fail_after(30):
            await others.wait()
        # The others are placed and the queue is dry: only the held series runs.
        before = asked()
        await anyio.sleep(0.5)
        polled = asked() - before
        release.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        report = await run_drain(settings, catalog, progress)
    assert report.done == len(sim_archive.series)
    # Five IDLE_WAITs went by with 31 workers idle: one of them asked each time.
    assert pool.TASKS_PER_SLOT * settings.transfer.workers - 1 > 7
    assert 0 < polled <= 7


async def test_when_the_polling_worker_takes_a_series_another_polls_in_its_place(
    catalog: Catalog,
    sim: SimServer,
    sim_archive: SimArchive,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    pool: ModuleType,
) -> None:
    settings = make_settings(tmp_path / "mirror", sim)
    first, second, third, *rest = sorted(sim_archive.series)
    await queue_all(catalog, settings, sim_archive, only={first, *rest})
    release = hold_fetches(monkeypatch, {first, second})
    others, second_started, third_done = anyio.Event(), anyio.Event(), anyio.Event()

    class Progress(Recorder):
        def series_started(self, series_uid: str, expected_bytes: int | None) -> None:
            super().series_started(series_uid, expected_bytes)
            if series_uid == second:
                second_started.set()

        def series_finished(self, series_uid: str, **kwargs: Any) -> None:
            super().series_finished(series_uid, **kwargs)
            if len(self.finished) == len(rest):
                others.set()
            if series_uid == third:
                third_done.set()

    placed_while_held = False

    async def add_late_series() -> None:
        nonlocal placed_while_held
        with anyio.fail_after(30):
            await others.wait()
            # Only `first` is in flight; the polling worker claims `second` and runs it.
            await queue_all(catalog, settings, sim_archive, only={second})
            await second_started.wait()
        # Both in flight are held, so no notice comes: only a poll finds `third`.
        await queue_all(catalog, settings, sim_archive, only={third})
        with anyio.move_on_after(10):
            await third_done.wait()
            placed_while_held = True
        release.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(add_late_series)
        report = await run_drain(settings, catalog, Progress())
    assert placed_while_held
    assert report.done == len(sim_archive.series)


async def test_while_the_only_series_left_backs_off_the_drain_reads_and_does_not_claim(
    catalog: Catalog,
    sim: SimServer,
    sim_archive: SimArchive,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    pool: ModuleType,
) -> None:
    # One request a download: the archive's 429 fails the series, which waits out the
    # Retry-After as a backoff with nothing in flight.
    settings = make_settings(tmp_path / "mirror", sim, retry_max_delay=1.5, request_attempts=1)
    await queue_all(catalog, settings, sim_archive)
    failing = min(sim_archive.series)
    sim.faults.retry_after = 1.5
    sim.faults.script_series(failing, ["429"])
    asked = count_calls(monkeypatch, type(catalog.queue), "claim")
    polled = count_calls(monkeypatch, type(catalog.queue), "next_ready_at")
    counts: dict[str, tuple[int, int]] = {}

    class Progress(Recorder):
        def series_started(self, series_uid: str, expected_bytes: int | None) -> None:
            super().series_started(series_uid, expected_bytes)
            if self.started.count(failing) == 2:
                counts["retried"] = (asked(), polled())  # its backoff is over

        def series_finished(self, series_uid: str, **kwargs: Any) -> None:
            super().series_finished(series_uid, **kwargs)
            if len(self.finished) == len(sim_archive.series):  # the others, and its failure
                counts["all_idle"] = (asked(), polled())

    report = await run_drain(settings, catalog, Progress())
    assert (report.done, report.retried) == (len(sim_archive.series), 1)
    claims, polls = (a - b for a, b in zip(counts["retried"], counts["all_idle"], strict=True))
    # Most of 1.5 s of backoff (Retry-After) with nothing in flight: the catalog read every
    # IDLE_POLL, and claimed from once the series was due (and once after the notice
    # of the last series to end), not every IDLE_POLL.
    assert polls >= 5
    assert claims <= 2


async def test_a_worker_waiting_for_its_commit_leaves_its_connection_to_another(
    catalog: Catalog,
    sim: SimServer,
    sim_archive: SimArchive,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # One connection: the first series' placement is held until a second series has
    # been downloaded over it, which needs the first worker to have let the slot go.
    settings = make_settings(tmp_path / "mirror", sim, workers=1)
    await queue_all(catalog, settings, sim_archive)
    from nbia_sync.transfer import pool

    fetched = 0
    second_fetched = anyio.Event()
    fetch_series = pool.fetch_series

    async def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal fetched
        result = await fetch_series(*args, **kwargs)
        fetched += 1
        if fetched == 2:
            second_fetched.set()
        return result

    place_many = Mirror.place_many
    held_once = False
    overlapped = False

    async def held(self: Mirror, *args: Any, **kwargs: Any) -> Any:
        nonlocal held_once, overlapped
        if not held_once:
            held_once = True
            with anyio.move_on_after(10):  # then the connection stayed taken
                await second_fetched.wait()
                overlapped = True
        return await place_many(self, *args, **kwargs)

    monkeypatch.setattr(pool, "fetch_series", counting)
    monkeypatch.setattr(Mirror, "place_many", held)
    report = await run_drain(settings, catalog)
    assert overlapped
    assert (report.done, report.failed) == (len(sim_archive.series), 0)
    assert mirror_state(tmp_path / "mirror", sim_archive) == sim_archive.truth()


async def test_downloads_at_once_never_exceed_the_workers_over_all_sources(
    catalog: Catalog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archives = [
        SimArchive.generate(
            collections=(name,), patients=6, series=1, images=2, image_size=2000, seed=seed
        )
        for name, seed in (("A", 11), ("B", 12))
    ]
    from nbia_sync.transfer import pool

    running = peak = 0
    fetch_series = pool.fetch_series

    async def tracking(*args: Any, **kwargs: Any) -> Any:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            return await fetch_series(*args, **kwargs)
        finally:
            running -= 1

    monkeypatch.setattr(pool, "fetch_series", tracking)
    faults = SimFaults(latency=0.05)
    async with running_sim(archives[0], faults) as sim_a, running_sim(archives[1], faults) as sim_b:
        settings = settings_from_dict(
            {
                "mirror": {"root": str(tmp_path / "mirror"), "min_free_bytes": 0},
                "transfer": {"workers": 2, "retry_base_delay": 0.01, "read_timeout": 2.0},
                "sources": [
                    {"name": "a", "url": sim_a.url, "api": "v2"},
                    {"name": "b", "url": sim_b.url, "api": "v2"},
                ],
            },
            env={},
        )
        for source, archive in enumerate(archives):
            await queue_all(catalog, settings, archive, source)
        async with (
            NbiaClient(settings.sources[0], settings.transfer) as client_a,
            NbiaClient(settings.sources[1], settings.transfer) as client_b,
        ):
            report = await drain(
                settings=settings,
                catalog=catalog,
                clients={"a": client_a, "b": client_b},
                mirror=Mirror(settings.mirror.root),
                owner=OWNER,
                progress=Recorder(),
            )
    assert report.done == 12
    assert peak == 2  # two sources with two connections each, two workers in all


@asynccontextmanager
async def counting_proxy(upstream: str, delay: float) -> AsyncIterator[tuple[str, list[int]]]:
    """A few lines of real-shaped server in front of the simulator: it forwards every
    request, holds each download `delay` seconds, and records how many downloads were
    open at once (the server's view, not the client's)."""
    import aiohttp
    from aiohttp import web

    open_now = 0
    peaks: list[int] = [0]

    async def forward(request: web.Request) -> web.StreamResponse:
        nonlocal open_now
        download = "getImage" in request.path
        open_now += download
        peaks[0] = max(peaks[0], open_now)
        try:
            body = await request.read()
            headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
            url = upstream.rstrip("/") + request.path_qs.removeprefix("/nbia-api")
            async with session.request(request.method, url, data=body, headers=headers) as up:
                resp = web.StreamResponse(
                    status=up.status,
                    headers={
                        k: v
                        for k, v in up.headers.items()
                        if k.lower() in ("content-type", "content-encoding", "retry-after")
                    },
                )
                await resp.prepare(request)
                if download:
                    await asyncio.sleep(delay)
                async for chunk in up.content.iter_chunked(1 << 16):
                    await resp.write(chunk)
                await resp.write_eof()
                return resp
        finally:
            open_now -= download

    app = web.Application()
    app.router.add_route("*", "/nbia-api/{tail:.*}", forward)
    async with aiohttp.ClientSession(auto_decompress=False) as session, serving(app) as url:
        yield url, peaks


async def test_the_server_never_sees_more_downloads_at_once_than_workers(
    catalog: Catalog, sim: SimServer, sim_archive: SimArchive, tmp_path: Path
) -> None:
    # Twice as many worker tasks as slots: the extra ones must wait, not connect.
    async with counting_proxy(sim.url, delay=0.05) as (url, peaks):
        settings = make_settings(tmp_path / "mirror", sim, workers=2)
        settings = replace(settings, sources=[replace(settings.sources[0], url=url)])
        await queue_all(catalog, settings, sim_archive)
        report = await run_drain(settings, catalog)
    assert report.done == len(sim_archive.series)
    assert peaks[0] == 2


@pytest.mark.parametrize("local", [True, False])
async def test_tiny_series_are_processed_on_the_loop_only_on_a_local_disk(
    local: bool, catalog: Catalog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from nbia_sync import filesystems
    from nbia_sync.transfer import download

    fstype = "ext4" if local else "nfs4"
    info = tmp_path / "mountinfo"
    info.write_text(f"27 1 254:0 / / rw - {fstype} /dev/vda rw\n")
    monkeypatch.setattr(filesystems, "MOUNTINFO", info)
    on_loop: list[bool] = []
    feed = download._ThreadSide.feed

    def recording(side: Any, data: bytes | None, last: bool) -> Any:
        on_loop.append(threading.current_thread() is threading.main_thread())
        return feed(side, data, last)

    monkeypatch.setattr(download._ThreadSide, "feed", recording)
    archive = SimArchive.generate(
        collections=("SIM-CT",), patients=4, studies=1, series=1, images=1, image_size=2000, seed=9
    )
    async with running_sim(archive, SimFaults()) as sim:
        settings = make_settings(tmp_path / "mirror", sim, workers=2)
        await queue_all(catalog, settings, archive)
        report = await run_drain(settings, catalog)
    assert report.done == 4
    assert on_loop == [local] * 4
    assert len(mirror_state(tmp_path / "mirror", archive)) == 4


async def leases_while_draining(
    catalog: Catalog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, series: int
) -> list[int]:
    """Drain ``series`` one-file series with 2 workers (10 ms latency) and placements slowed
    to 50 ms, so that finished downloads pile up waiting for their commits; the number of
    series leased to the drain (downloading, waiting for a slot or a commit, claimed
    ahead), read from the catalog every few milliseconds meanwhile."""
    held: list[int] = []
    place_many = Mirror.place_many

    async def slow_place_many(self: Mirror, *args: Any, **kwargs: Any) -> Any:
        await anyio.sleep(0.05)
        return await place_many(self, *args, **kwargs)

    monkeypatch.setattr(Mirror, "place_many", slow_place_many)
    report: DrainReport | None = None
    archive = SimArchive.generate(
        collections=("SIM-CT",),
        patients=series,
        studies=1,
        series=1,
        images=1,
        image_size=2000,
        seed=5,
    )

    async def draining(settings: Settings, scope: anyio.CancelScope) -> None:
        nonlocal report
        report = await run_drain(settings, catalog)
        scope.cancel()

    async with running_sim(archive, SimFaults(latency=0.01)) as sim:
        settings = make_settings(tmp_path / "mirror", sim, workers=2)
        await queue_all(catalog, settings, archive)
        async with anyio.create_task_group() as tg:
            tg.start_soon(draining, settings, tg.cancel_scope)
            while True:
                held.append(await downloading(catalog))
                await anyio.sleep(0.002)
    assert report is not None and report.done == series
    return held


async def test_on_large_series_a_process_claims_two_series_per_download_slot_at_most(
    catalog: Catalog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nbia_sync.transfer import download, pool

    monkeypatch.setattr(download, "SMALL_SERIES_BYTES", 1)  # every series counts as large
    held = await leases_while_draining(catalog, tmp_path, monkeypatch, series=24)
    assert held and max(held) <= pool.LARGE_CLAIMS_PER_SLOT * 2


async def test_on_small_series_every_worker_may_hold_a_claim(
    catalog: Catalog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nbia_sync.transfer import pool

    held = await leases_while_draining(catalog, tmp_path, monkeypatch, series=48)
    # Once the series are seen to be small, the workers whose series wait for the slowed
    # commit hold them, and others claim: more than two per slot, never more than one
    # per worker.
    assert pool.LARGE_CLAIMS_PER_SLOT * 2 < max(held) <= pool.TASKS_PER_SLOT * 2


async def test_no_inodes_left_for_the_mirror_tree_stops_the_drain_and_gives_claims_back(
    catalog: Catalog,
    sim: SimServer,
    sim_archive: SimArchive,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import errno

    from nbia_sync import storage

    def no_inodes(path: Path, created: set[Path]) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage, "_makedirs_unsynced", no_inodes)
    settings = make_settings(tmp_path / "mirror", sim)
    await queue_all(catalog, settings, sim_archive)
    with pytest.raises(DiskSpaceError, match="disk full"):
        await run_drain(settings, catalog)
    assert await downloading(catalog) == 0
    assert await catalog.failures() == []  # no attempt counted against any series
    counts = await catalog.state_counts()
    assert counts.get(SeriesState.WANTED, (0, 0))[0] == 8
