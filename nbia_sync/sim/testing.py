"""pytest fixtures for the simulator (registered in tests/conftest.py's pytest_plugins).

- `sim_archive`: a small deterministic archive (2 collections x 2 patients x 1 study x
  2 series x 3 images of ~4 KiB; seed 0). Function-scoped: tests may mutate it.
- `sim`: a running SimServer over `sim_archive`, no faults.
- `running_sim(...)`: the same as an async context manager, for custom archives/faults.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection, Mapping
from contextlib import asynccontextmanager

import aiohttp
import pytest
import pytest_asyncio

from nbia_sync.clock import SYSTEM_CLOCK, Clock
from nbia_sync.sim.archive import SimArchive
from nbia_sync.sim.faults import SimFaults
from nbia_sync.sim.server import SimServer
from nbia_sync.sim.zipstream import Compression


def small_archive(seed: int = 0) -> SimArchive:
    """What the `sim_archive` fixture holds: 8 series, 24 files."""
    return SimArchive.generate(seed=seed)


@asynccontextmanager
async def running_sim(
    archive: SimArchive | None = None,
    faults: SimFaults | None = None,
    *,
    users: Mapping[str, str] | None = None,
    restricted: Mapping[str, Collection[str]] | None = None,
    compression: Compression = "stored",
    keycloak: bool = True,
    clock: Clock = SYSTEM_CLOCK,
) -> AsyncIterator[SimServer]:
    """`async with running_sim(archive, SimFaults(reset=0.2)) as sim: ... sim.url ...`"""
    server = SimServer(
        archive or small_archive(),
        faults,
        users=users,
        restricted=restricted,
        compression=compression,
        keycloak=keycloak,
        clock=clock,
    )
    async with server:
        yield server


@pytest.fixture
def sim_archive() -> SimArchive:
    return small_archive()


@pytest_asyncio.fixture
async def sim(sim_archive: SimArchive) -> AsyncIterator[SimServer]:
    async with running_sim(sim_archive) as server:
        yield server


async def guest_token(
    session: aiohttp.ClientSession, url: str, username: str = "nbia_guest", password: str = ""
) -> str:
    """A fresh access token from the simulator at `url` (password grant)."""
    form = {"username": username, "password": password, "client_id": "NBIA"}
    async with session.post(url + "oauth/token", data=form | {"grant_type": "password"}) as r:
        r.raise_for_status()
        body = await r.json()
    return str(body["access_token"])
