"""Series downloads: the ZIP the archive streams, and the faults a stream can suffer.

The archive builds each ZIP on the fly: getImageWithMD5Hash names files 00000001.dcm, ...
and appends md5hashes.csv last; getImage (v4) puts LICENSE first, names files 1-001.dcm with
NewFileNames=Yes, and adds md5hashes.csv only with IncludeMD5=Yes.
"""

from __future__ import annotations

import asyncio
import random
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

from aiohttp import web

from nbia_sync.sim.archive import LICENSE_NAME, LICENSE_URI, SimInstance, SimSeries
from nbia_sync.sim.counters import SimCounters
from nbia_sync.sim.faults import SimFaults, StreamFault
from nbia_sync.sim.zipstream import Compression, ZipStreamWriter

_MAX_PIECE = 1 << 20
# The archive wraps the response in `new BufferedOutputStream(output)` (V4_getImageWithMD5Hash):
# the ZIP leaves in 8 KiB writes, not one write per header, member and descriptor.
_SERVER_BUFFER = 8192
_BOMB_CLAIM = 1024  # what the bomb's local header says it inflates to


def _bomb(size: int) -> bytes:
    """Raw deflate data inflating to `size` zero bytes (about size / 1000 of it), made
    in microseconds: after a full flush the compressor's state is reset, so every 1 MiB
    block of zeros compresses to the same bytes and the stream is that piece repeated."""
    block = 1 << 20
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    piece = packer.compress(bytes(block)) + packer.flush(zlib.Z_FULL_FLUSH)
    whole, rest = divmod(size, block)
    tail = packer.compress(bytes(rest)) if rest else b""
    return piece * whole + tail + packer.flush()


_HOSTILE_NAMES = ("../../evil.dcm", "/etc/evil.dcm")


class StreamCut(Exception):
    """Raised by the pipe when a reset/stall fault reaches its point in the stream."""


@dataclass(frozen=True, slots=True)
class _Planned:
    name: str
    instance: SimInstance
    corrupt: bool


def _yes(value: str | None) -> bool:
    return (value or "").strip().lower() in ("yes", "true", "y", "1")


def _corrupted(instance: SimInstance) -> Iterator[bytes]:
    """The instance's bytes with the last one flipped (pixel data, so it still parses)."""
    position = instance.size - 1
    offset = 0
    for chunk in instance.iter_bytes():
        end = offset + len(chunk)
        if offset <= position < end:
            altered = bytearray(chunk)
            altered[position - offset] ^= 0xFF
            chunk = bytes(altered)
        offset = end
        yield chunk


def _crc_of_corrupted(instance: SimInstance) -> int:
    crc = 0
    for chunk in _corrupted(instance):
        crc = zlib.crc32(chunk, crc)
    return crc


class Pipe:
    """The response body: buffers as the archive does, counts bytes, paces to the bandwidth
    cap, cuts at a fault point. `close` sends what is still buffered."""

    def __init__(
        self,
        response: web.StreamResponse,
        counters: SimCounters,
        faults: SimFaults,
        cut_at: int | None,
        *,
        gzip: bool = False,
    ) -> None:
        self._response = response
        # Content-Encoding: gzip (the gzip_downloads knob); `sent` counts the ZIP's bytes.
        self._gzip = zlib.compressobj(6, zlib.DEFLATED, 31) if gzip else None
        self._counters = counters
        self._faults = faults
        self._cut_at = cut_at
        self.sent = 0
        self._pace_start = time.monotonic()
        self._pace_sent = 0
        self._pace_rate: int | None = None
        self._buffer = bytearray()

    async def write(self, data: bytes) -> None:
        # BufferedOutputStream's rule: a write that does not fit sends the buffer first, and
        # one at least as large as the buffer goes out directly.
        if len(self._buffer) + len(data) > _SERVER_BUFFER:
            await self._flush()
        if len(data) >= _SERVER_BUFFER:
            await self._write_through(data)
        else:
            self._buffer += data

    async def _flush(self) -> None:
        if self._buffer:
            data, self._buffer = bytes(self._buffer), bytearray()
            await self._write_through(data)

    async def _write_through(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            rate = self._rate()
            size = _MAX_PIECE if not rate else max(1, min(256 * 1024, rate // 20))
            piece = view[:size]
            if self._cut_at is not None and self.sent + len(piece) >= self._cut_at:
                await self._send(piece[: self._cut_at - self.sent])
                raise StreamCut
            await self._send(piece)
            view = view[len(piece) :]

    async def close(self) -> None:
        """The end of the body: what is buffered, then the gzip trailer when encoding."""
        await self._flush()
        if self._gzip is not None:
            await self._response.write(self._gzip.flush())

    def _rate(self) -> int | None:
        return self._faults.trickle or self._faults.bandwidth

    async def _send(self, piece: memoryview) -> None:
        if not piece:
            return
        if self._gzip is not None:
            packed = self._gzip.compress(piece) + self._gzip.flush(zlib.Z_SYNC_FLUSH)
            await self._response.write(packed)
        else:
            await self._response.write(bytes(piece))
        self.sent += len(piece)
        self._counters.bytes_sent += len(piece)
        hold = self._faults.hold
        if hold is not None:
            await hold.wait()
        await self._pace(len(piece))

    async def _pace(self, sent: int) -> None:
        rate = self._rate()
        if rate != self._pace_rate:  # the cap changed while streaming: start over
            self._pace_rate, self._pace_start, self._pace_sent = rate, time.monotonic(), 0
        if not rate:
            return
        self._pace_sent += sent
        ahead = self._pace_sent / rate - (time.monotonic() - self._pace_start)
        if ahead > 0:
            await asyncio.sleep(ahead)


@dataclass
class SeriesZip:
    """One download of one series, with at most one fault."""

    series: SimSeries
    endpoint: str  # getImageWithMD5Hash or getImage
    params: dict[str, str]
    fault: StreamFault
    compression: Compression
    faults: SimFaults | None = None  # the md5 and bomb knobs

    def _listed_md5(self, inst: SimInstance, md5: str) -> str:
        faults = self.faults
        if faults is None:
            return md5
        if faults.md5_blank > 0 and random.Random(inst.sop_uid).random() < faults.md5_blank:
            return " "
        return (md5.lstrip("0") or "0") if faults.md5_unpadded else md5

    def plan(self) -> list[_Planned]:
        instances = self.series.instances
        if self.endpoint == "getImage":
            if _yes(self.params.get("NewFileNames")):
                names = [f"1-{n:03d}.dcm" for n in range(1, len(instances) + 1)]
            else:
                names = [f"{i.sop_uid}.dcm" for i in instances]
        else:
            names = [f"{n:08d}.dcm" for n in range(1, len(instances) + 1)]
        if self.fault == "hostile" and names:
            names[0] = random.Random(self.series.uid).choice(_HOSTILE_NAMES)
        if self.fault == "truncate":
            # Closed early as when a file is missing on the server: half the files.
            instances = instances[: len(instances) // 2]
        bad = len(instances) // 2 if self.fault == "corrupt" else -1
        return [
            _Planned(name, inst, n == bad)
            for n, (name, inst) in enumerate(zip(names, instances, strict=False))
        ]

    @property
    def with_md5(self) -> bool:
        if self.fault == "truncate":
            return False
        return self.endpoint != "getImage" or _yes(self.params.get("IncludeMD5"))

    def cut_at(self) -> int | None:
        if self.fault not in ("reset", "stall"):
            return None
        return max(1, self.series.file_size // 2)

    async def write(self, writer: ZipStreamWriter) -> None:
        """Every entry, then md5hashes.csv when asked for, then the central directory."""
        if self.endpoint == "getImage":
            await writer.write_bytes("LICENSE", f"{LICENSE_NAME}\n{LICENSE_URI}\n".encode())
        rows: list[str] = []
        for n, planned in enumerate(self.plan()):
            inst = planned.instance
            if n == 0 and self.fault == "bomb":
                size = self.faults.bomb_bytes if self.faults is not None else 1 << 30
                payload = _bomb(size)
                await writer.write_raw_deflated(
                    planned.name, payload, claimed_size=_BOMB_CLAIM, crc=0
                )
                rows.append(f"{planned.name},{'0' * 32}")
                continue
            md5, crc = (
                inst.digests() if inst.digests_cached else await asyncio.to_thread(inst.digests)
            )
            if planned.corrupt:
                # The server's copy is damaged: its CRC matches the bad bytes, its MD5
                # (from the database) does not. Deflate mode computes the CRC as it goes.
                if writer.compression == "stored":
                    crc = await asyncio.to_thread(_crc_of_corrupted, inst)
                chunks = _corrupted(inst)
            else:
                chunks = inst.iter_bytes()
            await writer.write_entry(planned.name, chunks, size=inst.size, crc=crc)
            rows.append(f"{planned.name},{self._listed_md5(inst, md5)}")
        if self.with_md5:
            random.Random(self.series.uid).shuffle(rows)  # "in no particular order"
            await writer.write_bytes(
                "md5hashes.csv", "\n".join(["Filename,MD5Hash", *rows, ""]).encode()
            )
        await writer.finish()


def zip_date_time(series: SimSeries) -> tuple[int, int, int, int, int, int]:
    when = series.date_released
    return (max(1980, when.year), when.month, when.day, when.hour, when.minute, when.second)
