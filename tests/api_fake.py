"""A scripted HTTP archive on loopback for the api/ unit tests.

aioresponses 0.7.9 cannot build responses for aiohttp 3.14 (ClientResponse now requires
``stream_writer``: pnuckowski/aioresponses#289), so the unit tests script a real server
instead; that also exercises the real socket paths (resets, stalls, chunked bodies).
Each path gets a queue of replies; the last one repeats. Every request is recorded.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest_asyncio
from aiohttp import web


@dataclass(frozen=True)
class Reply:
    status: int = 200
    body: bytes | str = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds before answering
    # Streamed replies: the body goes out in these pieces, pausing between them.
    chunks: tuple[bytes, ...] = ()
    pause: float = 0.0
    reset_after_chunks: bool = False  # drop the connection instead of ending the body


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    form: dict[str, str]


class FakeArchive:
    def __init__(self) -> None:
        self._queues: dict[str, list[Reply]] = {}
        self.requests: list[Recorded] = []
        self.url = ""  # the source root, set when the server runs

    def reply(self, path: str, *replies: Reply) -> None:
        """Queue replies for ``path`` (relative to the root, e.g. 'services/v4/getSeries')."""
        self._queues.setdefault("/nbia-api/" + path, []).extend(replies)

    def calls(self, path: str) -> list[Recorded]:
        return [r for r in self.requests if r.path == "/nbia-api/" + path]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        form = {k: str(v) for k, v in (await request.post()).items()}
        self.requests.append(
            Recorded(request.method, request.path, dict(request.query), dict(request.headers), form)
        )
        queue = self._queues.get(request.path)
        if not queue:
            return web.Response(status=404, text="no such endpoint")
        reply = queue.pop(0) if len(queue) > 1 else queue[0]
        if reply.delay:
            await asyncio.sleep(reply.delay)
        if not reply.chunks:
            body = reply.body.encode() if isinstance(reply.body, str) else reply.body
            return web.Response(
                status=reply.status,
                body=body,
                headers={"Content-Type": reply.content_type, **reply.headers},
            )
        resp = web.StreamResponse(
            status=reply.status, headers={"Content-Type": reply.content_type, **reply.headers}
        )
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for chunk in reply.chunks:
            await resp.write(chunk)
            if reply.pause:
                await asyncio.sleep(reply.pause)
        if reply.reset_after_chunks:
            assert request.transport is not None
            request.transport.close()
            return resp
        await resp.write_eof()
        return resp


@pytest_asyncio.fixture
async def fake_archive() -> AsyncIterator[FakeArchive]:
    archive = FakeArchive()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", archive.handle)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    archive.url = f"http://127.0.0.1:{port}/nbia-api/"
    try:
        yield archive
    finally:
        await runner.cleanup()
