"""Property: the streaming ZIP reader, fed any archive split into any chunks, yields what
Python's zipfile reads from the whole archive (same names, same bytes, same order)."""

from __future__ import annotations

import io
import itertools
import zipfile
from pathlib import Path
from tempfile import TemporaryDirectory

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transfer_zips import DEFLATED, STORED, Entry, build_zip

from nbia_sync.transfer.archive import EntryData, EntryEnd, EntryStart, ZipStreamReader

NAMES = st.from_regex(r"[A-Za-z0-9_\-]{1,12}(/[A-Za-z0-9_\-]{1,8})?\.dcm", fullmatch=True)
# Random bytes and runs of one byte (which deflate shrinks a lot), mixed.
DATA = st.one_of(
    st.binary(max_size=3000),
    st.builds(lambda b, n: b * n, st.binary(min_size=1, max_size=3), st.integers(0, 5000)),
)


@st.composite
def entries(draw: st.DrawFn) -> list[Entry]:
    names = draw(st.lists(NAMES, min_size=1, max_size=5, unique=True))
    out = []
    for name in names:
        descriptor = draw(st.booleans())
        out.append(
            Entry(
                name=name,
                data=draw(DATA),
                method=draw(st.sampled_from([STORED, DEFLATED])),
                descriptor=descriptor,
                descriptor_sig=draw(st.booleans()),
                zip64=draw(st.booleans()),
                sizes_in_header=draw(st.booleans()) if descriptor else True,
            )
        )
    return out


def by_zipfile(archive: bytes) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(archive)) as zf:
        return [(i.filename, zf.read(i)) for i in zf.infolist()]


def streamed(archive: bytes, cuts: list[int], spool: Path) -> list[tuple[str, bytes]]:
    reader = ZipStreamReader(spool)
    files: list[tuple[str, bytes]] = []
    name, current = "", bytearray()

    def handle(events: object) -> None:
        nonlocal name
        for ev in events:  # type: ignore[attr-defined]
            if isinstance(ev, EntryStart):
                name = ev.entry.name
                current.clear()
            elif isinstance(ev, EntryData):
                current.extend(ev.data)
            elif isinstance(ev, EntryEnd):
                files.append((name, bytes(current)))

    try:
        edges = [0, *sorted(set(cuts)), len(archive)]
        for start, end in itertools.pairwise(edges):
            handle(reader.feed(archive[start:end]))
        handle(reader.finish())
    finally:
        reader.close()
    return files


PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(entries(), st.data())
def test_any_layout_in_any_chunks_reads_as_zipfile_reads_it(
    archive_entries: list[Entry], data: st.DataObject
) -> None:
    archive = build_zip(archive_entries)
    cuts = data.draw(st.lists(st.integers(0, len(archive)), max_size=40))
    with TemporaryDirectory() as tmp:
        assert streamed(archive, cuts, Path(tmp) / "spool.zip") == by_zipfile(archive)


@PROPERTY
@given(
    st.lists(st.tuples(NAMES, DATA), min_size=1, max_size=5, unique_by=lambda t: t[0]),
    st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]),
    st.booleans(),
    st.data(),
)
def test_what_zipfile_writes_reads_back_in_any_chunks(
    files: list[tuple[str, bytes]], method: int, seekable: bool, data: st.DataObject
) -> None:
    buf = io.BytesIO()

    class Pipe(io.RawIOBase):  # a non-seekable target: zipfile then writes descriptors
        def writable(self) -> bool:
            return True

        def write(self, b: object) -> int:
            return buf.write(b)  # type: ignore[arg-type]

    with zipfile.ZipFile(buf if seekable else Pipe(), "w", method) as zf:
        for name, payload in files:
            zf.writestr(name, payload)
    archive = buf.getvalue()
    cuts = data.draw(st.lists(st.integers(0, len(archive)), max_size=40))
    with TemporaryDirectory() as tmp:
        assert streamed(archive, cuts, Path(tmp) / "spool.zip") == by_zipfile(archive)
