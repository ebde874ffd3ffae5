"""Small hostile or real-shaped servers for tests: serve an aiohttp app over loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web


@asynccontextmanager
async def serving(app: web.Application, **options: Any) -> AsyncIterator[str]:
    """Serve ``app`` on a free loopback port (``options``: web.AppRunner's); the NBIA API
    root URL under it."""
    runner = web.AppRunner(app, **options)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/nbia-api/"
    finally:
        await runner.cleanup()
