"""The streaming ZIP reader: every layout it must stream, and everything it must refuse."""

from __future__ import annotations

import io
import os
import random
import zipfile
import zlib
from pathlib import Path

import pytest
from transfer_zips import DEFLATED, Entry, build_zip, chunked

from nbia_sync.errors import HostileArchiveError, IntegrityError
from nbia_sync.transfer.archive import (
    EntryData,
    EntryEnd,
    EntryStart,
    ZipStreamReader,
    check_entry_name,
)


def read_all(data: bytes, tmp_path: Path, chunk: int = 7) -> dict[str, bytes]:
    """Feed ``data`` in small chunks (every header split across feeds); collect entries."""
    reader = ZipStreamReader(tmp_path / "spool.zip")
    files: dict[str, bytes] = {}
    current: list[bytes] = []
    name = ""

    def handle(events: object) -> None:
        nonlocal name, current
        for ev in events:  # type: ignore[attr-defined]
            if isinstance(ev, EntryStart):
                name, current = ev.entry.name, []
            elif isinstance(ev, EntryData):
                current.append(ev.data)
            elif isinstance(ev, EntryEnd):
                files[name] = b"".join(current)

    try:
        for piece in chunked(data, chunk):
            handle(reader.feed(piece))
        handle(reader.finish())
    finally:
        reader.close()
    return files


PAYLOADS = {"00000001.dcm": os.urandom(3000), "00000002.dcm": b"x" * 5000 + os.urandom(100)}


def zipfile_archive(method: int, *, seekable: bool) -> bytes:
    """What Python's zipfile writes: sizes in the header when seekable, a data
    descriptor (and, for STORED, no sizes at all) when writing to a pipe."""
    buf = io.BytesIO()
    target: object = buf
    if not seekable:

        class Pipe(io.RawIOBase):
            def writable(self) -> bool:
                return True

            def write(self, b: object) -> int:
                return buf.write(b)  # type: ignore[arg-type]

        target = Pipe()
    with zipfile.ZipFile(target, "w", method) as zf:  # type: ignore[call-overload]
        for name, data in PAYLOADS.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_stored_entries_with_sizes_stream(tmp_path: Path) -> None:
    data = zipfile_archive(zipfile.ZIP_STORED, seekable=True)
    assert read_all(data, tmp_path) == PAYLOADS


def test_deflated_entries_with_descriptor_stream(tmp_path: Path) -> None:
    data = zipfile_archive(zipfile.ZIP_DEFLATED, seekable=False)
    assert read_all(data, tmp_path) == PAYLOADS
    assert not (tmp_path / "spool.zip").exists()


def test_deflated_entries_with_sizes_stream(tmp_path: Path) -> None:
    data = zipfile_archive(zipfile.ZIP_DEFLATED, seekable=True)
    assert read_all(data, tmp_path, chunk=4096) == PAYLOADS


@pytest.mark.parametrize("sig", [True, False], ids=["descriptor-sig", "descriptor-nosig"])
@pytest.mark.parametrize("zip64", [False, True], ids=["32bit", "zip64"])
def test_deflate_descriptor_variants(tmp_path: Path, sig: bool, zip64: bool) -> None:
    entries = [
        Entry(
            name,
            data,
            DEFLATED,
            descriptor=True,
            descriptor_sig=sig,
            zip64=zip64,
            sizes_in_header=False,
        )
        for name, data in PAYLOADS.items()
    ]
    assert read_all(build_zip(entries), tmp_path) == PAYLOADS


def test_zip64_stored_sizes_in_extra_field_stream(tmp_path: Path) -> None:
    entries = [Entry(name, data, zip64=True) for name, data in PAYLOADS.items()]
    assert read_all(build_zip(entries), tmp_path) == PAYLOADS


def test_stored_with_descriptor_and_no_sizes_falls_back_to_spool(tmp_path: Path) -> None:
    data = zipfile_archive(zipfile.ZIP_STORED, seekable=False)
    assert read_all(data, tmp_path) == PAYLOADS
    assert (tmp_path / "spool.zip").exists()  # the fallback really was taken


def test_spool_fallback_after_streamed_entries(tmp_path: Path) -> None:
    first = Entry(
        "00000001.dcm", PAYLOADS["00000001.dcm"], DEFLATED, descriptor=True, sizes_in_header=False
    )
    second = Entry("00000002.dcm", PAYLOADS["00000002.dcm"], descriptor=True, sizes_in_header=False)
    assert read_all(build_zip([first, second]), tmp_path) == PAYLOADS


def test_directory_and_empty_entries_are_reported(tmp_path: Path) -> None:
    data = build_zip([Entry("dir/", b"", external_attr=0o40755 << 16), Entry("empty", b"")])
    assert read_all(data, tmp_path) == {"dir/": b"", "empty": b""}


def test_stored_crc_mismatch_is_integrity_error(tmp_path: Path) -> None:
    data = build_zip([Entry("a.dcm", b"hello", bad_crc=True)])
    with pytest.raises(IntegrityError, match="CRC"):
        read_all(data, tmp_path)


def test_deflate_descriptor_crc_mismatch_is_integrity_error(tmp_path: Path) -> None:
    data = build_zip(
        [
            Entry(
                "a.dcm",
                b"hello" * 100,
                DEFLATED,
                descriptor=True,
                sizes_in_header=False,
                bad_crc=True,
            )
        ]
    )
    with pytest.raises(IntegrityError, match="CRC"):
        read_all(data, tmp_path)


def test_flipped_byte_in_deflate_data_is_integrity_error(tmp_path: Path) -> None:
    # Seeded: with some random contents the flipped byte instead makes the entry inflate
    # past its declared size, which is refused as hostile (~1 run in 13 with os.urandom).
    good = build_zip([Entry("a.dcm", random.Random(0).randbytes(2000) * 3, DEFLATED)])
    bad = bytearray(good)
    bad[30 + len("a.dcm") + 500] ^= 0xFF
    with pytest.raises(IntegrityError):
        read_all(bytes(bad), tmp_path)


def test_crc_mismatch_in_spooled_entry_is_integrity_error(tmp_path: Path) -> None:
    data = build_zip(
        [Entry("a.dcm", b"hello", descriptor=True, sizes_in_header=False, bad_crc=True)]
    )
    with pytest.raises(IntegrityError):
        read_all(data, tmp_path)


def test_stream_cut_inside_an_entry_is_truncation(tmp_path: Path) -> None:
    data = zipfile_archive(zipfile.ZIP_DEFLATED, seekable=False)
    with pytest.raises(IntegrityError, match="truncated"):
        read_all(data[: len(data) // 2], tmp_path)


def test_stream_cut_inside_central_directory_is_truncation(tmp_path: Path) -> None:
    data = zipfile_archive(zipfile.ZIP_STORED, seekable=True)
    with pytest.raises(IntegrityError, match="truncated"):
        read_all(data[:-30], tmp_path)


def test_html_instead_of_zip_is_integrity_error(tmp_path: Path) -> None:
    with pytest.raises(IntegrityError, match="not a ZIP"):
        read_all(b"<html><body>500 Internal Server Error</body></html>", tmp_path)


def test_empty_download_is_integrity_error(tmp_path: Path) -> None:
    with pytest.raises(IntegrityError, match="not a ZIP"):
        read_all(b"", tmp_path)


HOSTILE_NAMES: dict[str, str | bytes] = {
    "absolute": "/etc/passwd",
    "drive-letter": "C:evil.dcm",
    "backslash": "..\\..\\evil.dcm",
    "dotdot": "a/../../evil.dcm",
    "dotdot-alone": "..",
    "nul": b"evil.dcm\x00.txt",
    "control": "evil\n.dcm",
    "del": "evil\x7f.dcm",
    "empty": "",
}


@pytest.mark.parametrize("name", list(HOSTILE_NAMES.values()), ids=list(HOSTILE_NAMES))
def test_hostile_name_is_refused_before_any_data(tmp_path: Path, name: str | bytes) -> None:
    data = build_zip([Entry("ok.dcm", b"fine"), Entry(name, b"payload")])
    reader = ZipStreamReader(tmp_path / "spool.zip")
    seen: list[object] = []
    with pytest.raises(HostileArchiveError):
        for ev in reader.feed(data):
            seen.append(ev)
    # The good entry came through whole; not one byte of the hostile one.
    assert [type(e) for e in seen] == [EntryStart, EntryData, EntryEnd]


def test_hostile_name_in_spooled_part_is_refused_before_any_data(tmp_path: Path) -> None:
    data = build_zip(
        [
            Entry("ok.dcm", b"fine", descriptor=True, sizes_in_header=False),
            Entry("../evil.dcm", b"payload", descriptor=True, sizes_in_header=False),
        ]
    )
    reader = ZipStreamReader(tmp_path / "spool.zip")
    seen = list(reader.feed(data))
    with pytest.raises(HostileArchiveError):
        seen.extend(reader.finish())
    assert seen == []


def test_symlink_entry_is_refused(tmp_path: Path) -> None:
    data = build_zip([Entry("link.dcm", b"/etc/passwd", external_attr=0o120777 << 16)])
    with pytest.raises(HostileArchiveError, match="symbolic link"):
        read_all(data, tmp_path)


def test_device_entry_is_refused(tmp_path: Path) -> None:
    data = build_zip([Entry("dev.dcm", b"", external_attr=0o020666 << 16)])
    with pytest.raises(HostileArchiveError, match="special file"):
        read_all(data, tmp_path)


def test_symlink_entry_in_spooled_archive_is_refused(tmp_path: Path) -> None:
    data = build_zip(
        [
            Entry(
                "link.dcm",
                b"/etc/passwd",
                descriptor=True,
                sizes_in_header=False,
                external_attr=0o120777 << 16,
            )
        ]
    )
    with pytest.raises(HostileArchiveError, match="symbolic link"):
        read_all(data, tmp_path)


def test_central_directory_listing_other_names_is_refused(tmp_path: Path) -> None:
    data = bytearray(build_zip([Entry("aaaa.dcm", b"data")]))
    cd_name = data.rindex(b"aaaa.dcm")
    data[cd_name : cd_name + 8] = b"bbbb.dcm"
    with pytest.raises(HostileArchiveError, match="central directory"):
        read_all(bytes(data), tmp_path)


@pytest.mark.parametrize(
    "name", ["00000001.dcm", "sub/dir/file.dcm", "1-001.dcm", "LICENSE", "a..b.dcm", "./x.dcm"]
)
def test_ordinary_names_are_accepted(name: str) -> None:
    check_entry_name(name)


def test_deflate_bomb_is_inflated_in_bounded_pieces(tmp_path: Path) -> None:
    data = build_zip([Entry("big.dcm", b"\0" * (8 << 20), DEFLATED)])
    reader = ZipStreamReader(tmp_path / "spool.zip")
    sizes = [len(ev.data) for ev in reader.feed(data) if isinstance(ev, EntryData)]
    list(reader.finish())
    assert sum(sizes) == 8 << 20
    assert max(sizes) <= 1 << 20


def test_deflate_bomb_memory_stays_bounded_while_it_is_consumed(tmp_path: Path) -> None:
    import tracemalloc

    bomb = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = b"\0" * (1 << 20)
    payload = b"".join(bomb.compress(block) for _ in range(256)) + bomb.flush()
    data = build_zip([Entry("bomb.dcm", b"", DEFLATED, descriptor=True, sizes_in_header=False)])
    # Splice the 256 MiB bomb in place of the empty entry's deflate data ("\x03\x00").
    cut = data.index(b"bomb.dcm") + len(b"bomb.dcm")
    data = data[:cut] + payload + data[cut + 2 :]
    reader = ZipStreamReader(tmp_path / "spool.zip")
    tracemalloc.start()
    try:
        produced = 0
        for ev in reader.feed(data):
            if isinstance(ev, EntryData):
                produced += len(ev.data)
                if produced >= 64 << 20:
                    break
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert produced >= 64 << 20
    assert peak < 8 << 20  # one inflate step at a time, never the whole output


def test_entry_inflating_past_its_declared_size_is_hostile(tmp_path: Path) -> None:
    data = build_zip([Entry("x.dcm", b"\0" * (4 << 20), DEFLATED, declared_size=1024)])
    reader = ZipStreamReader(tmp_path / "spool.zip")
    with pytest.raises(HostileArchiveError, match="declared size of 1024"):
        for _ in reader.feed(data):
            pass
