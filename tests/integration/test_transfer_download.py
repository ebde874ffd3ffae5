"""fetch_series against the NBIA simulator: what it accepts, what it refuses, and how."""

from __future__ import annotations

import errno
import hashlib
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal

import pytest

from nbia_sync.api.client import NbiaClient
from nbia_sync.api.retry import RetryPolicy
from nbia_sync.catalog.records import Claim
from nbia_sync.config import SourceSettings, TransferSettings
from nbia_sync.errors import (
    DiskSpaceError,
    HostileArchiveError,
    IntegrityError,
    RetryableError,
)
from nbia_sync.progress import NullProgress
from nbia_sync.sim import SimArchive, SimSeries, SimServer
from nbia_sync.sim.testing import running_sim
from nbia_sync.transfer import download
from nbia_sync.transfer.download import FetchedSeries, fetch_series

pytestmark = pytest.mark.asyncio

TRANSFER = TransferSettings(
    read_timeout=1.0,
    connect_timeout=2.0,
    retry_base_delay=0.0,
    request_attempts=3,
    chunk_size=64 << 10,
)


def claim_for(s: SimSeries, **changes: object) -> Claim:
    fields: dict[str, object] = dict(
        series_id=1,
        source_id=1,
        source_name="sim",
        series_uid=s.uid,
        study_uid=s.study_uid,
        collection=s.collection,
        patient_id=s.patient_id,
        modality=s.modality,
        image_count=s.image_count,
        file_size=s.file_size,
        generation=1,
        attempts=0,
        placed_path=None,
    )
    fields.update(changes)
    return Claim(**fields)  # type: ignore[arg-type]


@asynccontextmanager
async def client_for(sim: SimServer, api: Literal["v2", "v4"] = "v2") -> AsyncIterator[NbiaClient]:
    source = SourceSettings(name="sim", url=sim.url, api=api)
    policy = RetryPolicy(base_delay=0.0, max_delay=0.0, attempts=3)
    async with NbiaClient(source, TRANSFER, policy=policy) as client:
        yield client


def first_series(archive: SimArchive) -> SimSeries:
    return next(iter(archive.series.values()))


async def fetch(
    sim: SimServer,
    s: SimSeries,
    staging: Path,
    api: Literal["v2", "v4"] = "v2",
    **claim_changes: object,
) -> FetchedSeries:
    async with client_for(sim, api) as client:
        return await fetch_series(
            client,
            claim_for(s, **claim_changes),
            staging,
            chunk_size=TRANSFER.chunk_size,
            progress=NullProgress(),
        )


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def exists(path: Path) -> bool:
    return path.exists()


def assert_matches_truth(fetched: FetchedSeries, archive: SimArchive, s: SimSeries) -> None:
    truth = archive.truth()[s.uid]
    assert {f.sop_uid: f.md5 for f in fetched.files} == truth
    for f in fetched.files:
        assert f.path.name == f"{f.sop_uid}.dcm"
        assert hashlib.md5(f.path.read_bytes()).hexdigest() == truth[f.sop_uid]
    assert sorted(p.name for p in fetched.staging_dir.iterdir()) == sorted(
        f"{sop}.dcm" for sop in truth
    )


async def test_series_is_staged_under_sop_uids_with_true_md5s(
    sim: SimServer, sim_archive: SimArchive, tmp_path: Path
) -> None:
    s = first_series(sim_archive)
    fetched = await fetch(sim, s, tmp_path / "stage")
    assert_matches_truth(fetched, sim_archive, s)
    assert fetched.bytes_downloaded > fetched.size > 0


@pytest.mark.parametrize("api", ["v2", "v4"])
async def test_deflate_archives_with_data_descriptors_are_accepted(
    sim_archive: SimArchive, tmp_path: Path, api: Literal["v2", "v4"]
) -> None:
    async with running_sim(sim_archive, compression="deflate") as sim:
        s = first_series(sim_archive)
        assert_matches_truth(await fetch(sim, s, tmp_path / "stage", api), sim_archive, s)


async def test_v4_get_image_with_license_entry_is_accepted(
    sim: SimServer, sim_archive: SimArchive, tmp_path: Path
) -> None:
    s = first_series(sim_archive)
    assert_matches_truth(await fetch(sim, s, tmp_path / "stage", "v4"), sim_archive, s)


@pytest.mark.parametrize("fault", ["truncate", "corrupt"])
async def test_damaged_archive_is_integrity_error_and_staging_removed(
    sim: SimServer, sim_archive: SimArchive, tmp_path: Path, fault: Literal["truncate", "corrupt"]
) -> None:
    s = first_series(sim_archive)
    sim.faults.script_series(s.uid, [fault])
    with pytest.raises(IntegrityError):
        await fetch(sim, s, tmp_path / "stage")
    assert not (tmp_path / "stage").exists()


@pytest.mark.parametrize("fault", ["reset", "stall"])
async def test_broken_connection_is_retryable_and_staging_removed(
    sim: SimServer, sim_archive: SimArchive, tmp_path: Path, fault: Literal["reset", "stall"]
) -> None:
    sim.faults.stall_seconds = 3.0  # beyond the client's 1 s read timeout
    s = first_series(sim_archive)
    sim.faults.script_series(s.uid, [fault])
    with pytest.raises(RetryableError):
        await fetch(sim, s, tmp_path / "stage")
    assert not (tmp_path / "stage").exists()


async def test_hostile_archive_is_refused_and_nothing_lands_outside_staging(
    sim: SimServer, sim_archive: SimArchive, tmp_path: Path
) -> None:
    s = first_series(sim_archive)
    sim.faults.script_series(s.uid, ["hostile"])
    staging = tmp_path / "a" / "b" / "stage"
    with pytest.raises(HostileArchiveError):
        await fetch(sim, s, staging)
    assert not staging.exists()
    assert files_under(tmp_path) == []
    assert not exists(Path("/etc/evil.dcm"))


async def test_wrong_file_count_is_integrity_error(
    sim: SimServer, sim_archive: SimArchive, tmp_path: Path
) -> None:
    s = first_series(sim_archive)
    with pytest.raises(IntegrityError, match="ImageCount"):
        await fetch(sim, s, tmp_path / "stage", image_count=s.image_count + 1)


async def test_files_of_another_study_are_integrity_error(
    sim: SimServer, sim_archive: SimArchive, tmp_path: Path
) -> None:
    s = first_series(sim_archive)
    with pytest.raises(IntegrityError, match="study"):
        await fetch(sim, s, tmp_path / "stage", study_uid="1.2.3.999")


async def test_a_previous_attempts_leftovers_are_cleared(
    sim: SimServer, sim_archive: SimArchive, tmp_path: Path
) -> None:
    stage = tmp_path / "stage"
    stage.mkdir()
    (stage / "00000007.part").write_bytes(b"half a file")
    s = first_series(sim_archive)
    assert_matches_truth(await fetch(sim, s, stage), sim_archive, s)


async def test_bandwidth_limit_paces_the_download(
    sim: SimServer, sim_archive: SimArchive, tmp_path: Path
) -> None:
    from nbia_sync.transfer._ratelimit import TokenBucket

    s = first_series(sim_archive)
    waited: list[int] = []

    class Recording(TokenBucket):
        async def acquire(self, n: int) -> None:
            waited.append(n)
            await super().acquire(n)

    limiter = Recording(rate=1 << 30)
    async with client_for(sim) as client:
        fetched = await fetch_series(
            client,
            claim_for(s),
            tmp_path / "s",
            chunk_size=TRANSFER.chunk_size,
            progress=NullProgress(),
            limiter=limiter,
        )
    assert sum(waited) == fetched.bytes_downloaded


async def test_big_series_streams_with_flat_memory(tmp_path: Path) -> None:
    size = 200 << 20
    archive = SimArchive.generate(
        collections=("BIG",), patients=1, series=1, images=4, image_size=size // 4
    )
    s = first_series(archive)
    async with running_sim(archive) as sim:
        tracemalloc.start()
        try:
            fetched = await fetch(sim, s, tmp_path / "stage")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert fetched.size > size * 0.99
    # Simulator and client share the process: the peak covers both sides' buffers.
    assert peak < 16 << 20, f"peak {peak >> 20} MiB for a {size >> 20} MiB series"


async def test_disk_full_while_writing_is_disk_space_error(
    sim: SimServer, sim_archive: SimArchive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(self: object, event: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(download._SeriesWriter, "_handle", full)
    with pytest.raises(DiskSpaceError, match="disk full"):
        await fetch(sim, first_series(sim_archive), tmp_path / "stage")
    assert not exists(tmp_path / "stage")
