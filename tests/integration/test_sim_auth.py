"""The simulator's OAuth: grants, expiry, refresh, revocation and logout.

`_query` tells a working token from a dead one in either auth flavour: Keycloak (the
default, as TCIA runs) answers a dead token's v2 query 200 with an empty body, Spring
401 invalid_token. Keycloak-only behaviour is in test_keycloak_mode.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from nbia_sync.sim import SimServer

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def _grant(http: aiohttp.ClientSession, sim: SimServer, **form: str) -> tuple[int, Any]:
    async with http.post(sim.url + "oauth/token", data=form) as r:
        return r.status, await r.json()


async def _password(http: aiohttp.ClientSession, sim: SimServer) -> dict[str, Any]:
    status, body = await _grant(
        http, sim, username="nbia_guest", password="", client_id="NBIA", grant_type="password"
    )
    assert status == 200
    return dict(body)


DEAD, LIVE = "dead", "live"


async def _query(http: aiohttp.ClientSession, sim: SimServer, token: str | None) -> str:
    """LIVE when getCollectionValues lists collections; DEAD when the server answers as
    it does to a dead token (its mode's way); anything else fails the test."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with http.get(sim.url + "services/v2/getCollectionValues", headers=headers) as r:
        body = await r.read()
        if sim.keycloak and (r.status, body) == (200, b""):
            return DEAD
        if not sim.keycloak and r.status == 401:
            assert json.loads(body)["error"] == "invalid_token"
            return DEAD
        assert r.status == 200 and json.loads(body), (r.status, body)
        return LIVE


@pytest_asyncio.fixture(params=["keycloak", "spring"])
async def any_sim(request: pytest.FixtureRequest, sim: SimServer) -> SimServer:
    """The `sim` fixture in each auth flavour."""
    sim.keycloak = request.param == "keycloak"
    return sim


def _refresh_client(sim: SimServer) -> str:
    return "nbia" if sim.keycloak else "NBIA"


async def test_password_grant_returns_the_keycloak_shape(
    http: aiohttp.ClientSession, sim: SimServer
) -> None:
    body = await _password(http, sim)
    assert body["token_type"] == "bearer"
    assert body["expires_in"] == 7200 and body["refresh_expires_in"] == 7200
    assert {"access_token", "refresh_token", "not-before-policy", "session_state", "scope"} <= set(
        body
    )
    assert sim.counters.grants["password"] == 1


async def test_bad_password_is_401_invalid_grant(
    http: aiohttp.ClientSession, sim: SimServer
) -> None:
    status, body = await _grant(
        http, sim, username="nbia_guest", password="x", client_id="NBIA", grant_type="password"
    )
    assert (status, body["error"]) == (401, "invalid_grant")
    assert sim.counters.unauthorized == 1


async def test_older_client_id_with_secret_is_accepted(
    http: aiohttp.ClientSession, any_sim: SimServer
) -> None:
    sim = any_sim
    status, _ = await _grant(
        http,
        sim,
        username="nbia_guest",
        password="",
        client_id="nbiaRestAPIClient",
        client_secret="s3cret",
        grant_type="password",
    )
    assert status == 200


async def test_v2_needs_a_token_and_v4_does_not(
    http: aiohttp.ClientSession, any_sim: SimServer
) -> None:
    sim = any_sim
    assert await _query(http, sim, None) == DEAD
    assert await _query(http, sim, "made-up") == DEAD
    async with http.get(sim.url + "services/v4/getCollectionValues") as r:
        assert r.status == 200 and await r.json()
    token = (await _password(http, sim))["access_token"]
    assert await _query(http, sim, token) == LIVE


async def test_token_expires_after_its_ttl(http: aiohttp.ClientSession, any_sim: SimServer) -> None:
    sim = any_sim
    sim.faults.token_ttl = 0.2
    body = await _password(http, sim)
    assert body["expires_in"] == 0.2
    assert await _query(http, sim, body["access_token"]) == LIVE
    await asyncio.sleep(0.25)
    assert await _query(http, sim, body["access_token"]) == DEAD


async def test_refresh_grant_gives_a_working_token(
    http: aiohttp.ClientSession, any_sim: SimServer
) -> None:
    sim = any_sim
    sim.faults.token_ttl = 0.2
    first = await _password(http, sim)
    await asyncio.sleep(0.25)
    status, second = await _grant(
        http,
        sim,
        grant_type="refresh_token",
        refresh_token=first["refresh_token"],
        client_id=_refresh_client(sim),
    )
    assert status == 200
    assert second["access_token"] != first["access_token"]
    assert await _query(http, sim, second["access_token"]) == LIVE
    assert sim.counters.grants["refresh_token"] == 1


async def test_dead_refresh_token_is_401_invalid_grant(
    http: aiohttp.ClientSession, any_sim: SimServer
) -> None:
    sim = any_sim
    sim.faults.refresh_ttl = 0.1
    first = await _password(http, sim)
    await asyncio.sleep(0.15)
    status, body = await _grant(
        http,
        sim,
        grant_type="refresh_token",
        refresh_token=first["refresh_token"],
        client_id=_refresh_client(sim),
    )
    assert (status, body["error"]) == (401, "invalid_grant")


async def test_revoke_all_tokens_kills_access_and_refresh(
    http: aiohttp.ClientSession, any_sim: SimServer
) -> None:
    sim = any_sim
    body = await _password(http, sim)
    sim.revoke_all_tokens()
    assert await _query(http, sim, body["access_token"]) == DEAD
    status, answer = await _grant(
        http,
        sim,
        grant_type="refresh_token",
        refresh_token=body["refresh_token"],
        client_id=_refresh_client(sim),
    )
    assert (status, answer["error"]) == (401, "invalid_grant")


async def test_logout_ends_the_session(http: aiohttp.ClientSession, any_sim: SimServer) -> None:
    sim = any_sim
    body = await _password(http, sim)
    headers = {"Authorization": f"Bearer {body['access_token']}"}
    method = "POST" if sim.keycloak else "GET"
    async with http.request(method, sim.url + "logout", headers=headers) as r:
        assert (r.status, await r.text()) == (200, "You Have Logged Out successfully.")
    assert await _query(http, sim, body["access_token"]) == DEAD
    assert sim.counters.logouts == 1


async def test_token_is_checked_only_when_a_stream_starts(
    http: aiohttp.ClientSession, sim: SimServer
) -> None:
    sim.faults.bandwidth = 20_000  # ~0.6 s for a 12 KB series
    token = (await _password(http, sim))["access_token"]
    uid = next(iter(sim.archive.series))
    url = sim.url + "services/v2/getImageWithMD5Hash"
    async with http.get(
        url, params={"SeriesInstanceUID": uid}, headers={"Authorization": f"Bearer {token}"}
    ) as r:
        first = await r.content.read(1000)
        sim.revoke_all_tokens()
        rest = await r.read()
    assert len(first) + len(rest) > sim.archive.series[uid].file_size
    assert sim.counters.downloads_completed[uid] == 1
