"""A ZIP writer that streams: entries go out as they are produced, never seeking back.

Two shapes, like the archive's Java server can produce:
- STORED entries with CRC and sizes in the local header (the caller knows them up front);
- DEFLATED entries with general-purpose bit 3 and a data descriptor after the data, as
  java.util.zip.ZipOutputStream writes them.
A proper central directory closes the archive (ZIP64 records when sizes, offsets or the
entry count need them), so Python's zipfile can open the complete result.
Compression and CRC of big data run in a worker thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import struct
import zlib
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Literal

Compression = Literal["stored", "deflate"]
Sink = Callable[[bytes], Awaitable[None]]

_STORED = 0
_DEFLATED = 8
_LIMIT32 = 0xFFFFFFFF
_LIMIT16 = 0xFFFF
_FLAG_DATA_DESCRIPTOR = 0x08
_FLAG_UTF8 = 0x800
_VERSION_DEFAULT = 20
_VERSION_ZIP64 = 45
_MADE_BY_UNIX = 3 << 8
_FILE_ATTRS = (0o100644 << 16) & 0xFFFFFFFF


@dataclass(slots=True)
class _Entry:
    name: bytes
    flags: int
    method: int
    crc: int
    compressed: int
    size: int
    offset: int


def _dos_time(when: tuple[int, int, int, int, int, int]) -> tuple[int, int]:
    year, month, day, hour, minute, second = when
    return (hour << 11) | (minute << 5) | (second // 2), ((year - 1980) << 9) | (month << 5) | day


async def _aiter(chunks: Iterable[bytes] | AsyncIterable[bytes]) -> AsyncIterable[bytes]:
    if isinstance(chunks, AsyncIterable):
        async for chunk in chunks:
            yield chunk
    else:
        for chunk in chunks:
            yield chunk


class ZipStreamWriter:
    """Write entries one after the other to `sink`, then `finish()` the archive."""

    def __init__(
        self,
        sink: Sink,
        *,
        compression: Compression = "stored",
        date_time: tuple[int, int, int, int, int, int] = (2020, 1, 1, 0, 0, 0),
        force_zip64: bool = False,
    ) -> None:
        self._sink = sink
        self.compression: Compression = compression
        self._time, self._date = _dos_time(date_time)
        # Tests use this to exercise the ZIP64 records without writing 4 GiB.
        self._force_zip64 = force_zip64
        self._entries: list[_Entry] = []
        self.offset = 0

    async def _write(self, data: bytes) -> None:
        if data:
            await self._sink(data)
            self.offset += len(data)

    def _flags(self, name: str) -> int:
        return 0 if name.isascii() else _FLAG_UTF8

    async def write_entry(
        self,
        name: str,
        chunks: Iterable[bytes] | AsyncIterable[bytes],
        *,
        size: int,
        crc: int | None = None,
    ) -> None:
        """One file in the archive's compression mode. STORED needs `crc` up front;
        `size` is the uncompressed length either way."""
        if self.compression == "deflate":
            await self.write_deflated(name, chunks)
        else:
            if crc is None:
                raise ValueError("a STORED entry needs its CRC before its data")
            await self.write_stored(name, chunks, size=size, crc=crc)

    async def write_bytes(self, name: str, data: bytes) -> None:
        """A small in-memory entry (LICENSE, md5hashes.csv)."""
        await self.write_entry(name, [data], size=len(data), crc=zlib.crc32(data))

    async def write_stored(
        self,
        name: str,
        chunks: Iterable[bytes] | AsyncIterable[bytes],
        *,
        size: int,
        crc: int,
    ) -> None:
        raw = name.encode()
        zip64 = self._force_zip64 or size >= _LIMIT32
        extra = struct.pack("<HHQQ", 1, 16, size, size) if zip64 else b""
        stated = _LIMIT32 if zip64 else size
        entry = _Entry(raw, self._flags(name), _STORED, crc, size, size, self.offset)
        await self._write(self._local_header(entry, stated, stated, zip64, extra))
        await self._write_all(chunks)
        self._entries.append(entry)

    async def _write_all(self, chunks: Iterable[bytes] | AsyncIterable[bytes]) -> None:
        async for chunk in _aiter(chunks):
            await self._write(chunk)

    async def write_deflated(
        self, name: str, chunks: Iterable[bytes] | AsyncIterable[bytes]
    ) -> None:
        raw = name.encode()
        entry = _Entry(
            raw, self._flags(name) | _FLAG_DATA_DESCRIPTOR, _DEFLATED, 0, 0, 0, self.offset
        )
        # Sizes and CRC are unknown until the end, as with Java's streaming writer.
        await self._write(self._local_header(entry, 0, 0, False, b""))
        compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)
        crc = size = compressed = 0

        def step(data: bytes, crc: int) -> tuple[bytes, int]:
            return compressor.compress(data), zlib.crc32(data, crc)

        async for chunk in _aiter(chunks):
            out, crc = await asyncio.to_thread(step, chunk, crc)
            size += len(chunk)
            compressed += len(out)
            await self._write(out)
        tail = compressor.flush()
        compressed += len(tail)
        await self._write(tail)
        entry.crc, entry.size, entry.compressed = crc, size, compressed
        if size >= _LIMIT32 or compressed >= _LIMIT32 or self._force_zip64:
            descriptor = struct.pack("<IIQQ", 0x08074B50, crc, compressed, size)
        else:
            descriptor = struct.pack("<IIII", 0x08074B50, crc, compressed, size)
        await self._write(descriptor)
        self._entries.append(entry)

    async def write_raw_deflated(
        self, name: str, payload: bytes, *, claimed_size: int, crc: int
    ) -> None:
        """A DEFLATED entry from ready-made deflate data, its sizes in the local header
        (and `claimed_size` there, true or not): the hostile-server knob's tool."""
        raw = name.encode()
        entry = _Entry(
            raw, self._flags(name), _DEFLATED, crc, len(payload), claimed_size, self.offset
        )
        await self._write(self._local_header(entry, len(payload), claimed_size, False, b""))
        await self._write(payload)
        self._entries.append(entry)

    def _local_header(
        self, entry: _Entry, compressed: int, size: int, zip64: bool, extra: bytes
    ) -> bytes:
        crc = 0 if entry.flags & _FLAG_DATA_DESCRIPTOR else entry.crc
        return (
            struct.pack(
                "<IHHHHHIIIHH",
                0x04034B50,
                _VERSION_ZIP64 if zip64 else _VERSION_DEFAULT,
                entry.flags,
                entry.method,
                self._time,
                self._date,
                crc,
                compressed,
                size,
                len(entry.name),
                len(extra),
            )
            + entry.name
            + extra
        )

    def _central_header(self, entry: _Entry) -> bytes:
        zip64_fields: list[int] = []
        size, compressed, offset = entry.size, entry.compressed, entry.offset
        force = self._force_zip64
        if force or size >= _LIMIT32:
            zip64_fields.append(size)
            size = _LIMIT32
        if force or compressed >= _LIMIT32:
            zip64_fields.append(compressed)
            compressed = _LIMIT32
        if force or offset >= _LIMIT32:
            zip64_fields.append(offset)
            offset = _LIMIT32
        extra = b""
        if zip64_fields:
            extra = struct.pack(f"<HH{len(zip64_fields)}Q", 1, 8 * len(zip64_fields), *zip64_fields)
        version = _VERSION_ZIP64 if zip64_fields else _VERSION_DEFAULT
        return (
            struct.pack(
                "<IHHHHHHIIIHHHHHII",
                0x02014B50,
                _MADE_BY_UNIX | version,
                version,
                entry.flags,
                entry.method,
                self._time,
                self._date,
                entry.crc,
                compressed,
                size,
                len(entry.name),
                len(extra),
                0,
                0,
                0,
                _FILE_ATTRS,
                offset,
            )
            + entry.name
            + extra
        )

    async def finish(self) -> None:
        """Write the central directory and the end records."""
        start = self.offset
        await self._write(b"".join(self._central_header(e) for e in self._entries))
        cd_size = self.offset - start
        count = len(self._entries)
        if self._force_zip64 or count >= _LIMIT16 or start >= _LIMIT32 or cd_size >= _LIMIT32:
            eocd64_at = self.offset
            await self._write(
                struct.pack(
                    "<IQHHIIQQQQ",
                    0x06064B50,
                    44,
                    _MADE_BY_UNIX | _VERSION_ZIP64,
                    _VERSION_ZIP64,
                    0,
                    0,
                    count,
                    count,
                    cd_size,
                    start,
                )
                + struct.pack("<IIQI", 0x07064B50, 0, eocd64_at, 1)
            )
            count16, size32, start32 = _LIMIT16, _LIMIT32, _LIMIT32
        else:
            count16, size32, start32 = count, cd_size, start
        await self._write(
            struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count16, count16, size32, start32, 0)
        )
