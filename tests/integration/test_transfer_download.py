"""fetch_series against the NBIA simulator: what it accepts, what it refuses, and how."""

from __future__ import annotations

import errno
import hashlib
import random
import threading
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest
import served_apps

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
from nbia_sync.sim import SimArchive, SimFaults, SimSeries, SimServer
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
    inline: bool = False,
    **claim_changes: object,
) -> FetchedSeries:
    async with client_for(sim, api) as client:
        return await fetch_series(
            client,
            claim_for(s, **claim_changes),
            staging,
            chunk_size=TRANSFER.chunk_size,
            progress=NullProgress(),
            inline=inline,
        )


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def exists(path: Path) -> bool:
    return path.exists()


def assert_matches_truth(fetched: FetchedSeries, archive: SimArchive, s: SimSeries) -> None:
    truth = archive.truth()[s.uid]
    assert {f.sop_uid: f.md5 for f in fetched.files} == truth
    if fetched.in_memory:
        assert not fetched.staging_dir.exists()  # written at the group commit
        assert {p.name: hashlib.md5(data).hexdigest() for p, data in fetched.unwritten} == {
            f"{sop}.dcm": md5 for sop, md5 in truth.items()
        }
        assert all(p.parent == fetched.staging_dir for p, _ in fetched.unwritten)
        return
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


# -- hostile sizes, empty archives, long UIDs, blank and unpadded hashes ------------------


async def test_deflate_bomb_from_the_simulator_is_hostile_before_the_disk_fills(
    sim_archive: SimArchive, tmp_path: Path
) -> None:
    s = first_series(sim_archive)
    async with running_sim(sim_archive, SimFaults(bomb_bytes=256 << 20)) as sim:
        sim.faults.script_series(s.uid, ["bomb"])
        tracemalloc.start()
        try:
            with pytest.raises(HostileArchiveError, match="declared size of 1024"):
                await fetch(sim, s, tmp_path / "stage")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak < 32 << 20
    assert not (tmp_path / "stage").exists()


def _zip_server(body: bytes, piece: int = 1 << 16) -> Any:
    """A few lines of hostile server: every getImage* answers ``body`` as a ZIP, ``piece``
    bytes a write (each its own chunk of the chunked body)."""
    from aiohttp import web

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/zip"})
        await resp.prepare(request)
        for i in range(0, len(body), piece):
            await resp.write(body[i : i + piece])
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/nbia-api/services/v4/{endpoint}", handler)
    return app


@asynccontextmanager
async def serving(body: bytes, piece: int = 1 << 16) -> AsyncIterator[str]:
    """A server that answers every download with ``body``; its API root URL."""
    async with served_apps.serving(_zip_server(body, piece)) as url:
        yield url


async def fetch_from(url: str, claim: Claim, staging: Path, inline: bool = False) -> FetchedSeries:
    source = SourceSettings(name="hostile", url=url, api="v4")
    policy = RetryPolicy(base_delay=0.0, max_delay=0.0, attempts=1)
    async with NbiaClient(source, TRANSFER, policy=policy) as client:
        return await fetch_series(
            client,
            claim,
            staging,
            chunk_size=TRANSFER.chunk_size,
            progress=NullProgress(),
            inline=inline,
        )


def _hash_list(rows: list[tuple[str, str]]) -> bytes:
    return "\n".join(["Filename,MD5Hash", *(f"{n},{m}" for n, m in rows), ""]).encode()


async def test_series_inflating_past_its_listed_file_size_is_hostile(
    sim_archive: SimArchive, tmp_path: Path
) -> None:
    from transfer_zips import DEFLATED, Entry, build_zip

    # Sizes only in data descriptors (no declared size to check): the listing's
    # FileSize is the bound.
    s = first_series(sim_archive)
    big = b"\0" * (download.SIZE_MARGIN_BYTES + (2 << 20))
    body = build_zip(
        [
            Entry("1.dcm", big, DEFLATED, descriptor=True, sizes_in_header=False),
            Entry("md5hashes.csv", _hash_list([("1.dcm", hashlib.md5(big).hexdigest())])),
        ]
    )
    async with serving(body) as url:
        with pytest.raises(HostileArchiveError, match="FileSize is 1000"):
            await fetch_from(url, claim_for(s, file_size=1000, image_count=1), tmp_path / "st")
    assert not (tmp_path / "st").exists()


@pytest.mark.parametrize("image_count", [None, 3])
async def test_an_empty_archive_is_not_a_zero_file_series(
    sim_archive: SimArchive, tmp_path: Path, image_count: int | None
) -> None:
    from transfer_zips import Entry, build_zip

    body = build_zip([Entry("md5hashes.csv", _hash_list([]))])
    s = first_series(sim_archive)
    async with serving(body) as url:
        with pytest.raises(IntegrityError, match=r"no files|ImageCount"):
            await fetch_from(url, claim_for(s, image_count=image_count), tmp_path / "st")


async def test_an_empty_archive_is_accepted_when_the_listing_says_zero(
    sim_archive: SimArchive, tmp_path: Path
) -> None:
    from transfer_zips import Entry, build_zip

    body = build_zip([Entry("md5hashes.csv", _hash_list([]))])
    s = first_series(sim_archive)
    async with serving(body) as url:
        fetched = await fetch_from(url, claim_for(s, image_count=0), tmp_path / "st")
    assert fetched.files == []


async def test_unpadded_hashes_from_the_simulator_are_compared_padded(
    tmp_path: Path,
) -> None:
    archive = SimArchive.generate(
        collections=("C",), patients=1, studies=1, series=1, images=40, image_size=600, seed=3
    )
    s = first_series(archive)
    assert any(md5.startswith("0") for md5 in archive.truth()[s.uid].values())
    async with running_sim(archive) as sim:
        sim.faults.md5_unpadded = True
        fetched = await fetch(sim, s, tmp_path / "stage")
    assert_matches_truth(fetched, archive, s)
    assert fetched.unverified == 0


async def test_blank_hashes_are_accepted_on_the_other_checks_and_counted(
    tmp_path: Path,
) -> None:
    archive = SimArchive.generate(
        collections=("C",), patients=1, studies=1, series=1, images=12, image_size=600, seed=4
    )
    s = first_series(archive)
    async with running_sim(archive) as sim:
        sim.faults.md5_blank = 0.5
        fetched = await fetch(sim, s, tmp_path / "stage")
    assert_matches_truth(fetched, archive, s)  # our own MD5 of every file is recorded
    assert 0 < fetched.unverified < 12


async def test_a_blank_hash_still_needs_the_file_to_be_of_this_series(
    tmp_path: Path,
) -> None:
    archive = SimArchive.generate(
        collections=("C",), patients=1, studies=1, series=1, images=4, image_size=600, seed=4
    )
    s = first_series(archive)
    async with running_sim(archive) as sim:
        sim.faults.md5_blank = 1.0
        with pytest.raises(IntegrityError, match="study"):
            async with client_for(sim) as client:
                await fetch_series(
                    client,
                    claim_for(s, study_uid="1.2.3.999"),
                    tmp_path / "stage",
                    chunk_size=TRANSFER.chunk_size,
                    progress=NullProgress(),
                    check_dicom=False,  # the UID checks apply to unverified files anyway
                )


@pytest.mark.filterwarnings("ignore:The value length:UserWarning")  # pydicom: UI > 64 chars
async def test_a_300_digit_sop_uid_is_stored_under_a_short_safe_name(
    sim_archive: SimArchive, tmp_path: Path
) -> None:
    import io

    import pydicom
    from transfer_zips import Entry, build_zip

    s = first_series(sim_archive)
    data = s.instances[0].read()
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.SOPInstanceUID = "1." + "2" * 298
    out = io.BytesIO()
    ds.save_as(out)
    dcm = out.getvalue()
    body = build_zip(
        [Entry("1.dcm", dcm), Entry("md5hashes.csv", _hash_list([("1.dcm", md5_hex(dcm))]))]
    )
    async with serving(body) as url:
        fetched = await fetch_from(url, claim_for(s, image_count=1), tmp_path / "st")
    (f,) = fetched.files
    assert f.sop_uid == "1." + "2" * 298
    assert len(f.path.name.encode()) <= 255 and f.path.is_file()


@pytest.mark.parametrize("inline", [True, False], ids=["in-memory", "on-disk"])
async def test_two_entries_holding_one_sop_uid_are_refused_and_nothing_is_left_staged(
    inline: bool, sim_archive: SimArchive, tmp_path: Path
) -> None:
    # One file under two names, both listed with the right MD5: as files of the mirror
    # they would be one name, so the archive is not a series.
    from transfer_zips import Entry, build_zip

    s = first_series(sim_archive)
    dcm = s.instances[0].read()
    listed = _hash_list([("1.dcm", md5_hex(dcm)), ("2.dcm", md5_hex(dcm))])
    body = build_zip([Entry("1.dcm", dcm), Entry("2.dcm", dcm), Entry("md5hashes.csv", listed)])
    staging = tmp_path / "st"
    async with serving(body) as url:
        claim = claim_for(s, image_count=2, file_size=2 * len(dcm) if inline else None)
        with pytest.raises(
            IntegrityError, match=f"SOPInstanceUID {s.instances[0].sop_uid} appears twice"
        ):
            await fetch_from(url, claim, staging, inline=inline)
    assert not staging.exists()


def test_a_file_takes_its_mirror_name_as_soon_as_it_is_whole(
    sim_archive: SimArchive, tmp_path: Path
) -> None:
    # Named while the rest of the archive still streams, not all at once after its
    # last byte: the end of a series is left with checks only.
    from transfer_zips import Entry, build_zip

    s = first_series(sim_archive)
    first, second = s.instances[0], s.instances[1]
    body = build_zip([Entry("1.dcm", first.read()), Entry("2.dcm", second.read())])
    cut = body.index(b"PK\x03\x04", 1) + 200  # the second entry's header, then some data
    staging = tmp_path / "st"
    staging.mkdir()
    writer = download._SeriesWriter(staging, s.uid, s.study_uid, 2, True)
    writer.feed(body[:cut])
    assert sorted(p.name for p in staging.iterdir()) == sorted(
        [f"{first.sop_uid}.dcm", "00000001.part"]
    )


@pytest.mark.parametrize("right", [True, False], ids=["matching", "one-digit-off"])
async def test_a_hash_list_with_crlf_lines_and_quoted_rows_is_checked_all_the_same(
    right: bool, sim_archive: SimArchive, tmp_path: Path
) -> None:
    # The archive writes plain "\n" lines; a proxy or another deployment may write the
    # list as a spreadsheet does: CRLF line ends, every field quoted. Read as csv then.
    from transfer_zips import Entry, build_zip

    s = first_series(sim_archive)
    files = {f"{i:08d}.dcm": inst.read() for i, inst in enumerate(s.instances, 1)}
    sums = {name: md5_hex(data) for name, data in files.items()}
    if not right:
        first = next(iter(sums))
        sums[first] = sums[first][:-1] + ("0" if sums[first][-1] != "0" else "1")
    rows = ['"Filename","MD5Hash"', *(f'"{n}","{m}"' for n, m in sums.items()), ""]
    body = build_zip(
        [Entry(n, d) for n, d in files.items()]
        + [Entry("md5hashes.csv", "\r\n".join(rows).encode())]
    )
    async with serving(body) as url:
        if right:
            fetched = await fetch_from(url, claim_for(s), tmp_path / "st")
            assert sorted(f.md5 for f in fetched.files) == sorted(sums.values())
        else:
            with pytest.raises(IntegrityError, match="MD5 mismatch"):
                await fetch_from(url, claim_for(s), tmp_path / "st")


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


async def hops(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, file_size: int) -> list[int]:
    """The sizes handed to the worker thread for one ~600 KB series listed as ``file_size``."""
    archive = SimArchive.generate(
        collections=("SIM-CT",), patients=1, studies=1, series=1, images=12, image_size=50_000
    )
    sizes: list[int] = []
    real = download._ThreadSide.feed

    def spy(self: Any, data: bytes | None, last: bool) -> Any:
        sizes.append(len(data or b""))
        return real(self, data, last)

    monkeypatch.setattr(download._ThreadSide, "feed", spy)
    async with running_sim(archive, SimFaults(bandwidth=2_000_000)) as sim:
        s = first_series(archive)
        async with client_for(sim) as client:
            await fetch_series(
                client,
                claim_for(s, file_size=file_size),
                tmp_path / "stage",
                chunk_size=256 << 10,
                progress=NullProgress(),
            )
    return sizes


async def test_a_small_series_hops_to_the_thread_in_pieces_smaller_than_the_budget(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    sizes = await hops(monkeypatch, tmp_path, file_size=600_000)
    assert all(n >= 64 << 10 for n in sizes[:-1])
    assert min(sizes[:-1]) < 256 << 10  # processing started before a budget's worth waited


async def test_a_large_series_hops_the_whole_read_budget_at_a_time(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    sizes = await hops(monkeypatch, tmp_path, file_size=download.SMALL_SERIES_BYTES)
    assert len(sizes) >= 2 and all(n >= 256 << 10 for n in sizes[:-1])


@dataclass(frozen=True)
class _Hop:
    size: int  # bytes handed over
    last: bool
    on_loop: bool  # processed on the event loop's thread, not a worker thread


def _record_hops(monkeypatch: pytest.MonkeyPatch) -> list[_Hop]:
    """Every piece of processing fetch_series hands over, in order."""
    hops: list[_Hop] = []
    feed = download._ThreadSide.feed

    def recording(side: Any, data: bytes | None, last: bool) -> Any:
        on_loop = threading.current_thread() is threading.main_thread()
        hops.append(_Hop(len(data or b""), last, on_loop))
        return feed(side, data, last)

    monkeypatch.setattr(download._ThreadSide, "feed", recording)
    return hops


async def test_tiny_series_is_processed_in_one_hop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = SimArchive.generate(
        collections=("C",), patients=1, series=1, images=2, image_size=1000, seed=5
    )
    hops = _record_hops(monkeypatch)
    async with running_sim(archive) as sim:
        s = first_series(archive)
        assert s.file_size < download._MIN_HOP
        fetched = await fetch(sim, s, tmp_path / "st")
    assert_matches_truth(fetched, archive, s)
    assert [h.last for h in hops] == [True]


def ten_files_of_32_kib() -> SimArchive:
    return SimArchive.generate(
        collections=("C",), patients=1, series=1, images=10, image_size=32 << 10, seed=6
    )


async def test_series_larger_than_listed_hops_within_the_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Listed as tiny (read whole), but ~5 hops' budget: memory stays bounded anyway.
    archive = ten_files_of_32_kib()
    hops = _record_hops(monkeypatch)
    async with running_sim(archive) as sim:
        s = first_series(archive)
        fetched = await fetch(sim, s, tmp_path / "st", file_size=1000)
    assert_matches_truth(fetched, archive, s)
    assert len(hops) > 2
    assert [h.last for h in hops] == [False] * (len(hops) - 1) + [True]
    # At most the budget plus one network chunk waits for the thread.
    assert max(h.size for h in hops) <= 2 * TRANSFER.chunk_size


async def test_series_above_one_hop_is_processed_while_it_arrives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = ten_files_of_32_kib()
    hops = _record_hops(monkeypatch)
    async with running_sim(archive, SimFaults(bandwidth=2 << 20)) as sim:
        s = first_series(archive)
        fetched = await fetch(sim, s, tmp_path / "st")
    assert_matches_truth(fetched, archive, s)
    # The pipe hands over what arrived, ~64 KiB at a time, before the end.
    assert len(hops) >= 3


def past_the_size_bound(seed: int) -> bytes:
    """A one-file archive of ~6 MB of incompressible data, more than any series listed
    at 1,000 bytes may inflate to (download.SIZE_MARGIN_BYTES)."""
    from transfer_zips import DEFLATED, Entry, build_zip

    big = random.Random(seed).randbytes(download.SIZE_MARGIN_BYTES + (2 << 20))
    return build_zip(
        [
            Entry("1.dcm", big, DEFLATED, descriptor=True, sizes_in_header=False),
            Entry("md5hashes.csv", _hash_list([("1.dcm", hashlib.md5(big).hexdigest())])),
        ]
    )


async def test_series_listed_tiny_that_a_server_makes_huge_is_refused_in_bounded_hops(
    sim_archive: SimArchive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Listed at 1,000 bytes (read whole), then ~6 MB of incompressible data on the wire:
    # nothing is buffered past the read budget, and the size bound refuses it.
    body = past_the_size_bound(seed=7)
    hops = _record_hops(monkeypatch)
    async with serving(body) as url:
        with pytest.raises(HostileArchiveError, match="FileSize is 1000"):
            s = first_series(sim_archive)
            await fetch_from(url, claim_for(s, file_size=1000, image_count=1), tmp_path / "st")
    assert not (tmp_path / "st").exists()
    assert len(hops) > 8
    assert max(h.size for h in hops) <= 2 * TRANSFER.chunk_size


@pytest.mark.parametrize("local_disk", [True, False])
async def test_tiny_series_is_processed_on_the_event_loop_only_on_a_local_disk(
    local_disk: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = SimArchive.generate(
        collections=("C",), patients=1, series=1, images=2, image_size=1000, seed=5
    )
    hops = _record_hops(monkeypatch)
    async with running_sim(archive) as sim:
        s = first_series(archive)
        fetched = await fetch(sim, s, tmp_path / "st", inline=local_disk)
    assert_matches_truth(fetched, archive, s)
    assert [h.on_loop for h in hops] == [local_disk]


def _three_tiny_files() -> SimArchive:
    """One series of three 1 KB files: listed well under one hop, kept in memory."""
    return SimArchive.generate(
        collections=("C",), patients=1, series=1, images=3, image_size=1000, seed=5
    )


@pytest.mark.parametrize("local_disk", [True, False])
async def test_tiny_series_is_kept_in_memory_only_on_a_local_disk(
    local_disk: bool, tmp_path: Path
) -> None:
    archive = _three_tiny_files()
    async with running_sim(archive) as sim:
        s = first_series(archive)
        fetched = await fetch(sim, s, tmp_path / "st", inline=local_disk)
    assert fetched.in_memory is local_disk
    assert (tmp_path / "st").exists() is not local_disk
    assert_matches_truth(fetched, archive, s)


@pytest.mark.parametrize("local_disk", [True, False])
async def test_tiny_series_sent_a_few_bytes_a_write_is_verified_whole(
    local_disk: bool, tmp_path: Path
) -> None:
    # The simulator sends 8 KiB writes, as the archive does; a proxy or another
    # deployment may not. The same ZIP in 7-byte chunks gives the same verified files,
    # in memory and through the thread.
    import aiohttp

    archive = _three_tiny_files()
    s = first_series(archive)
    async with running_sim(archive) as sim, aiohttp.ClientSession() as http:
        params = {"SeriesInstanceUID": s.uid, "IncludeMD5": "Yes"}
        async with http.get(f"{sim.url}services/v4/getImage", params=params) as r:
            body = await r.read()
    async with serving(body, piece=7) as url:
        fetched = await fetch_from(url, claim_for(s), tmp_path / "st", inline=local_disk)
    assert fetched.in_memory is local_disk
    assert_matches_truth(fetched, archive, s)


async def test_tiny_listed_series_sent_larger_leaves_memory_for_staging(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Listed at 1,000 bytes (kept in memory), sent as 3 files of 120 KB (a listing out
    # of date, within the size bound): past download._MEMORY_BYTES what is held goes to
    # staging and the rest is written there; the series is still accepted whole.
    archive = SimArchive.generate(
        collections=("C",), patients=1, series=1, images=3, image_size=120_000, seed=6
    )
    assert 2 * 120_000 < download._MEMORY_BYTES < 3 * 120_000
    hops = _record_hops(monkeypatch)
    async with running_sim(archive) as sim:
        s = first_series(archive)
        fetched = await fetch(sim, s, tmp_path / "st", inline=True, file_size=1000)
    assert not fetched.in_memory and not fetched.unwritten
    assert_matches_truth(fetched, archive, s)
    assert hops[0].on_loop and hops[0].size <= download._MIN_HOP


async def test_tiny_listed_series_that_must_be_spooled_and_spills_is_still_accepted(
    tmp_path: Path,
) -> None:
    # Real DICOM files of a series, re-zipped the way only the spool can read (stored,
    # sizes only in data descriptors) and listed at 1,000 bytes: the reader's spool makes
    # the staging directory while the files are held in memory, then they spill into it.
    from transfer_zips import STORED, Entry, build_zip

    archive = SimArchive.generate(
        collections=("C",), patients=1, series=1, images=3, image_size=120_000, seed=9
    )
    s = first_series(archive)
    async with running_sim(archive) as sim:
        staged = await fetch(sim, s, tmp_path / "plain")
    files = {f.path.name: f.path.read_bytes() for f in staged.files}
    rows = [(name, hashlib.md5(data).hexdigest()) for name, data in files.items()]
    body = build_zip(
        [Entry(n, d, STORED, descriptor=True, sizes_in_header=False) for n, d in files.items()]
        + [Entry("md5hashes.csv", _hash_list(rows))]
    )
    async with serving(body) as url:
        claim = claim_for(s, file_size=1000)
        fetched = await fetch_from(url, claim, tmp_path / "st", inline=True)
    assert not fetched.in_memory
    assert {f.path.name: f.path.read_bytes() for f in fetched.files} == files
    assert sorted(p.name for p in fetched.staging_dir.iterdir()) == sorted(files)


async def test_series_above_one_hop_is_processed_in_the_worker_thread_on_a_local_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = ten_files_of_32_kib()
    hops = _record_hops(monkeypatch)
    async with running_sim(archive) as sim:
        s = first_series(archive)
        fetched = await fetch(sim, s, tmp_path / "st", inline=True)
    assert_matches_truth(fetched, archive, s)
    assert hops and not any(h.on_loop for h in hops)


async def test_hops_a_lying_server_makes_big_leave_the_event_loop(
    sim_archive: SimArchive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Listed at 1,000 bytes (processed on the loop), then ~6 MB on the wire: past the
    # first minimum hop everything goes to the thread, and the size bound refuses it.
    body = past_the_size_bound(seed=8)
    hops = _record_hops(monkeypatch)
    async with serving(body) as url:
        with pytest.raises(HostileArchiveError, match="FileSize is 1000"):
            s = first_series(sim_archive)
            claim = claim_for(s, file_size=1000, image_count=1)
            await fetch_from(url, claim, tmp_path / "st", inline=True)
    assert not (tmp_path / "st").exists()
    assert len(hops) > 8
    assert [h.on_loop for h in hops[1:]] == [False] * (len(hops) - 1)
    assert hops[0].size <= download._MIN_HOP
