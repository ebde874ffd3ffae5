"""Small hostile or real-shaped servers for tests: serve an aiohttp app over loopback."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web


@asynccontextmanager
async def serving(
    app: web.Application, *, tls: ssl.SSLContext | None = None, **options: Any
) -> AsyncIterator[str]:
    """Serve ``app`` on a free loopback port (``options``: web.AppRunner's; ``tls``: over
    HTTPS with this server context); the NBIA API root URL under it."""
    runner = web.AppRunner(app, **options)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
    await site.start()
    port = runner.addresses[0][1]
    scheme = "https" if tls is not None else "http"
    try:
        yield f"{scheme}://127.0.0.1:{port}/nbia-api/"
    finally:
        await runner.cleanup()
