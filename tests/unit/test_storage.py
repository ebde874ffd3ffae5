"""The mirror layout, safe path parts, atomic placement and the disk-space guard."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import anyio
import pytest

from nbia_sync.clock import FakeClock
from nbia_sync.errors import DiskSpaceError, SeriesTooLargeError
from nbia_sync.storage import SPACE_READ_INTERVAL, Mirror, safe_part

pytestmark = pytest.mark.asyncio

UID = "1.3.6.1.4.1.14519.5.2.1.7009.9004.123456789012345678901234567890"


# -- safe_part -------------------------------------------------------------------------


async def test_uids_and_ordinary_names_pass_unchanged() -> None:
    for text in (UID, "TCGA-BRCA", "NSCLC Radiogenomics", "LIDC-IDRI-0001", "Ünïcode"):
        assert safe_part(text) == text


@pytest.mark.parametrize(
    "text", ["a/b", "a\\b", "a\x00b", "a\nb", "a\x7fb", ".", "..", ".hidden", "", "%2F"]
)
async def test_unsafe_text_becomes_one_plain_component(text: str) -> None:
    part = safe_part(text)
    assert part not in ("", ".", "..")
    assert not part.startswith(".")
    assert not any(c in part for c in "/\\\x00") and all(ord(c) >= 0x20 for c in part)
    assert safe_part(text) == part  # deterministic


async def test_distinct_inputs_never_share_a_component() -> None:
    inputs = ["a/b", "a%2Fb", "a_b", "a%b", ".x", "%2Ex", "x", "", "%", "..", "%2E%2E"]
    parts = [safe_part(t) for t in inputs]
    assert len(set(parts)) == len(inputs)


async def test_long_names_fit_255_bytes_and_stay_distinct() -> None:
    a, b = "é" * 300 + "a", "é" * 300 + "b"
    pa, pb = safe_part(a), safe_part(b)
    assert len(pa.encode()) <= 255 and len(pb.encode()) <= 255
    assert pa != pb
    assert safe_part(a) == pa


async def test_long_name_cut_never_splits_an_escape() -> None:
    part = safe_part("/" * 100)
    prefix = part.split("%h")[0]
    assert prefix == "%2F" * (len(prefix) // 3)


async def test_uid_of_64_characters_passes_and_65_is_hashed() -> None:
    assert safe_part("1" * 64) == "1" * 64
    part = safe_part("1" * 65)
    assert "%h" in part and len(part) <= 64
    assert part != safe_part("1" * 66)


async def test_300_digit_uid_becomes_a_short_distinct_component(tmp_path: Path) -> None:
    a, b = "1." + "2" * 298, "1." + "2" * 297 + "3"
    pa, pb = safe_part(a), safe_part(b)
    assert pa != pb and max(len(pa), len(pb)) <= 64
    (tmp_path / f"{pa}.dcm").write_bytes(b"x")  # a name the file system takes


# -- layout ----------------------------------------------------------------------------


async def test_series_dir_follows_the_layout(tmp_path: Path) -> None:
    m = Mirror(tmp_path)
    d = m.series_dir("TCGA-BRCA", "TCGA/01", "1.2.3", "1.2.3.4")
    assert d == tmp_path / "TCGA-BRCA" / "TCGA%2F01" / "1.2.3" / "1.2.3.4"
    assert m.relative(d / "5.dcm") == "TCGA-BRCA/TCGA%2F01/1.2.3/1.2.3.4/5.dcm"


async def test_staging_is_under_the_root_per_owner(tmp_path: Path) -> None:
    m = Mirror(tmp_path)
    assert m.staging_dir("host:12:run/1", "1.2.3") == (
        tmp_path / ".nbia-sync" / "staging" / "host:12:run%2F1" / "1.2.3"
    )


# -- placement -------------------------------------------------------------------------


def stage(dir_: Path, files: dict[str, bytes]) -> Path:
    dir_.mkdir(parents=True)
    for name, data in files.items():
        (dir_ / name).write_bytes(data)
    return dir_


async def place(m: Mirror, staged: Path, final: Path) -> None:
    """What the pool does for one series (the download fsynced the staged files)."""
    assert await m.place_many([(staged, final)]) == [None]


def tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and ".nbia-sync" not in p.parts
    }


async def test_place_many_moves_staging_into_the_tree(tmp_path: Path) -> None:
    m = Mirror(tmp_path)
    staged = stage(m.staging_dir("me", "1.2"), {"1.dcm": b"one", "2.dcm": b"two"})
    final = m.series_dir("C", "P", "1.1", "1.2")
    await place(m, staged, final)
    assert tree(tmp_path) == {"C/P/1.1/1.2/1.dcm": b"one", "C/P/1.1/1.2/2.dcm": b"two"}
    assert not staged.exists()


async def test_replacing_a_series_leaves_no_stale_file(tmp_path: Path) -> None:
    m = Mirror(tmp_path)
    final = m.series_dir("C", "P", "1.1", "1.2")
    await place(m, stage(m.staging_dir("me", "1.2"), {"1.dcm": b"o", "2.dcm": b"o"}), final)
    await place(m, stage(m.staging_dir("me", "1.2"), {"1.dcm": b"new"}), final)
    assert tree(tmp_path) == {"C/P/1.1/1.2/1.dcm": b"new"}
    assert not any(m.trash_root.iterdir())


_KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, anyio
    from pathlib import Path
    from nbia_sync.storage import Mirror

    root, kill_at = Path(sys.argv[1]), int(sys.argv[2])
    calls = 0
    real_rename = os.rename

    def rename(src, dst):
        global calls
        calls += 1
        if calls == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        real_rename(src, dst)

    os.rename = rename
    m = Mirror(root)
    moves = [(m.staging_dir("dead", "1.2"), m.series_dir("C", "P", "1.1", "1.2"))]
    assert anyio.run(m.place_many, moves) == [None]
    """
)

OLD = {"1.dcm": b"old-1" * 1000, "2.dcm": b"old-2" * 1000}
NEW = {"1.dcm": b"new-1" * 1000, "3.dcm": b"new-3" * 1000}


@pytest.mark.parametrize(
    "kill_at",
    [1, 2, 3, 4],
    ids=["before-any-rename", "new-refused-by-the-old", "old-moved-aside", "after-placing"],
)
async def test_placement_killed_midway_never_shows_a_mixed_or_partial_series(
    tmp_path: Path, kill_at: int
) -> None:
    m = Mirror(tmp_path)
    final = m.series_dir("C", "P", "1.1", "1.2")
    await place(m, stage(m.staging_dir("old", "1.2"), OLD), final)
    staged = stage(m.staging_dir("dead", "1.2"), NEW)
    proc = await anyio.run_process(
        [sys.executable, "-c", _KILL_SCRIPT, str(tmp_path), str(kill_at)], check=False
    )
    placed = {k.rsplit("/", 1)[1]: v for k, v in tree(tmp_path).items()}
    if kill_at == 4:
        # Three renames: the new copy refused by the old one, the old aside, the new in.
        assert proc.returncode == 0
        assert placed == NEW
    else:
        assert proc.returncode == -9
        # The tree holds the old series whole or nothing; the new one waits in staging.
        assert placed in (OLD, {})
        assert {p.name: p.read_bytes() for p in staged.iterdir()} == NEW
    removed = await m.clean_staging(keep_owners=["alive"])
    assert "dead" in removed or kill_at == 4
    assert not m.trash_root.exists()
    assert not (m.staging_root / "dead").exists()


async def test_clean_staging_keeps_live_owners(tmp_path: Path) -> None:
    m = Mirror(tmp_path)
    stage(m.staging_dir("host:1:a", "1.2"), {"x": b"x"})
    stage(m.staging_dir("host:2:b", "1.2"), {"x": b"x"})
    removed = await m.clean_staging(keep_owners=["host:1:a"])
    assert removed == [safe_part("host:2:b")]
    assert (m.staging_dir("host:1:a", "1.2") / "x").exists()


# -- space ------------------------------------------------------------------------------


async def test_free_bytes_matches_statvfs(tmp_path: Path) -> None:
    st = os.statvfs(tmp_path)
    free = await Mirror(tmp_path).free_bytes()
    assert abs(free - st.f_bavail * st.f_frsize) < 64 << 20


class FakeStatvfs:
    """os.statvfs for the storage module: a fixed free space, and a count of the calls."""

    def __init__(self, free_blocks: int) -> None:
        self.free_blocks = free_blocks
        self.calls = 0

    def __call__(self, _path: object) -> os.statvfs_result:
        self.calls += 1
        return os.statvfs_result((4096, 4096, 0, 0, self.free_blocks, 0, 0, 0, 0, 255))


async def test_one_statvfs_serves_the_space_checks_close_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeStatvfs(free_blocks=1000)
    monkeypatch.setattr("nbia_sync.storage.os.statvfs", fake)
    clock = FakeClock()
    m = Mirror(tmp_path, clock)
    for _ in range(5):
        await m.ensure_space(1024, 0)
    assert fake.calls == 1
    clock.advance(SPACE_READ_INTERVAL)
    await m.ensure_space(1024, 0)
    assert fake.calls == 2  # a reading older than the interval is taken again


async def test_a_reservation_given_back_counts_as_written_until_the_next_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("nbia_sync.storage.os.statvfs", FakeStatvfs(free_blocks=10))
    m = Mirror(tmp_path, FakeClock())
    async with m.reserve(30_000, 0):
        pass
    # 40,960 bytes read, 30,000 of them possibly written since: 10,960 at most.
    assert await m.free_bytes() == 10 * 4096 - 30_000
    with pytest.raises(SeriesTooLargeError):
        await m.ensure_space(20_000, 0)


def mirror_with_free_space(root: Path, free: int) -> Mirror:
    """A Mirror that sees `free` bytes free: the real disk changes under parallel work."""
    m = Mirror(root)

    async def free_bytes() -> int:
        return free

    m.free_bytes = free_bytes  # type: ignore[method-assign]
    return m


async def test_ensure_space_names_the_numbers(tmp_path: Path) -> None:
    m = mirror_with_free_space(tmp_path, 10_000)
    with pytest.raises(DiskSpaceError, match=r"10000 bytes free.*1234 for the series"):
        await m.ensure_space(1234, 10_000)


async def test_series_larger_than_the_free_space_fails_alone(tmp_path: Path) -> None:
    with pytest.raises(SeriesTooLargeError, match=r"lists 1000000000000000 bytes"):
        await Mirror(tmp_path).ensure_space(10**15, 0)


async def test_ensure_space_passes_when_it_fits(tmp_path: Path) -> None:
    await Mirror(tmp_path).ensure_space(1024, 0)


async def test_reservations_of_running_downloads_count(tmp_path: Path) -> None:
    m = mirror_with_free_space(tmp_path, 10_000)
    async with m.reserve(6_000, 0):
        with pytest.raises(DiskSpaceError):
            await m.ensure_space(5_000, 0)
    await m.ensure_space(5_000, 0)


async def test_place_many_places_each_series_and_reports_failures_one_by_one(
    tmp_path: Path,
) -> None:
    m = Mirror(tmp_path)
    old = m.series_dir("C", "P1", "1.1", "1.2")
    await place(m, stage(m.staging_dir("me", "1.2"), {"1.dcm": b"old"}), old)
    moves = [
        (stage(m.staging_dir("me", "1.2"), {"1.dcm": b"new"}), old),  # replaces
        (m.staging_dir("me", "missing"), m.series_dir("C", "P2", "2.1", "2.2")),  # fails
        (
            stage(m.staging_dir("me", "3.2"), {"3.dcm": b"three"}),
            m.series_dir("C", "P3", "3.1", "3.2"),
        ),
    ]
    errors = await m.place_many(moves)
    assert errors[0] is None and errors[2] is None
    assert isinstance(errors[1], FileNotFoundError)
    assert tree(tmp_path) == {"C/P1/1.1/1.2/1.dcm": b"new", "C/P3/3.1/3.2/3.dcm": b"three"}
    assert not any(m.trash_root.iterdir())


async def test_place_many_fsyncs_each_touched_directory_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import nbia_sync.storage as storage

    m = Mirror(tmp_path)
    synced: list[Path] = []
    monkeypatch.setattr(storage, "_sync_fs", lambda path: False)  # no syncfs(2) here
    monkeypatch.setattr(
        storage, "_fsync_path", lambda path, *, directory=False: synced.append(path)
    )
    moves = [
        (
            stage(m.staging_dir("me", f"{i}.2"), {"1.dcm": b"x"}),
            m.series_dir("C", f"P{i}", f"{i}.1", f"{i}.2"),
        )
        for i in range(3)
    ]
    assert await m.place_many(moves) == [None, None, None]
    # The new names: C and C/P<i> in their parents, each series in its study directory.
    expected = {tmp_path, tmp_path / "C"}
    for i in range(3):
        expected |= {tmp_path / "C" / f"P{i}", tmp_path / "C" / f"P{i}" / f"{i}.1"}
    assert sorted(synced) == sorted(expected)


async def test_place_many_moves_the_old_copy_of_a_moved_series_aside_durably(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The archive re-filed the series: its old directory leaves the tree (into the
    trash, both directories fsynced) before place_many returns, i.e. before the commit."""
    import nbia_sync.storage as storage

    m = Mirror(tmp_path)
    before = m.series_dir("C", "P1", "1.1", "1.2")
    await place(m, stage(m.staging_dir("me", "1.2"), {"1.dcm": b"old"}), before)
    after = m.series_dir("C", "P2", "2.1", "1.2")
    synced: list[Path] = []
    monkeypatch.setattr(storage, "_sync_fs", lambda path: False)  # no syncfs(2) here
    monkeypatch.setattr(
        storage, "_fsync_path", lambda path, *, directory=False: synced.append(path)
    )
    monkeypatch.setattr(storage, "_rmtree", lambda path: None)  # "crash" before deleting
    staged = stage(m.staging_dir("me", "1.2"), {"1.dcm": b"new"})
    assert await m.place_many([(staged, after, before)]) == [None]
    assert tree(tmp_path) == {"C/P2/2.1/1.2/1.dcm": b"new"}
    assert {m.trash_root, before.parent} <= set(synced)
    monkeypatch.undo()
    await m.clean_staging([])
    assert not m.trash_root.exists()


async def test_place_many_with_syncfs_syncs_data_then_names_once_per_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Small series: their data is synced before the first rename, and the new names
    once after the last, one syncfs(2) each, however many series the batch holds."""
    import nbia_sync.storage as storage

    m = Mirror(tmp_path)
    calls: list[tuple[str, int]] = []

    def sync_fs(path: Path) -> bool:
        calls.append(("syncfs", len(tree(tmp_path))))
        return True

    monkeypatch.setattr(storage, "_sync_fs", sync_fs)
    monkeypatch.setattr(
        storage, "_fsync_path", lambda path, *, directory=False: calls.append(("fsync", 0))
    )
    staged = [stage(m.staging_dir("me", f"{i}.2"), {"1.dcm": b"x"}) for i in range(4)]
    moves = [(d, m.series_dir("C", f"P{i}", f"{i}.1", f"{i}.2")) for i, d in enumerate(staged)]
    assert await m.place_many(moves, unsynced=staged) == [None] * 4
    # Nothing in the tree at the first (data), all four series at the second (names).
    assert calls == [("syncfs", 0), ("syncfs", 4)]


async def test_place_many_without_syncfs_fsyncs_unsynced_files_before_renaming(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import nbia_sync.storage as storage

    m = Mirror(tmp_path)
    order: list[str] = []
    monkeypatch.setattr(storage, "_sync_fs", lambda path: False)
    monkeypatch.setattr(
        storage,
        "_fsync_path",
        lambda path, *, directory=False: order.append(
            "tree" if ".nbia-sync" not in path.parts else path.name
        ),
    )
    staged = stage(m.staging_dir("me", "1.2"), {"1.dcm": b"x", "2.dcm": b"y"})
    final = m.series_dir("C", "P", "1.1", "1.2")
    assert await m.place_many([(staged, final)], unsynced=[staged]) == [None]
    assert sorted(order[:3]) == ["1.2", "1.dcm", "2.dcm"]  # files, then their directory
    assert set(order[3:]) == {"tree"}


# -- series verified in memory (tiny ones: transfer/download.py) ----------------------


async def test_place_many_writes_series_kept_in_memory_then_syncs_before_renaming(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import nbia_sync.storage as storage

    m = Mirror(tmp_path)
    seen: list[dict[str, bytes]] = []

    def sync_fs(path: Path) -> bool:
        seen.append({p.name: p.read_bytes() for p in m.staging_root.rglob("*.dcm")})
        return True

    monkeypatch.setattr(storage, "_sync_fs", sync_fs)
    staged = m.staging_dir("me", "1.2")
    final = m.series_dir("C", "P", "1.1", "1.2")
    files = [(staged / "1.dcm", b"one"), (staged / "2.dcm", bytearray(b"two"))]
    assert await m.place_many([(staged, final)], unwritten={staged: files}) == [None]
    # The data sync saw both files in staging, before anything entered the tree.
    assert seen[0] == {"1.dcm": b"one", "2.dcm": b"two"}
    assert tree(tmp_path) == {"C/P/1.1/1.2/1.dcm": b"one", "C/P/1.1/1.2/2.dcm": b"two"}


async def test_series_kept_in_memory_with_no_files_is_placed_as_an_empty_directory(
    tmp_path: Path,
) -> None:
    m = Mirror(tmp_path)
    staged = m.staging_dir("me", "1.2")
    final = m.series_dir("C", "P", "1.1", "1.2")
    assert await m.place_many([(staged, final)], unwritten={staged: []}) == [None]
    assert final.is_dir() and not any(final.iterdir())


async def test_full_disk_writing_a_series_kept_in_memory_fails_that_move_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    import nbia_sync.storage as storage

    m = Mirror(tmp_path)
    write_all = storage.write_all

    def full_for_big(fd: int, data: bytes | bytearray) -> None:
        if len(data) > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        write_all(fd, data)

    monkeypatch.setattr(storage, "write_all", full_for_big)
    small, big = m.staging_dir("me", "1.2"), m.staging_dir("me", "2.2")
    moves = [
        (small, m.series_dir("C", "P", "1.1", "1.2")),
        (big, m.series_dir("C", "P", "2.1", "2.2")),
    ]
    unwritten = {small: [(small / "1.dcm", b"one")], big: [(big / "1.dcm", b"too big")]}
    errors = await m.place_many(moves, unwritten=unwritten)
    assert errors[0] is None
    assert isinstance(errors[1], DiskSpaceError) and "disk full" in str(errors[1])
    assert tree(tmp_path) == {"C/P/1.1/1.2/1.dcm": b"one"}
    assert not big.exists()  # no half-written staging left behind


async def test_series_kept_in_memory_replaces_a_leftover_staging_directory(
    tmp_path: Path,
) -> None:
    m = Mirror(tmp_path)
    staged = stage(m.staging_dir("me", "1.2"), {"stale.part": b"from a crashed attempt"})
    final = m.series_dir("C", "P", "1.1", "1.2")
    files = [(staged / "1.dcm", b"one")]
    assert await m.place_many([(staged, final)], unwritten={staged: files}) == [None]
    assert tree(tmp_path) == {"C/P/1.1/1.2/1.dcm": b"one"}


async def test_no_space_for_a_series_directories_is_a_disk_space_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of inodes (or space) making a patient's directory: the pass must stop with
    DiskSpaceError rather than count a failed attempt per series and retry them all."""
    import errno

    import nbia_sync.storage as storage

    m = Mirror(tmp_path)

    def no_inodes(path: Path, created: set[Path]) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    staged = stage(m.staging_dir("me", "1.2"), {"1.dcm": b"one"})
    monkeypatch.setattr(storage, "_makedirs_unsynced", no_inodes)
    [error] = await m.place_many([(staged, m.series_dir("C", "P", "1.1", "1.2"))])
    assert isinstance(error, DiskSpaceError) and "df -i" in str(error)
    assert tree(tmp_path) == {}
