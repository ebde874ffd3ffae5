"""Reading response bodies with bounds: a floor on progress, bounded inflation, a size cap,
and JSON arrays parsed record by record.

aiohttp's own guards do not cover a hostile server: ``sock_read`` only bounds silence (a
server trickling 1 byte/s passes it forever), and its automatic decompression inflates a
whole received chunk at once (1 MB of gzip can become 1 GB in one step). So every request
of nbia-sync turns automatic decompression off and reads through ``body_chunks``:
  * ``ProgressFloor``: curl's low-speed rule — slower than ``low_speed_limit`` bytes/s for
    ``low_speed_time`` seconds is cut (RetryableError);
  * gzip/deflate inflated in steps of at most ``step`` bytes, each handed on before the next;
  * ``max_bytes`` on the decoded size (PermanentError: asking again gets the same answer).
``json_records`` then parses a JSON array one element at a time, so a listing of hundreds
of thousands of rows never exists as one string or one list of dicts.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import re
import zlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

from nbia_sync.api._aiohttp import aiohttp
from nbia_sync.api.retry import error_for_exception
from nbia_sync.config import TransferSettings
from nbia_sync.errors import PermanentError, RetryableError

# Read size for queries and small bodies (downloads use transfer.chunk_size).
QUERY_READ_SIZE = 1 << 16
# One element of a JSON answer larger than this is refused: real records are < 10 KB.
MAX_RECORD_CHARS = 16 << 20
# Encodings we ask for on queries; downloads ask for none (a ZIP does not compress).
QUERY_ACCEPT_ENCODING = "gzip, deflate"
# Values up to this long are shared between records (longer ones are rarely repeated).
_SHARED_CHARS = 256
# The memo of shared strings is emptied when it holds this many: it would otherwise keep
# every UID and date of an answer alive after its records are gone (~600 bytes a series
# of a listing), while what repeats (keys, collection, licence) is back in it at once.
_SHARED_MAX = 2048
_SPACE = re.compile(r"[ \t\r\n]*")


@dataclass(frozen=True, slots=True)
class Floor:
    """The low-speed rule's two numbers (see TransferSettings)."""

    limit: int  # bytes/s; 0 disables
    period: float  # seconds

    @classmethod
    def from_settings(cls, transfer: TransferSettings) -> Floor:
        limit = transfer.low_speed_limit
        if transfer.bandwidth_limit is not None:
            # Our own throttle must not look like a slow server: at most half of each
            # worker's share of the bandwidth cap.
            limit = min(limit, transfer.bandwidth_limit // (2 * transfer.workers))
        return cls(limit, transfer.low_speed_time)


class ProgressFloor:
    """curl's CURLOPT_LOW_SPEED_LIMIT/TIME over windows of ``period`` seconds.

    A window ends when ``period`` has passed; if fewer than ``limit`` bytes per second of
    it arrived, the transfer is too slow. ``deadline()`` tells the reader when to stop
    waiting for the next chunk, so a server sending nothing at all is cut on time too.
    """

    def __init__(self, floor: Floor, what: str) -> None:
        self._floor = floor
        self._what = what
        self._clock = asyncio.get_running_loop().time
        self._start = self._clock()
        self._bytes = 0

    def deadline(self) -> float | None:
        """Loop time by which the next bytes must arrive; None while the window is met."""
        if self._floor.limit <= 0 or self._bytes >= self._floor.limit * self._floor.period:
            return None
        return self._start + self._floor.period

    def record(self, received: int) -> None:
        """Count ``received`` bytes; raise RetryableError if the window ended too slow."""
        if self._floor.limit <= 0:
            return
        self._bytes += received
        now = self._clock()
        elapsed = now - self._start
        if elapsed < self._floor.period:
            return
        if self._bytes < self._floor.limit * elapsed:
            raise RetryableError(
                f"{self._what}: too slow, {self._bytes} bytes in {elapsed:.1f} s "
                f"(below transfer.low_speed_limit = {self._floor.limit} bytes/s for "
                f"transfer.low_speed_time = {self._floor.period:g} s)"
            )
        self._start, self._bytes = now, 0


class Inflater:
    """Content-Encoding undone in bounded steps: ``feed`` yields pieces of <= ``step`` bytes."""

    def __init__(self, encoding: str, what: str) -> None:
        name = encoding.strip().lower()
        self._what = what
        self._raw_deflate = False
        self._z: Any = None
        if name in ("gzip", "x-gzip"):
            self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif name == "deflate":
            self._z = "deflate"  # zlib-wrapped or raw: decided by the first byte
        elif name not in ("", "identity"):
            raise RetryableError(
                f"{what}: the archive sent Content-Encoding {name!r}, which was not asked for"
            )

    @property
    def active(self) -> bool:
        return self._z is not None

    def feed(self, data: bytes, step: int) -> Iterator[bytes]:
        if self._z is None:
            if data:
                yield data
            return
        if self._z == "deflate":
            if not data:
                return
            # RFC 9110 says zlib format; some servers send raw deflate (as browsers accept).
            raw = (data[0] & 0x0F) != 8
            self._z = zlib.decompressobj(-zlib.MAX_WBITS if raw else zlib.MAX_WBITS)
        pending = data
        try:
            while pending and not self._z.eof:
                out = self._z.decompress(pending, step)
                pending = self._z.unconsumed_tail
                if out:
                    yield out
        except zlib.error as exc:
            raise RetryableError(f"{self._what}: the compressed body is corrupt ({exc})") from None

    def finish(self) -> None:
        if isinstance(self._z, str) or self._z is None:
            return
        if not self._z.eof:
            raise RetryableError(f"{self._what}: the compressed body ended early")


async def raw_chunks(
    resp: aiohttp.ClientResponse, what: str, floor: Floor, size: int
) -> AsyncIterator[bytes]:
    """The body as received, cut when it falls below the progress floor."""
    progress = ProgressFloor(floor, what)
    while True:
        scope = asyncio.timeout_at(progress.deadline())
        try:
            async with scope:
                chunk = await resp.content.read(size)
        except TimeoutError as exc:
            if not scope.expired():
                raise error_for_exception(exc, what) from exc  # aiohttp's sock_read
            progress.record(0)  # raises: the window ended below the floor
            continue
        except (aiohttp.ClientError, OSError) as exc:
            raise error_for_exception(exc, what) from exc
        if not chunk:
            return
        progress.record(len(chunk))
        yield chunk


async def body_chunks(
    resp: aiohttp.ClientResponse,
    what: str,
    floor: Floor,
    *,
    size: int = QUERY_READ_SIZE,
    max_bytes: int | None = None,
    limit_name: str = "the size limit",
) -> AsyncIterator[bytes]:
    """The decoded body in pieces of <= ``size`` bytes; refused past ``max_bytes``."""
    inflater = Inflater(resp.headers.get("Content-Encoding", ""), what)
    total = 0
    async for chunk in raw_chunks(resp, what, floor, size):
        for piece in inflater.feed(chunk, size):
            total += len(piece)
            if max_bytes is not None and total > max_bytes:
                encoded = " (after decompression)" if inflater.active else ""
                raise PermanentError(
                    f"{what}: the answer is larger than {limit_name} = {max_bytes} "
                    f"bytes{encoded}; refused"
                )
            yield piece
    inflater.finish()


async def read_all(
    resp: aiohttp.ClientResponse,
    what: str,
    floor: Floor,
    *,
    max_bytes: int | None = None,
    limit_name: str = "the size limit",
) -> bytes:
    """A whole (small) body, through the same bounds."""
    parts = [
        piece
        async for piece in body_chunks(
            resp, what, floor, max_bytes=max_bytes, limit_name=limit_name
        )
    ]
    return b"".join(parts)


async def json_records(chunks: AsyncIterator[bytes], what: str) -> AsyncIterator[Any]:
    """The elements of a JSON array body one by one (a lone object counts as one).

    An empty body means no results. Anything else that is not JSON, or not objects, is a
    RetryableError (a truncated answer or a proxy's error page sent with 200).
    """
    parser = _ArrayParser(chunks, what)
    async for item in parser.items():
        yield item


class _ArrayParser:
    def __init__(self, chunks: AsyncIterator[bytes], what: str) -> None:
        self._chunks = chunks.__aiter__()
        self._what = what
        self._text = codecs.getincrementaldecoder("utf-8-sig")()
        # One copy of each repeated string (keys, collection, licence, modality...) across
        # records: json's own memo lasts one raw_decode call, i.e. one record here.
        self._memo: dict[str, str] = {}
        self._decoder = json.JSONDecoder(object_pairs_hook=self._shared)
        self._buf = ""
        self._pos = 0
        self._eof = False

    def _shared(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        memo = self._memo
        if len(memo) >= _SHARED_MAX:
            memo.clear()
        return {
            memo.setdefault(k, k): (
                memo.setdefault(v, v) if isinstance(v, str) and len(v) <= _SHARED_CHARS else v
            )
            for k, v in pairs
        }

    async def items(self) -> AsyncIterator[Any]:
        first = await self._next_char()
        if first is None:
            return
        if first == "{":
            yield await self._value()
            await self._expect_end()
            return
        if first != "[":
            if first in '"-0123456789tfn':  # a JSON scalar: JSON, but not objects
                raise self._not_objects()
            raise self._invalid(f"it starts with {first!r}")
        self._pos += 1
        char = await self._next_char()
        if char == "]":
            self._pos += 1
            await self._expect_end()
            return
        while True:
            yield await self._value()
            char = await self._next_char()
            if char == ",":
                self._pos += 1
                continue
            if char == "]":
                self._pos += 1
                await self._expect_end()
                return
            raise self._invalid("expected ',' or ']'")

    async def _value(self) -> Any:
        """The object at the current position (reads on until it is complete)."""
        await self._next_char()
        tried = 0
        while True:
            available = len(self._buf) - self._pos
            if self._eof or available >= 2 * tried:
                try:
                    value, end = self._decoder.raw_decode(self._buf, self._pos)
                except json.JSONDecodeError as exc:
                    if self._eof:
                        raise self._invalid(str(exc)) from None
                    tried = max(available, 1)
                else:
                    if not isinstance(value, dict):
                        raise self._not_objects()
                    self._pos = end
                    return value
            if available > MAX_RECORD_CHARS:
                raise self._invalid(f"one record is larger than {MAX_RECORD_CHARS} characters")
            await self._more()

    async def _next_char(self) -> str | None:
        """The next non-whitespace character (not consumed); None at the end of the body."""
        while True:
            self._pos = _SPACE.match(self._buf, self._pos).end()  # type: ignore[union-attr]
            if self._pos < len(self._buf):
                return self._buf[self._pos]
            if self._eof:
                return None
            await self._more()

    async def _expect_end(self) -> None:
        if await self._next_char() is not None:
            raise self._invalid("extra data after the JSON value")

    async def _more(self) -> None:
        try:
            chunk = await anext(self._chunks)
        except StopAsyncIteration:
            chunk, self._eof = b"", True
        try:
            decoded = self._text.decode(chunk, final=self._eof)
        except UnicodeDecodeError as exc:
            raise self._invalid(f"not UTF-8: {exc.reason}") from None
        self._buf = self._buf[self._pos :] + decoded
        self._pos = 0

    def _invalid(self, reason: str) -> RetryableError:
        return RetryableError(f"{self._what}: the answer is not valid JSON ({reason})")

    def _not_objects(self) -> RetryableError:
        return RetryableError(f"{self._what}: the answer is not a JSON list of objects")
