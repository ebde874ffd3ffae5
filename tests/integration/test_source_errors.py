"""A source that cannot be used: one plain last line, the source named once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from cli_fixtures import free_port, run_subprocess

pytestmark = pytest.mark.asyncio


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    path = tmp_path / "m.tcia"
    path.write_text("ListOfSeriesToDownload=\n1.2.3.4\n")
    return path


@pytest_asyncio.fixture
async def hang_up() -> AsyncIterator[str]:
    """A server that accepts each connection and closes it without a word."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f"http://127.0.0.1:{port}/nbia-api/"


async def test_refused_connection_is_said_in_plain_words(manifest: Path, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/nbia-api/"
    done = await run_subprocess("fetch", str(manifest), "--dest", str(tmp_path / "o"), "--url", url)
    assert done.code == 2
    name = url.split("/")[2].replace(":", "_")
    last = done.stderr.strip().splitlines()[-1]
    assert last == f"nbia-sync: error: source '{name}' ({url}): cannot connect (connection refused)"


async def test_a_server_that_hangs_up_is_said_in_plain_words(
    manifest: Path, tmp_path: Path, hang_up: str
) -> None:
    done = await run_subprocess(
        "fetch", str(manifest), "--dest", str(tmp_path / "o"), "--url", hang_up, "--api", "v2"
    )
    assert done.code == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.endswith("): the server closed the connection")
    assert last.count("source ") == 1  # not again from the login step
