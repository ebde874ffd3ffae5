"""A streaming ZIP reader: feed it the bytes of an archive as they arrive, get entries back.

The archive is generated on the fly by the server and cannot be seeked or re-read, so the
reader walks the local headers in order and never needs the central directory to find data:

* STORED entries with sizes in the local header, and DEFLATED entries with or without a
  data descriptor (the end of a deflate stream is found by zlib itself: ``.eof`` and
  ``unused_data``), are streamed with memory bounded by one chunk: inflating runs in
  bounded steps, each handed out before the next, whatever the compression ratio. An
  entry that inflates past the size its local header declared is refused as hostile at
  once (a deflate bomb); entries with a data descriptor are bounded by the caller.
* A STORED entry with a data descriptor and no sizes has no end marker in the stream; the
  only way to find its end is the central directory. From that entry on the raw bytes are
  spooled to a file and read back with :mod:`zipfile` at :meth:`ZipStreamReader.finish`.

Every entry name is checked before a byte of that entry is handed out; the central
directory (the stream's tail) is parsed at the end to reject symlinks and special files,
which only the central directory's external attributes can reveal. Each entry's CRC-32
and sizes are checked. Errors: :class:`HostileArchiveError` for names and links (never
worth retrying), :class:`IntegrityError` for damage and truncation (retryable).
"""

from __future__ import annotations

import stat
import struct
import unicodedata
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum, auto
from pathlib import Path
from typing import BinaryIO

from nbia_sync.errors import HostileArchiveError, IntegrityError, PermanentError

_LOCAL_SIG = b"PK\x03\x04"
_CENTRAL_SIG = b"PK\x01\x02"
_EOCD_SIG = b"PK\x05\x06"
_EOCD64_SIG = b"PK\x06\x06"
_EOCD64_LOCATOR_SIG = b"PK\x06\x07"
_DESCRIPTOR_SIG = b"PK\x07\x08"
# What may follow an entry: the next entry or the start of the central directory.
_NEXT_SIGS = (_LOCAL_SIG, _CENTRAL_SIG, _EOCD_SIG, _EOCD64_SIG)

_LOCAL = struct.Struct("<4sHHHHHIIIHH")  # 30 bytes
_CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")  # 46 bytes
_STORED = 0
_DEFLATED = 8
_FLAG_ENCRYPTED = 0x1
_FLAG_DESCRIPTOR = 0x8
_FLAG_UTF8 = 0x800
_ZIP64_EXTRA = 0x0001
_U32_MAX = 0xFFFFFFFF

# Inflate output and input per zlib call: bounds memory against a deflate bomb (each
# step's output is consumed before the next step runs).
_MAX_INFLATE_OUT = 1 << 20
_MAX_INFLATE_IN = 256 << 10
# The central directory is kept in memory; NBIA series have at most a few thousand files
# (~100 bytes each). Anything far beyond is not an NBIA archive.
_MAX_CENTRAL_BYTES = 64 << 20
_SPOOL_READ = 1 << 20


@dataclass(frozen=True, slots=True)
class EntryInfo:
    name: str
    method: int
    is_dir: bool


@dataclass(frozen=True, slots=True)
class EntryStart:
    entry: EntryInfo


@dataclass(frozen=True, slots=True)
class EntryData:
    data: bytes


@dataclass(frozen=True, slots=True)
class EntryEnd:
    entry: EntryInfo
    size: int
    crc: int


ZipEvent = EntryStart | EntryData | EntryEnd


def check_entry_name(name: str) -> None:
    """Refuse a name that could escape the extraction directory or confuse a file system."""
    if not name:
        raise HostileArchiveError("ZIP entry with an empty name")
    # A printable name has no control character: the per-character walk only for others.
    if not name.isprintable() and any(unicodedata.category(ch) == "Cc" for ch in name):
        problem = "has a NUL or control character"
    elif "\\" in name:
        problem = "has a backslash"
    elif name.startswith("/"):
        problem = "is an absolute path"
    elif len(name) >= 2 and name[1] == ":" and name[0].isascii() and name[0].isalpha():
        problem = "has a drive letter"
    elif ".." in name.split("/"):
        problem = "climbs out with '..'"
    else:
        return
    shown = name.encode("unicode_escape").decode("ascii")[:200]
    raise HostileArchiveError(f"ZIP entry name {problem}: {shown!r}")


def _decode_name(raw: bytes, flags: int) -> str:
    if b"\x00" in raw:
        shown = raw.replace(b"\x00", b"\\0").decode("ascii", "replace")[:200]
        raise HostileArchiveError(f"ZIP entry name has a NUL byte: {shown!r}")
    if flags & _FLAG_UTF8:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise HostileArchiveError("ZIP entry name is flagged UTF-8 but is not") from None
    return raw.decode("cp437")


def _check_attrs(name: str, external_attr: int) -> None:
    """Links and special files show only in the central directory's Unix mode bits."""
    fmt = stat.S_IFMT(external_attr >> 16)
    if fmt == stat.S_IFLNK:
        raise HostileArchiveError(f"ZIP entry is a symbolic link: {name!r}")
    if fmt not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise HostileArchiveError(f"ZIP entry is a special file (mode {fmt:o}): {name!r}")


def _zip64_sizes(extra: bytes, usize: int, csize: int) -> tuple[int, int, bool]:
    """Apply a ZIP64 extra field to (usize, csize); also say whether one was present."""
    pos = 0
    while pos + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, pos)
        body = extra[pos + 4 : pos + 4 + length]
        if tag == _ZIP64_EXTRA:
            fields = [struct.unpack_from("<Q", body, i)[0] for i in range(0, len(body) - 7, 8)]
            if usize == _U32_MAX and fields:
                usize = fields.pop(0)
            if csize == _U32_MAX and fields:
                csize = fields.pop(0)
            return usize, csize, True
        pos += 4 + length
    return usize, csize, False


class _State(Enum):
    HEADER = auto()
    STORED = auto()
    DEFLATE = auto()
    DESCRIPTOR = auto()
    CENTRAL = auto()
    SPOOL = auto()


@dataclass(slots=True)
class _Current:
    info: EntryInfo
    flags: int
    crc_expected: int
    csize: int  # from the local header; meaningless with a descriptor and no sizes
    usize: int
    zip64: bool
    crc: int = 0
    read_c: int = 0  # compressed bytes consumed
    read_u: int = 0  # uncompressed bytes produced
    inflater: zlib._Decompress | None = None
    pending: bool = False  # zlib may hold output beyond the last full step


class ZipStreamReader:
    """Push parser: ``feed(chunk)`` and ``finish()`` yield :data:`ZipEvent` in archive order.

    ``spool_path`` is where the raw archive goes if an entry cannot be streamed (it must be
    inside the caller's staging area). Not thread-safe; one archive per reader.
    """

    def __init__(self, spool_path: Path) -> None:
        self._spool_path = spool_path
        self._spool: BinaryIO | None = None
        self._spool_base = 0  # stream offset where the spool starts
        self._buf = bytearray()
        self._offset = 0  # stream offset of self._buf[0]
        self._state = _State.HEADER
        self._cur: _Current | None = None
        self._local_names: list[str] = []
        self._central = bytearray()
        self._finished = False

    # -- public -----------------------------------------------------------------

    @property
    def spooled(self) -> bool:
        """The archive went (partly) to the spool file, which the caller removes."""
        return self._state is _State.SPOOL

    @property
    def names(self) -> list[str]:
        """Names of the entries seen so far, in order."""
        return list(self._local_names)

    def feed(self, chunk: bytes) -> Iterator[ZipEvent]:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        if self._state is _State.SPOOL:
            self._spool_write(chunk)
            return
        if self._state is _State.CENTRAL:
            self._add_central(chunk)
            return
        self._buf += chunk
        pos = 0
        try:
            while True:
                step = self._step(pos, at_end=False)
                if step is None:
                    break
                pos, events = step
                yield from events
                if self._state in (_State.CENTRAL, _State.SPOOL):
                    rest = bytes(self._buf[pos:])
                    pos = len(self._buf)
                    if self._state is _State.SPOOL:
                        self._spool_write(rest)
                    else:
                        self._add_central(rest)
                    break
        finally:
            del self._buf[:pos]
            self._offset += pos

    def finish(self) -> Iterator[ZipEvent]:
        """The stream has ended: check the tail, and read back spooled entries if any."""
        if self._finished:
            return
        self._finished = True
        if self._state in (_State.DESCRIPTOR, _State.HEADER) and self._buf:
            pos = 0
            while True:
                step = self._step(pos, at_end=True)
                if step is None:
                    break
                pos, events = step
                yield from events
                if self._reached(_State.CENTRAL):
                    self._add_central(bytes(self._buf[pos:]))
                    pos = len(self._buf)
                    break
            del self._buf[:pos]
        if self._state is _State.SPOOL:
            yield from self._finish_spool()
            return
        if self._state is not _State.CENTRAL:
            where = f"inside entry {self._cur.info.name!r}" if self._cur else "before its end"
            if not self._local_names and self._state is _State.HEADER:
                raise IntegrityError("the download is not a ZIP archive (empty)")
            raise IntegrityError(f"archive truncated: the stream ended {where}")
        self._check_central(bytes(self._central))

    def close(self) -> None:
        """Release the spool file (the caller removes the staging directory)."""
        if self._spool is not None:
            self._spool.close()
            self._spool = None

    # -- streaming state machine ----------------------------------------------

    def _reached(self, state: _State) -> bool:
        # A method, not an inline test: the state changes inside the calls above it.
        return self._state is state

    def _step(self, pos: int, *, at_end: bool) -> tuple[int, list[ZipEvent]] | None:
        """Advance from ``pos``; None when more input is needed."""
        if self._state is _State.HEADER:
            return self._header(pos)
        if self._state is _State.STORED:
            return self._stored(pos)
        if self._state is _State.DEFLATE:
            return self._deflate(pos)
        if self._state is _State.DESCRIPTOR:
            return self._descriptor(pos, at_end=at_end)
        return None

    def _header(self, pos: int) -> tuple[int, list[ZipEvent]] | None:
        buf = self._buf
        if len(buf) - pos < 4:
            return None
        sig = bytes(buf[pos : pos + 4])
        if sig in (_CENTRAL_SIG, _EOCD_SIG, _EOCD64_SIG):
            self._state = _State.CENTRAL
            return pos, []
        if sig != _LOCAL_SIG:
            what = (
                "the download is not a ZIP archive"
                if self._offset + pos == 0
                else (f"corrupt ZIP stream: no entry header at offset {self._offset + pos}")
            )
            raise IntegrityError(what)
        if len(buf) - pos < _LOCAL.size:
            return None
        (_, _, flags, method, _, _, crc, csize, usize, nlen, xlen) = _LOCAL.unpack_from(buf, pos)
        end = pos + _LOCAL.size + nlen + xlen
        if len(buf) < end:
            return None
        raw_name = bytes(buf[pos + _LOCAL.size : pos + _LOCAL.size + nlen])
        extra = bytes(buf[pos + _LOCAL.size + nlen : end])
        name = _decode_name(raw_name, flags)
        check_entry_name(name)  # before a single byte of the entry is handed out
        if flags & _FLAG_ENCRYPTED:
            raise PermanentError(f"ZIP entry {name!r} is encrypted")
        if method not in (_STORED, _DEFLATED):
            raise PermanentError(f"ZIP entry {name!r} uses unsupported compression {method}")
        usize, csize, zip64 = _zip64_sizes(extra, usize, csize)
        has_descriptor = bool(flags & _FLAG_DESCRIPTOR)
        if method == _STORED and has_descriptor and csize in (0, _U32_MAX):
            # No length anywhere before the data: only the central directory knows.
            self._start_spool(header_pos=pos)
            return pos, []
        if not has_descriptor and _U32_MAX in (csize, usize):
            raise IntegrityError(f"ZIP entry {name!r}: sizes missing from a ZIP64 header")
        info = EntryInfo(name=name, method=method, is_dir=name.endswith("/"))
        self._local_names.append(name)
        self._cur = _Current(info, flags, crc, csize, usize, zip64)
        if method == _DEFLATED:
            self._cur.inflater = zlib.decompressobj(-15)
            self._state = _State.DEFLATE
        else:
            self._state = _State.STORED
        return end, [EntryStart(info)]

    def _stored(self, pos: int) -> tuple[int, list[ZipEvent]] | None:
        cur = self._cur
        assert cur is not None
        left = cur.csize - cur.read_c
        take = min(left, len(self._buf) - pos)
        events: list[ZipEvent] = []
        if take:
            data = bytes(self._buf[pos : pos + take])
            cur.crc = zlib.crc32(data, cur.crc)
            cur.read_c += take
            cur.read_u += take
            events.append(EntryData(data))
        if cur.read_c < cur.csize:
            return (pos + take, events) if take else None
        events.extend(self._entry_data_done())
        return pos + take, events

    def _deflate(self, pos: int) -> tuple[int, list[ZipEvent]] | None:
        """One bounded inflate step: at most _MAX_INFLATE_IN bytes in, _MAX_INFLATE_OUT
        out. The caller consumes each step's output before the next is made, so memory
        stays bounded whatever the compression ratio (a deflate bomb included)."""
        cur = self._cur
        assert cur is not None and cur.inflater is not None
        inflater = cur.inflater
        if len(self._buf) == pos and not cur.pending:
            return None
        data = bytes(self._buf[pos : pos + _MAX_INFLATE_IN])
        try:
            out = inflater.decompress(data, _MAX_INFLATE_OUT)
        except zlib.error as exc:
            raise IntegrityError(
                f"ZIP entry {cur.info.name!r}: corrupt deflate data ({exc})"
            ) from None
        rest = inflater.unused_data if inflater.eof else inflater.unconsumed_tail
        used = len(data) - len(rest)
        # A full output buffer may leave output pending inside zlib with no input left.
        cur.pending = not inflater.eof and len(out) == _MAX_INFLATE_OUT
        if not used and not out and not inflater.eof:
            return None  # zlib needs more input
        cur.read_c += used
        events: list[ZipEvent] = []
        if out:
            cur.crc = zlib.crc32(out, cur.crc)
            cur.read_u += len(out)
            self._check_declared(cur)
            events.append(EntryData(out))
        if inflater.eof:
            events.extend(self._entry_data_done())
        return pos + used, events

    def _check_declared(self, cur: _Current) -> None:
        """An entry whose local header gave its size may not inflate past it."""
        if not cur.flags & _FLAG_DESCRIPTOR and cur.read_u > cur.usize:
            raise HostileArchiveError(
                f"ZIP entry {cur.info.name!r} inflates past its declared size of "
                f"{cur.usize} bytes (a deflate bomb?)"
            )

    def _entry_data_done(self) -> list[ZipEvent]:
        cur = self._cur
        assert cur is not None
        if cur.flags & _FLAG_DESCRIPTOR:
            self._state = _State.DESCRIPTOR
            return []
        self._verify(cur, cur.crc_expected, cur.csize, cur.usize)
        return self._end_entry()

    def _descriptor(self, pos: int, *, at_end: bool) -> tuple[int, list[ZipEvent]] | None:
        """Find which descriptor layout this writer used: with or without its (optional)
        signature, 32- or 64-bit sizes. The right one matches what we counted and is
        followed by another header."""
        cur = self._cur
        assert cur is not None
        widths = (8, 4) if cur.zip64 else (4, 8)
        avail = len(self._buf) - pos
        waiting = False
        for signed in (True, False):
            for width in widths:
                size = (4 if signed else 0) + 4 + 2 * width
                if avail < size + 4 and not (at_end and avail >= size):
                    waiting = True
                    continue
                at = pos
                if signed:
                    if bytes(self._buf[at : at + 4]) != _DESCRIPTOR_SIG:
                        continue
                    at += 4
                fmt = "<IQQ" if width == 8 else "<III"
                crc, csize, usize = struct.unpack_from(fmt, self._buf, at)
                follow = bytes(self._buf[pos + size : pos + size + 4])
                if (crc, csize, usize) == (cur.crc, cur.read_c, cur.read_u) and (
                    follow in _NEXT_SIGS or (at_end and not follow)
                ):
                    return pos + size, self._end_entry()
        if waiting and not at_end:
            return None
        raise IntegrityError(
            f"ZIP entry {cur.info.name!r}: CRC or size mismatch "
            "(the data descriptor does not match the data)"
        )

    def _verify(self, cur: _Current, crc: int, csize: int, usize: int) -> None:
        if (cur.read_c, cur.read_u) != (csize, usize):
            raise IntegrityError(f"ZIP entry {cur.info.name!r}: size mismatch")
        if cur.crc != crc:
            raise IntegrityError(f"ZIP entry {cur.info.name!r}: CRC-32 mismatch")

    def _end_entry(self) -> list[ZipEvent]:
        cur = self._cur
        assert cur is not None
        self._cur = None
        self._state = _State.HEADER
        return [EntryEnd(cur.info, cur.read_u, cur.crc)]

    # -- central directory ------------------------------------------------------

    def _add_central(self, data: bytes) -> None:
        self._central += data
        if len(self._central) > _MAX_CENTRAL_BYTES:
            raise IntegrityError("ZIP central directory is implausibly large")

    def _check_central(self, tail: bytes) -> None:
        pos = 0
        names: list[str] = []
        while tail[pos : pos + 4] == _CENTRAL_SIG:
            if len(tail) - pos < _CENTRAL.size:
                raise IntegrityError("archive truncated inside the central directory")
            fields = _CENTRAL.unpack_from(tail, pos)
            flags, nlen, xlen, clen, ext_attr = (
                fields[3],
                fields[10],
                fields[11],
                fields[12],
                fields[15],
            )
            start = pos + _CENTRAL.size
            if len(tail) < start + nlen + xlen + clen:
                raise IntegrityError("archive truncated inside the central directory")
            name = _decode_name(tail[start : start + nlen], flags)
            check_entry_name(name)
            _check_attrs(name, ext_attr)
            names.append(name)
            pos = start + nlen + xlen + clen
        if tail[pos : pos + 4] not in (_EOCD_SIG, _EOCD64_SIG):
            raise IntegrityError("archive truncated: no end of central directory record")
        if names != self._local_names:
            raise HostileArchiveError(
                "ZIP central directory does not list the entries that were sent"
            )

    # -- spool fallback ---------------------------------------------------------

    def _start_spool(self, header_pos: int) -> None:
        self._state = _State.SPOOL
        self._spool_base = self._offset + header_pos
        self._spool_path.parent.mkdir(parents=True, exist_ok=True)
        self._spool = self._spool_path.open("wb")

    def _spool_write(self, data: bytes) -> None:
        assert self._spool is not None
        self._spool.write(data)

    def _finish_spool(self) -> Iterator[ZipEvent]:
        assert self._spool is not None
        self._spool.close()
        self._spool = None
        try:
            # The spool starts mid-archive; zipfile shifts every offset by the difference
            # ("concat"), so entries before the spool get negative offsets: those were
            # already streamed.
            with zipfile.ZipFile(self._spool_path) as zf:
                infos = zf.infolist()
                for info in infos:
                    check_entry_name(info.filename)
                    _check_attrs(info.filename, info.external_attr)
                streamed = [i.filename for i in infos if i.header_offset < 0]
                if streamed != self._local_names:
                    raise HostileArchiveError(
                        "ZIP central directory does not list the entries that were sent"
                    )
                rest = sorted(
                    (i for i in infos if i.header_offset >= 0), key=lambda i: i.header_offset
                )
                for info in rest:
                    yield from self._read_spooled(zf, info)
        except zipfile.BadZipFile as exc:
            raise IntegrityError(f"corrupt or truncated ZIP archive: {exc}") from None
        except EOFError:
            raise IntegrityError("archive truncated") from None

    def _read_spooled(self, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> Iterator[ZipEvent]:
        if info.flag_bits & _FLAG_ENCRYPTED:
            raise PermanentError(f"ZIP entry {info.filename!r} is encrypted")
        if info.compress_type not in (_STORED, _DEFLATED):
            raise PermanentError(
                f"ZIP entry {info.filename!r} uses unsupported compression {info.compress_type}"
            )
        entry = EntryInfo(info.filename, info.compress_type, info.is_dir())
        self._local_names.append(info.filename)
        yield EntryStart(entry)
        crc = size = 0
        with zf.open(info) as member:  # zipfile checks the CRC at the end of the member
            while data := member.read(_SPOOL_READ):
                crc = zlib.crc32(data, crc)
                size += len(data)
                yield EntryData(data)
        yield EntryEnd(entry, size, crc)
