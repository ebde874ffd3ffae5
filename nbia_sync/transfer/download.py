"""One series: stream the archive's ZIP into staging, hashing while writing, then check it.

One pass over the bytes: each chunk from the socket is parsed, inflated, MD5-hashed and
written once, in a worker thread (zlib, MD5, CRC and writes are CPU and disk work that
must not stall the event loop on a 2-core machine), except a tiny series on a local disk,
whose few KB cost less than the hop (see _MIN_HOP): it is checked in memory and written
by the group commit (Mirror.place_many), so the loop makes no file-system call for it.
Memory stays flat: one chunk at a time, whatever the series size.

A series is accepted only when the server's hash list (md5hashes.csv) is there (its absence
is the server's silent truncation), every file is listed and matches its MD5, no listed
file is missing, the count matches the catalog's ImageCount, and every file is DICOM of
this series with a distinct SOPInstanceUID. Each staged file is named
``<SOPInstanceUID>.dcm`` as soon as it is whole (its header read), while the rest still
streams. On any failure the series' staging is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import hashlib
import io
import os
import re
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import anyio
import structlog

from nbia_sync.errors import (
    HostileArchiveError,
    IntegrityError,
    RetryableError,
    sole_error,
)
from nbia_sync.progress import ProgressSink
from nbia_sync.storage import (
    create_file,
    disk_space_error,
    fresh_dir,
    fsync_dir,
    safe_part,
    write_all,
    write_file,
)
from nbia_sync.transfer.archive import EntryData, EntryEnd, EntryStart, ZipEvent, ZipStreamReader
from nbia_sync.transfer.dicomhead import NotDicomError, read_uids

log = structlog.get_logger(__name__)

HASH_LIST = "md5hashes.csv"
LICENSE = "LICENSE"  # v4 getImage puts the collection's licence first
_MAX_HASH_LIST = 16 << 20
# A series' archive may inflate to at most its listed FileSize plus this margin (the
# LICENSE and hash-list entries, a listing slightly out of date); beyond it the archive
# is refused as hostile before it can fill the disk (a deflate bomb, a lying server).
SIZE_MARGIN_RATIO = 0.10
SIZE_MARGIN_BYTES = 4 << 20
_SPOOL_NAME = ".archive.zip"
_DICOM_TAGS = ["SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"]
# Each file's first bytes are kept in memory for the UID check (dicomhead.read_uids);
# DICOM headers before pixel data are a few KB.
_HEAD_BYTES = 64 << 10
# Series listed below this size are small: their files skip the per-file fsync (the group
# commit syncs them, see transfer/pool.py) and they hop to the worker thread in pieces of
# _MIN_HOP, so processing keeps pace with the socket and the last byte is followed by
# little work (~1 MB series: wall -6 %, peak RSS -5 MiB against 256 KiB). Larger ones
# (or of unknown size) hop the whole read budget at a time: fewer hops per GB (3 x 100 MB:
# CPU -4 %, peak RSS -3 MiB against 64 KiB). bench/README.md has the runs.
SMALL_SERIES_BYTES = 8 << 20
_MIN_HOP = 64 << 10
# A series listed below _MIN_HOP on a local file system is processed on the event loop
# while no more than _MIN_HOP bytes of it arrived: its staging directory, a create, a few
# KB inflated, hashed and written, and a rename cost less than the thread hop and its
# wake-ups (bench/README.md). A server lying about the size gets one such hop on the loop
# (its inflation bounded by SIZE_MARGIN_BYTES); the rest goes to the thread. Such a
# series is also kept in memory until the group commit writes it (Mirror.place_many):
# the loop makes no directory, create or rename for it. Past _MEMORY_BYTES (a server
# sending more than it listed) what is held goes to staging and the rest follows there.
_MEMORY_BYTES = 4 * _MIN_HOP


def is_small(file_size: int | None) -> bool:
    return file_size is not None and file_size < SMALL_SERIES_BYTES


class SeriesStreamer(Protocol):
    """What fetch_series needs from the client (NbiaClient satisfies it)."""

    def stream_series(self, uid: str) -> AbstractAsyncContextManager[AsyncIterator[bytes]]: ...


class SeriesRef(Protocol):
    """What fetch_series needs from a claim (catalog.records.Claim satisfies it)."""

    @property
    def series_uid(self) -> str: ...
    @property
    def study_uid(self) -> str: ...
    @property
    def image_count(self) -> int | None: ...
    @property
    def file_size(self) -> int | None: ...


class RateLimiter(Protocol):
    async def acquire(self, n: int) -> None: ...


@dataclass(frozen=True, slots=True)
class StagedFile:
    sop_uid: str
    md5: str
    size: int
    path: Path  # in staging, named <SOPInstanceUID>.dcm
    entry_name: str  # the name in the archive's ZIP
    data: bytearray | None = None  # the bytes, when verified in memory and not written yet


@dataclass(frozen=True, slots=True)
class FetchedSeries:
    series_uid: str
    staging_dir: Path
    files: list[StagedFile]
    bytes_downloaded: int  # bytes off the wire (the ZIP)
    unverified: int = 0  # files the hash list gave a blank MD5 for (accepted on the rest)
    in_memory: bool = False  # staging_dir not made yet: Mirror.place_many writes `unwritten`

    @property
    def unwritten(self) -> list[tuple[Path, bytearray]]:
        """(staged path, bytes) of files verified in memory (see in_memory)."""
        return [(f.path, f.data) for f in self.files if f.data is not None]

    @property
    def size(self) -> int:
        """Bytes of the files, as they will sit in the mirror."""
        return sum(f.size for f in self.files)


@dataclass(slots=True)
class _Entry:
    name: str
    # Its staging file's name, made only if it is written: a counter while it is being
    # written, its final name (see _SeriesWriter._name) once its SOP UID is known.
    part: str
    md5: str = ""
    size: int = 0
    sop_uid: str = ""
    uids: tuple[str, str] = ("", "")  # (series, study) as the file says
    data: bytearray | None = None  # the file, in memory mode (never written to `part`)


@dataclass(slots=True)
class _SeriesWriter:
    """The thread side of one download: consumes ZIP events, writes and hashes files.

    Called from one worker thread at a time (never concurrently), in order.
    """

    staging: Path
    series_uid: str
    study_uid: str
    image_count: int | None
    check_dicom: bool
    sync: bool = False  # fsync each file as it completes, and the directory at the end
    file_size: int | None = None  # the listing's FileSize: bounds what may be inflated
    memory: bool = False  # keep the files in memory, staging untouched (see _MEMORY_BYTES)
    reader: ZipStreamReader = field(init=False)
    entries: list[_Entry] = field(default_factory=list)
    hash_list: bytearray | None = None
    _names: set[str] = field(default_factory=set)
    _fnames: set[str] = field(default_factory=set)  # the files' names (see _name)
    _fd: int | None = None  # the current file, written with os.write (no buffer layer)
    _buf: bytearray | None = None  # or, in memory mode, its bytes so far
    _md5: hashlib._Hash | None = None
    _head: bytearray = field(default_factory=bytearray)
    _sink: str = "skip"  # where the current entry's bytes go: file | hashes | skip
    _inflated: int = 0  # bytes of every entry so far, uncompressed
    unverified: int = 0

    def __post_init__(self) -> None:
        self.reader = ZipStreamReader(self.staging / _SPOOL_NAME)

    @property
    def files_written(self) -> int:
        """Entries written whole so far (the one being written is not)."""
        return len(self.entries) - (self._fd is not None or self._buf is not None)

    def feed(self, chunk: bytes) -> None:
        with _disk_errors(self.staging):
            for event in self.reader.feed(chunk):
                self._handle(event)

    def finish(self) -> list[StagedFile]:
        with _disk_errors(self.staging):
            for event in self.reader.finish():
                self._handle(event)
        self.reader.close()
        if self.reader.spooled:
            (self.staging / _SPOOL_NAME).unlink()
        return self._verify()

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._buf = None
        self.reader.close()

    # -- events -------------------------------------------------------------------

    def _handle(self, event: ZipEvent) -> None:
        if isinstance(event, EntryData):
            self._inflated += len(event.data)
            if self.file_size is not None and self._inflated > _size_limit(self.file_size):
                raise HostileArchiveError(
                    f"series {self.series_uid}: the archive inflates past "
                    f"{_size_limit(self.file_size)} bytes, but the listing's FileSize is "
                    f"{self.file_size} (allowed: {SIZE_MARGIN_RATIO:.0%} + "
                    f"{SIZE_MARGIN_BYTES >> 20} MiB more)"
                )
            if self._sink == "file":
                assert self._md5 is not None
                self._md5.update(event.data)
                if self._buf is not None:
                    self._buf += event.data
                    if self._inflated > _MEMORY_BYTES:
                        self._spill()
                    return
                assert self._fd is not None
                write_all(self._fd, event.data)
                if len(self._head) < _HEAD_BYTES:
                    self._head += event.data[: _HEAD_BYTES - len(self._head)]
            elif self._sink == "hashes":
                assert self.hash_list is not None
                self.hash_list += event.data
                if len(self.hash_list) > _MAX_HASH_LIST:
                    raise IntegrityError(f"{HASH_LIST} is implausibly large")
        elif isinstance(event, EntryStart):
            self._start(event.entry.name, is_dir=event.entry.is_dir)
        elif isinstance(event, EntryEnd):
            self._end(event.size)

    def _start(self, name: str, *, is_dir: bool) -> None:
        if name in self._names:
            raise IntegrityError(f"the archive has entry {name!r} twice")
        self._names.add(name)
        if is_dir or name == LICENSE:
            self._sink = "skip"
        elif name == HASH_LIST:
            self._sink = "hashes"
            self.hash_list = bytearray()
        else:
            # Staged under a counter, never under the archive's name: the name only
            # has to match the hash list.
            entry = _Entry(name=name, part=f"{len(self.entries):08d}.part")
            self.entries.append(entry)
            if self.memory:
                self._buf = bytearray()
            else:
                self._fd = create_file(self.staging / entry.part)
            self._md5 = hashlib.md5(usedforsecurity=False)
            self._head = bytearray()
            self._sink = "file"

    def _end(self, size: int) -> None:
        if self._sink != "file":
            self._sink = "skip"
            return
        assert self._md5 is not None
        entry = self.entries[-1]
        if self._buf is not None:
            entry.data, self._buf = self._buf, None
            head = bytes(memoryview(entry.data)[:_HEAD_BYTES])  # one copy, not two
        else:
            assert self._fd is not None
            fd, self._fd = self._fd, None
            try:
                if self.sync:
                    os.fsync(fd)  # now, while the rest still streams, not after the last byte
            finally:
                os.close(fd)
            head = bytes(self._head)
        self._head = bytearray()
        entry.md5 = self._md5.hexdigest()
        entry.size = size
        self._sink = "skip"
        self._read_dicom(entry, head)
        self._name(entry)

    def _name(self, entry: _Entry) -> None:
        """Give a whole file its mirror name now, while the rest still streams: only
        checks are left for the end (ten series ending together queue on the GIL)."""
        # A SOP UID comes from inside the file: never trust it as a path. safe_part
        # leaves a plain UID as it is and shortens (hashes) one too long for a name.
        fname = safe_part(entry.sop_uid) + ".dcm"
        if fname in self._fnames:
            raise IntegrityError(
                f"series {self.series_uid}: SOPInstanceUID {entry.sop_uid} appears twice"
            )
        self._fnames.add(fname)
        if entry.data is None:  # on disk (else it keeps its counter until spilled, if ever)
            os.rename(self.staging / entry.part, self.staging / fname)
        entry.part = fname

    def _spill(self) -> None:
        """Leave memory mode: what is held goes to staging, the rest is written there."""
        # Not fresh_dir: the reader may have made the directory for its spool, in use.
        self.staging.mkdir(parents=True, exist_ok=True)
        for e in self.entries:
            if e.data is not None:
                write_file(self.staging / e.part, e.data)
                e.data = None
        if self._buf is not None:
            self._fd = create_file(self.staging / self.entries[-1].part)
            write_all(self._fd, self._buf)
            self._head = self._buf[:_HEAD_BYTES]
            self._buf = None
        self.memory = False

    def _read_dicom(self, entry: _Entry, head: bytes) -> None:
        try:
            uids = read_uids(head)
        except NotDicomError as exc:
            raise IntegrityError(
                f"series {self.series_uid}: entry {entry.name!r} is not a readable DICOM file "
                f"({exc})"
            ) from None
        if uids is not None:
            sop = uids.sop
            entry.uids = (uids.series, uids.study)
        else:
            # A transfer syntax the header reader leaves to pydicom (big endian, deflated)
            # or a header longer than _HEAD_BYTES: rare, so the file is read back.
            sop = self._read_dicom_file(entry)
        if not sop:
            raise IntegrityError(f"series {self.series_uid}: {entry.name!r} has no SOPInstanceUID")
        entry.sop_uid = sop

    def _read_dicom_file(self, entry: _Entry) -> str:
        try:
            import pydicom  # here, in the download thread: ~0.15 s off every start

            data = entry.data
            source = io.BytesIO(data) if data is not None else self.staging / entry.part
            ds = pydicom.dcmread(source, stop_before_pixels=True, specific_tags=_DICOM_TAGS)
            entry.uids = (str(ds.get("SeriesInstanceUID", "")), str(ds.get("StudyInstanceUID", "")))
            return str(ds.get("SOPInstanceUID", ""))
        except Exception as exc:  # pydicom raises many types on garbage
            raise IntegrityError(
                f"series {self.series_uid}: entry {entry.name!r} is not a readable DICOM file "
                f"({type(exc).__name__})"
            ) from None

    # -- acceptance ---------------------------------------------------------------

    def _verify(self) -> list[StagedFile]:
        uid = self.series_uid
        if self.hash_list is None:
            raise IntegrityError(
                f"series {uid}: no {HASH_LIST} in the archive (the server cut it short: "
                f"{len(self.entries)} files received)"
            )
        listed = _parse_hash_list(bytes(self.hash_list), uid)
        for e in self.entries:
            if e.name not in listed:
                raise IntegrityError(f"series {uid}: {e.name!r} is not in {HASH_LIST}")
            want = listed[e.name]
            if want is None:
                # The archive has no MD5 for this file (a blank hash): accepted on the
                # CRC, the DICOM parse and the UID checks below, counted as unverified.
                self.unverified += 1
            elif want != e.md5:
                raise IntegrityError(f"series {uid}: MD5 mismatch for {e.name!r}")
        missing = sorted(set(listed) - {e.name for e in self.entries})
        if missing:
            raise IntegrityError(
                f"series {uid}: {len(missing)} listed files missing, e.g. {missing[0]!r}"
            )
        if self.image_count is not None and len(self.entries) != self.image_count:
            raise IntegrityError(
                f"series {uid}: {len(self.entries)} files, the archive lists "
                f"ImageCount {self.image_count}"
            )
        if not self.entries and self.image_count != 0:
            raise IntegrityError(
                f"series {uid}: the archive has no files and the listing gives no "
                "ImageCount of 0 (an empty answer is not an empty series)"
            )
        if self.check_dicom or self.unverified:
            for e in self.entries:
                if e.uids[0] != uid:
                    raise IntegrityError(
                        f"series {uid}: {e.name!r} belongs to series {e.uids[0]!r}"
                    )
                if self.study_uid and e.uids[1] != self.study_uid:
                    raise IntegrityError(f"series {uid}: {e.name!r} belongs to study {e.uids[1]!r}")
        staging = self.staging
        return [
            StagedFile(e.sop_uid, e.md5, e.size, staging / e.part, e.name, e.data)
            for e in self.entries
        ]


def _size_limit(file_size: int) -> int:
    return file_size + max(int(file_size * SIZE_MARGIN_RATIO), SIZE_MARGIN_BYTES)


_MD5_VALUE = re.compile(r"[0-9a-fA-F]{1,32}")


def _parse_hash_list(data: bytes, uid: str) -> dict[str, str | None]:
    """File name -> MD5 (lower case, 32 digits), or None where the archive has none.

    The real server may store a hash unpadded (Java's BigInteger.toString(16) drops
    leading zeros): left-padded to 32 here. A missing one is sent as " ": None.
    """
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise IntegrityError(f"series {uid}: {HASH_LIST} is not text") from None
    if '"' in text or "\r" in text:
        lines: Iterable[list[str]] = csv.reader(io.StringIO(text))
    else:  # what the archive writes: plain lines, where csv's quoting rules change nothing
        lines = (line.split(",") for line in text.split("\n"))
    rows = [r for r in lines if r and any(c.strip() for c in r)]
    if not rows or [c.strip().lower() for c in rows[0]] != ["filename", "md5hash"]:
        raise IntegrityError(f"series {uid}: {HASH_LIST} lacks its Filename,MD5Hash header")
    listed: dict[str, str | None] = {}
    for row in rows[1:]:
        if len(row) == 1:
            row = [row[0], ""]  # "name," with the blank hash stripped by the writer
        value = row[1].strip() if len(row) == 2 else "?"
        if value and not _MD5_VALUE.fullmatch(value):
            raise IntegrityError(f"series {uid}: malformed row in {HASH_LIST}")
        name, md5 = row[0].strip(), value.lower().zfill(32) if value else None
        if name in listed and listed[name] != md5:
            raise IntegrityError(f"series {uid}: {HASH_LIST} lists {name!r} twice")
        listed[name] = md5
    return listed


@contextlib.contextmanager
def _disk_errors(staging: Path) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        full = disk_space_error(exc, staging)
        if full is not None:
            raise full from None
        raise


@dataclass(slots=True)
class _ThreadSide:
    """Everything fetch_series does off the event loop: staging set-up on the first hop;
    on the last, the end-of-archive checks and the directory fsync (the files were named
    and fsynced as they completed), so only those follow the last byte."""

    writer: _SeriesWriter
    _ready: bool = False

    def feed(self, data: bytes | None, last: bool) -> list[StagedFile] | None:
        if not self._ready:
            if not self.writer.memory:
                fresh_dir(self.writer.staging)
            self._ready = True
        if data:
            self.writer.feed(data)
        if not last:
            return None
        files = self.writer.finish()
        if self.writer.sync:
            fsync_dir(self.writer.staging)
        return files


class _Pipe:
    """The bytes between the socket and the worker thread of one download.

    The network side ``put``s chunks as they arrive; the thread side ``take``s all that
    is queued (at least ``min_hop`` bytes unless the stream ended) in one hop, so the
    processing overlaps the transfer and the hop size adapts: small while the thread
    keeps up, larger when it falls behind. At most ``budget`` bytes (plus one chunk)
    wait here: memory per stream is bounded whatever the speeds.
    """

    def __init__(self, budget: int, min_hop: int) -> None:
        self._parts: list[bytes] = []
        self._size = 0
        self._closed = False
        self._budget = budget
        self._min_hop = min(min_hop, budget)
        # One putter and one taker, both on the event loop: no lock is needed, only a
        # wake-up each way (anyio's Condition cost a lock and two cancel scopes a chunk).
        # Each side clears its event, then checks, then waits: no wake-up is lost.
        self._room = asyncio.Event()
        self._ready = asyncio.Event()

    async def put(self, chunk: bytes) -> None:
        while self._size >= self._budget:
            self._room.clear()
            await self._room.wait()
        self._parts.append(chunk)
        self._size += len(chunk)
        if self._size >= self._min_hop:
            self._ready.set()

    async def close(self) -> None:
        self._closed = True
        self._ready.set()

    async def take(self) -> tuple[bytes | None, bool]:
        """(the queued bytes, whether the stream has ended)."""
        while self._size < self._min_hop and not self._closed:
            self._ready.clear()
            await self._ready.wait()
        data = _join(self._parts) if self._parts else None
        self._parts, self._size = [], 0
        self._room.set()
        return data, self._closed


async def fetch_series(
    client: SeriesStreamer,
    claim: SeriesRef,
    staging_dir: Path,
    *,
    chunk_size: int,
    progress: ProgressSink,
    limiter: RateLimiter | None = None,
    check_dicom: bool = True,
    sync: bool = False,
    inline: bool = False,
) -> FetchedSeries:
    """Download one series into ``staging_dir`` and verify it; see the module doc.

    ``chunk_size``: at most this many bytes (plus one network chunk) wait for the worker
    thread (see _Pipe). ``sync``: fsync each staged file as it completes and the staging
    directory at the end. ``inline``: the staging is on a local file system
    (filesystems.is_local), so a tiny series is processed on the event loop (see
    _MIN_HOP). Raises IntegrityError/RetryableError (retry later),
    HostileArchiveError/PermanentError (give up), DiskSpaceError (stop everything).
    """
    file_size = getattr(claim, "file_size", None)
    tiny = file_size is not None and file_size < _MIN_HOP
    writer = _SeriesWriter(
        staging_dir,
        claim.series_uid,
        claim.study_uid,
        claim.image_count,
        check_dicom,
        sync,
        file_size,
        memory=inline and tiny and not sync,  # sync: each file fsynced as it completes
    )
    side = _ThreadSide(writer)
    received = 0
    files: list[StagedFile] | None = None
    reported = 0

    async def hop(data: bytes | None, last: bool) -> None:
        nonlocal files, reported
        if inline and tiny and received <= _MIN_HOP:
            files = side.feed(data, last)
        else:
            files = await anyio.to_thread.run_sync(side.feed, data, last)
        # Back on the loop, the thread idle: files whose last byte was written.
        whole = writer.files_written
        if whole > reported:
            progress.files_received(claim.series_uid, whole - reported)
            reported = whole

    async def receive(sink: Callable[[bytes], Awaitable[None]]) -> None:
        nonlocal received
        async with client.stream_series(claim.series_uid) as chunks:
            try:
                async for chunk in chunks:
                    if limiter is not None:
                        await limiter.acquire(len(chunk))
                    received += len(chunk)
                    progress.bytes_received(len(chunk))
                    await sink(chunk)
            except (ConnectionError, TimeoutError) as exc:
                # The client maps its own failures; this is only a safety net.
                raise RetryableError(
                    f"series {claim.series_uid}: download interrupted ({type(exc).__name__})"
                ) from None

    try:
        if tiny:
            await _receive_whole(receive, hop, budget=chunk_size)
        else:
            await _receive_overlapped(receive, hop, budget=chunk_size, small=is_small(file_size))
        assert files is not None
    except BaseException:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(_abort, writer, staging_dir)
        raise
    return FetchedSeries(
        claim.series_uid, staging_dir, files, received, writer.unverified, writer.memory
    )


Receive = Callable[[Callable[[bytes], Awaitable[None]]], Awaitable[None]]
Hop = Callable[[bytes | None, bool], Awaitable[None]]


async def _receive_whole(receive: Receive, hop: Hop, *, budget: int) -> None:
    """A series listed below one hop's size: read whole, then one hop does it all. The
    pipeline's task group, task and events cost more per series than overlapping a few
    KB with the transfer would gain (one-file series: see bench/README.md)."""
    parts: list[bytes] = []
    size = 0

    async def keep(chunk: bytes) -> None:
        nonlocal size
        parts.append(chunk)
        size += len(chunk)
        if size >= budget:  # more than listed: hop what is here, memory stays bounded
            data = _join(parts)
            parts.clear()
            size = 0
            await hop(data, False)

    await receive(keep)
    await hop(_join(parts) if parts else None, True)


async def _receive_overlapped(receive: Receive, hop: Hop, *, budget: int, small: bool) -> None:
    """The socket and the worker thread side by side, the bytes between them in a _Pipe."""
    pipe = _Pipe(budget=budget, min_hop=_MIN_HOP if small else budget)

    async def process() -> None:
        while True:
            data, last = await pipe.take()
            await hop(data, last)
            if last:
                return

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(process)
            await receive(pipe.put)
            await pipe.close()
    except BaseExceptionGroup as group:
        raise _first_error(group) from None


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error a caller classifies: the only one, else the first that is not the
    other side's cancellation (both sides of a download can fail at once)."""
    exc = sole_error(group)
    if not isinstance(exc, BaseExceptionGroup):
        return exc
    _, rest = exc.split(anyio.get_cancelled_exc_class())
    leaf: BaseException = rest if rest is not None else exc
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    return leaf


def _abort(writer: _SeriesWriter, staging_dir: Path) -> None:
    writer.abort()
    shutil.rmtree(staging_dir, ignore_errors=True)


def _join(chunks: list[bytes]) -> bytes:
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
