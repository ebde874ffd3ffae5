"""TokenSession against a scripted token endpoint on loopback, with a fake monotonic clock."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio
from api_fake import FakeArchive, Reply

from nbia_sync.api.auth import TokenSession
from nbia_sync.config import SourceSettings
from nbia_sync.errors import AuthError, RetryableError

pytestmark = pytest.mark.asyncio

PASSWORD = "s3cret-pw"
TOKEN = "oauth/token"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def grant(n: int, expires_in: float = 100, refresh_expires_in: float = 300) -> Reply:
    body = {
        "access_token": f"access-{n}",
        "token_type": "bearer",
        "expires_in": expires_in,
        "refresh_token": f"refresh-{n}",
        "refresh_expires_in": refresh_expires_in,
    }
    return Reply(body=json.dumps(body))


def grant_types(fake: FakeArchive) -> list[str]:
    return [call.form["grant_type"] for call in fake.calls(TOKEN)]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest_asyncio.fixture
async def tokens(fake_archive: FakeArchive, clock: Clock) -> AsyncIterator[TokenSession]:
    source = SourceSettings(
        name="main", url=fake_archive.url, api="v2", username="alice", password=PASSWORD
    )
    async with aiohttp.ClientSession() as http:
        yield TokenSession(source, http, clock=clock)


async def test_first_token_uses_the_password_grant(
    tokens: TokenSession, fake_archive: FakeArchive
) -> None:
    fake_archive.reply(TOKEN, grant(1))
    assert await tokens.token() == "access-1"
    (call,) = fake_archive.calls(TOKEN)
    assert call.method == "POST"
    assert call.form == {
        "username": "alice",
        "password": PASSWORD,
        "client_id": "NBIA",
        "grant_type": "password",
    }


async def test_guest_logs_in_with_an_empty_password(fake_archive: FakeArchive) -> None:
    fake_archive.reply(TOKEN, grant(1))
    guest = SourceSettings(name="pub", url=fake_archive.url, api="v1")
    async with aiohttp.ClientSession() as http:
        await TokenSession(guest, http).token()
    form = fake_archive.calls(TOKEN)[0].form
    assert (form["username"], form["password"]) == ("nbia_guest", "")


async def test_token_is_reused_while_enough_life_is_left(
    tokens: TokenSession, fake_archive: FakeArchive, clock: Clock
) -> None:
    fake_archive.reply(TOKEN, grant(1), grant(2))
    await tokens.token()
    clock.now += 79  # 21 s of 100 left: above the 20 % margin
    assert await tokens.token() == "access-1"
    assert len(fake_archive.calls(TOKEN)) == 1


async def test_token_is_refreshed_ahead_of_expiry(
    tokens: TokenSession, fake_archive: FakeArchive, clock: Clock
) -> None:
    fake_archive.reply(TOKEN, grant(1), grant(2))
    await tokens.token()
    clock.now += 81  # 19 s of 100 left: inside the margin, still valid on the server
    assert await tokens.token() == "access-2"
    assert fake_archive.calls(TOKEN)[1].form == {
        "grant_type": "refresh_token",
        "refresh_token": "refresh-1",
        "client_id": "nbia",  # Keycloak's client, as sent: the server passes it through
    }
    assert tokens.grants == {"password": 1, "refresh_token": 1}


async def test_dead_refresh_token_falls_back_to_password_grant(
    tokens: TokenSession, fake_archive: FakeArchive, clock: Clock
) -> None:
    fake_archive.reply(TOKEN, grant(1, refresh_expires_in=150), grant(2))
    await tokens.token()
    clock.now += 200
    assert await tokens.token() == "access-2"
    assert grant_types(fake_archive) == ["password", "password"]


async def test_refused_refresh_falls_back_to_password_grant(
    tokens: TokenSession, fake_archive: FakeArchive, clock: Clock
) -> None:
    refused = Reply(status=400, body='{"error":"invalid_grant"}')
    fake_archive.reply(TOKEN, grant(1), refused, grant(3))
    await tokens.token()
    clock.now += 90
    assert await tokens.token() == "access-3"
    assert grant_types(fake_archive) == ["password", "refresh_token", "password"]


async def test_concurrent_requests_near_expiry_make_one_refresh(
    tokens: TokenSession, fake_archive: FakeArchive, clock: Clock
) -> None:
    slow = json.loads(grant(2).body)
    fake_archive.reply(TOKEN, grant(1), Reply(body=json.dumps(slow), delay=0.05))
    await tokens.token()
    clock.now += 90
    results = await asyncio.gather(*(tokens.token() for _ in range(32)))
    assert set(results) == {"access-2"}
    assert grant_types(fake_archive) == ["password", "refresh_token"]


async def test_rejected_token_is_renewed(tokens: TokenSession, fake_archive: FakeArchive) -> None:
    fake_archive.reply(TOKEN, grant(1), grant(2))
    await tokens.rejected(await tokens.token())
    assert await tokens.token() == "access-2"


async def test_rejection_of_an_already_replaced_token_makes_no_grant(
    tokens: TokenSession, fake_archive: FakeArchive
) -> None:
    fake_archive.reply(TOKEN, grant(1), grant(2), grant(3))
    first = await tokens.token()
    await tokens.rejected(first)
    await tokens.rejected(first)  # a second request that saw the same 401
    assert len(fake_archive.calls(TOKEN)) == 2


async def test_bad_credentials_raise_auth_error_without_the_password(
    tokens: TokenSession, fake_archive: FakeArchive
) -> None:
    fake_archive.reply(TOKEN, Reply(status=401, body='{"error":"invalid_grant"}'))
    with pytest.raises(AuthError) as info:
        await tokens.token()
    message = str(info.value)
    assert "alice" in message and "main" in message
    assert PASSWORD not in message


async def test_token_endpoint_5xx_is_retryable(
    tokens: TokenSession, fake_archive: FakeArchive
) -> None:
    fake_archive.reply(TOKEN, Reply(status=503, body="busy"))
    with pytest.raises(RetryableError, match="503"):
        await tokens.token()


async def test_grant_that_is_not_json_is_retryable(
    tokens: TokenSession, fake_archive: FakeArchive
) -> None:
    fake_archive.reply(TOKEN, Reply(body="<html>maintenance</html>", content_type="text/html"))
    with pytest.raises(RetryableError, match="not JSON"):
        await tokens.token()


async def test_close_logs_out_with_the_bearer(
    tokens: TokenSession, fake_archive: FakeArchive
) -> None:
    fake_archive.reply(TOKEN, grant(1))
    fake_archive.reply("logout", Reply(body="You Have Logged Out successfully."))
    await tokens.token()
    await tokens.close()
    (call,) = fake_archive.calls("logout")
    assert call.method == "POST"
    assert call.headers["Authorization"] == "Bearer access-1"


async def test_close_without_a_token_sends_nothing(
    tokens: TokenSession, fake_archive: FakeArchive
) -> None:
    await tokens.close()
    assert fake_archive.requests == []


async def test_repr_shows_no_secret(tokens: TokenSession, fake_archive: FakeArchive) -> None:
    fake_archive.reply(TOKEN, grant(1))
    await tokens.token()
    shown = repr(tokens) + repr(tokens._grant)
    assert "access-1" not in shown and "refresh-1" not in shown and PASSWORD not in shown
