"""Building blocks of the hostile-server knobs: gzip bombs and trickled bodies.

A gzip bomb is made without compressing the whole inflated size: one fully flushed deflate
block of spaces does not refer to anything before it, so the same compressed bytes can be
repeated any number of times (1 MiB of spaces is ~1 KB of deflate).
"""

from __future__ import annotations

import asyncio
import struct
import zlib

from aiohttp import web

_BLOCK = 1 << 20
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"


def _raw_deflate(data: bytes, mode: int) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return c.compress(data) + c.flush(mode)


def gzip_padded(prefix: bytes, padding: int, suffix: bytes) -> bytes:
    """gzip of prefix + `padding` spaces (rounded up to whole MiB) + suffix, built cheaply."""
    blocks = max(0, -(-padding // _BLOCK))
    block = b" " * _BLOCK
    packed = _raw_deflate(block, zlib.Z_FULL_FLUSH)
    crc = zlib.crc32(prefix)
    for _ in range(blocks):
        crc = zlib.crc32(block, crc)
    crc = zlib.crc32(suffix, crc)
    size = len(prefix) + blocks * _BLOCK + len(suffix)
    return b"".join(
        [
            _GZIP_HEADER,
            _raw_deflate(prefix, zlib.Z_FULL_FLUSH),
            packed * blocks,
            _raw_deflate(suffix, zlib.Z_FINISH),
            struct.pack("<II", crc, size & 0xFFFFFFFF),
        ]
    )


async def trickle(request: web.Request, response: web.Response, rate: int) -> web.StreamResponse:
    """Send `response` at `rate` bytes/s (a server that never stalls, but never gets on)."""
    body = response.body if isinstance(response.body, bytes) else b""
    slow = web.StreamResponse(status=response.status, reason=response.reason)
    for name, value in response.headers.items():
        if name.lower() not in ("content-length", "transfer-encoding"):
            slow.headers[name] = value
    slow.content_length = len(body)
    await slow.prepare(request)
    piece = max(1, rate // 10)
    try:
        for start in range(0, len(body), piece):
            await slow.write(body[start : start + piece])
            await asyncio.sleep(piece / rate)
        await slow.write_eof()
    except (ConnectionError, RuntimeError):
        pass  # the client gave up, as it should
    return slow
