"""TokenSession against the simulator's token endpoint, both on one fake clock.

Token lifetimes run on a FakeClock shared by the simulator's token store and the
session, so "79 s later" is one `advance`, not a wait. Odd answers of a token endpoint
(a refused refresh, 5xx, an HTML page) are scripted on the simulator.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio

from nbia_sync.api.auth import TokenSession
from nbia_sync.clock import FakeClock
from nbia_sync.config import SourceSettings
from nbia_sync.errors import AuthError, RetryableError
from nbia_sync.secret import SecretStr
from nbia_sync.sim import SimArchive, SimFaults, SimReply, SimRequest, SimServer
from nbia_sync.sim.testing import running_sim

pytestmark = pytest.mark.asyncio

PASSWORD = "s3cret-pw"
TOKEN = "oauth/token"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(autojump=False)


@pytest_asyncio.fixture
async def auth_sim(sim_archive: SimArchive, clock: FakeClock) -> AsyncIterator[SimServer]:
    faults = SimFaults(token_ttl=100, refresh_ttl=300)
    users = {"alice": PASSWORD, "nbia_guest": ""}
    async with running_sim(sim_archive, faults, users=users, clock=clock) as sim:
        sim.recorded = []
        yield sim


def session(
    sim: SimServer, http: aiohttp.ClientSession, clock: FakeClock, password: str = PASSWORD
) -> TokenSession:
    source = SourceSettings(
        name="main", url=sim.url, api="v2", username="alice", password=SecretStr(password)
    )
    return TokenSession(source, http, clock=clock.monotonic)


@pytest_asyncio.fixture
async def tokens(auth_sim: SimServer, clock: FakeClock) -> AsyncIterator[TokenSession]:
    async with aiohttp.ClientSession() as http:
        yield session(auth_sim, http, clock)


def calls(sim: SimServer, endpoint: str) -> list[SimRequest]:
    assert sim.recorded is not None
    return [r for r in sim.recorded if r.endpoint == endpoint]


def grant_types(sim: SimServer) -> list[str]:
    return [call.form["grant_type"] for call in calls(sim, TOKEN)]


async def test_first_token_uses_the_password_grant(
    tokens: TokenSession, auth_sim: SimServer
) -> None:
    assert await tokens.token()
    (call,) = calls(auth_sim, TOKEN)
    assert call.method == "POST"
    assert call.form == {
        "username": "alice",
        "password": PASSWORD,
        "client_id": "NBIA",
        "grant_type": "password",
    }
    assert auth_sim.counters.grants == {"password": 1}


async def test_guest_logs_in_with_an_empty_password(auth_sim: SimServer) -> None:
    guest = SourceSettings(name="pub", url=auth_sim.url, api="v1")
    async with aiohttp.ClientSession() as http:
        await TokenSession(guest, http).token()
    form = calls(auth_sim, TOKEN)[0].form
    assert (form["username"], form["password"]) == ("nbia_guest", "")
    assert auth_sim.counters.grants == {"password": 1}


async def test_token_is_reused_while_enough_life_is_left(
    tokens: TokenSession, auth_sim: SimServer, clock: FakeClock
) -> None:
    first = await tokens.token()
    clock.advance(79)  # 21 s of 100 left: above the 20 % margin
    assert await tokens.token() == first
    assert len(calls(auth_sim, TOKEN)) == 1


async def test_token_is_refreshed_ahead_of_expiry(
    tokens: TokenSession, auth_sim: SimServer, clock: FakeClock
) -> None:
    first = await tokens.token()
    clock.advance(81)  # 19 s of 100 left: inside the margin, still valid on the server
    assert await tokens.token() != first
    refresh = calls(auth_sim, TOKEN)[1].form
    # Keycloak's client, as sent: the server passes the refresh form through unchanged.
    assert (refresh["grant_type"], refresh["client_id"]) == ("refresh_token", "nbia")
    assert set(refresh) == {"grant_type", "refresh_token", "client_id"}
    assert tokens.grants == {"password": 1, "refresh_token": 1}
    assert auth_sim.counters.grants["refresh_token"] == 1  # the right refresh token


async def test_dead_refresh_token_falls_back_to_password_grant(
    tokens: TokenSession, auth_sim: SimServer, clock: FakeClock
) -> None:
    auth_sim.faults.refresh_ttl = 150
    first = await tokens.token()
    clock.advance(200)
    assert await tokens.token() != first
    assert grant_types(auth_sim) == ["password", "password"]


async def test_refused_refresh_falls_back_to_password_grant(
    tokens: TokenSession, auth_sim: SimServer, clock: FakeClock
) -> None:
    refused = SimReply(status=400, body='{"error":"invalid_grant"}')
    auth_sim.faults.script_endpoint(TOKEN, [None, refused])
    await tokens.token()
    clock.advance(90)
    assert await tokens.token()
    assert grant_types(auth_sim) == ["password", "refresh_token", "password"]


async def test_concurrent_requests_near_expiry_make_one_refresh(
    tokens: TokenSession, auth_sim: SimServer, clock: FakeClock
) -> None:
    await tokens.token()
    clock.advance(90)
    auth_sim.faults.latency = 0.05  # the refresh is slow: every caller arrives meanwhile
    results = await asyncio.gather(*(tokens.token() for _ in range(32)))
    assert len(set(results)) == 1
    assert grant_types(auth_sim) == ["password", "refresh_token"]


async def test_rejected_token_is_renewed(tokens: TokenSession) -> None:
    first = await tokens.token()
    await tokens.rejected(first)
    assert await tokens.token() != first


async def test_rejection_of_an_already_replaced_token_makes_no_grant(
    tokens: TokenSession, auth_sim: SimServer
) -> None:
    first = await tokens.token()
    await tokens.rejected(first)
    await tokens.rejected(first)  # a second request that saw the same 401
    assert len(calls(auth_sim, TOKEN)) == 2


async def test_bad_credentials_raise_auth_error_without_the_password(
    auth_sim: SimServer, clock: FakeClock
) -> None:
    async with aiohttp.ClientSession() as http:
        wrong = session(auth_sim, http, clock, password="wrong-pw")
        with pytest.raises(AuthError) as info:
            await wrong.token()
    message = str(info.value)
    assert "alice" in message and "main" in message
    assert "wrong-pw" not in message


async def test_token_endpoint_5xx_is_retryable(tokens: TokenSession, auth_sim: SimServer) -> None:
    auth_sim.faults.script_endpoint(TOKEN, [SimReply(status=503, body="busy")])
    with pytest.raises(RetryableError, match="503"):
        await tokens.token()


async def test_grant_that_is_not_json_is_retryable(
    tokens: TokenSession, auth_sim: SimServer
) -> None:
    page = SimReply(body="<html>maintenance</html>", content_type="text/html")
    auth_sim.faults.script_endpoint(TOKEN, [page])
    with pytest.raises(RetryableError, match="not JSON"):
        await tokens.token()


async def test_close_logs_out_with_the_bearer(tokens: TokenSession, auth_sim: SimServer) -> None:
    token = await tokens.token()
    await tokens.close()
    (call,) = calls(auth_sim, "logout")
    assert call.method == "POST"
    assert call.headers["Authorization"] == f"Bearer {token}"
    assert auth_sim.counters.logouts == 1


async def test_close_without_a_token_sends_nothing(
    tokens: TokenSession, auth_sim: SimServer
) -> None:
    await tokens.close()
    assert auth_sim.recorded == []


async def test_repr_shows_no_secret(tokens: TokenSession) -> None:
    access = await tokens.token()
    grant = tokens._grant
    assert grant is not None and grant.refresh is not None
    shown = repr(tokens) + repr(grant)
    assert access not in shown and grant.refresh.get_secret_value() not in shown
    assert PASSWORD not in shown
