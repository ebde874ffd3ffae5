"""How the client maps HTTP answers to errors, with aioresponses (no socket at all).

The simulator covers real wire behaviour; these are the small units of classification.
"""

from __future__ import annotations

import ssl
import types
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import ClientResponse
from aioresponses import aioresponses

from nbia_sync.api.client import NbiaClient
from nbia_sync.api.retry import RetryPolicy
from nbia_sync.clock import FakeClock
from nbia_sync.config import SourceSettings, TransferSettings
from nbia_sync.errors import PermanentError, RetryableError, UntrustedServerError

pytestmark = pytest.mark.asyncio

ROOT = "http://archive.test/nbia-api/"
API = ROOT + "services/v4/"


class _Response(ClientResponse):
    """aioresponses 0.7.9 predates aiohttp 3.14's required ``stream_writer`` argument
    (pnuckowski/aioresponses#289); supply a finished writer so responses can be built."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("stream_writer", types.SimpleNamespace(output_size=0))
        super().__init__(*args, **kwargs)


@pytest_asyncio.fixture
async def client() -> AsyncIterator[NbiaClient]:
    policy = RetryPolicy(base_delay=0.0, max_delay=0.0, attempts=1, clock=FakeClock())
    source = SourceSettings(name="t", url=ROOT, api="v4")
    async with NbiaClient(source, TransferSettings(), policy=policy) as c:
        yield c


async def test_server_error_is_retryable(client: NbiaClient) -> None:
    with aioresponses() as m:
        m.get(API + "getCollectionValues", status=503, body="down", response_class=_Response)
        with pytest.raises(RetryableError):
            await client.collections()


async def test_429_carries_retry_after(client: NbiaClient) -> None:
    with aioresponses() as m:
        m.get(
            API + "getCollectionValues",
            status=429,
            headers={"Retry-After": "7"},
            response_class=_Response,
        )
        with pytest.raises(RetryableError) as caught:
            await client.collections()
    assert caught.value.retry_after == 7


async def test_400_no_access_is_permanent(client: NbiaClient) -> None:
    with aioresponses() as m:
        m.get(
            API + "getCollectionValues",
            status=400,
            body="Invalid query parameter",
            response_class=_Response,
        )
        with pytest.raises(PermanentError):
            await client.collections()


async def test_empty_body_is_an_empty_result(client: NbiaClient) -> None:
    with aioresponses() as m:
        m.get(API + "getCollectionValues", status=200, body="", response_class=_Response)
        assert await client.collections() == []


async def test_malformed_json_is_retryable(client: NbiaClient) -> None:
    with aioresponses() as m:
        m.get(
            API + "getCollectionValues",
            status=200,
            body='[{"Collection": ',
            response_class=_Response,
        )
        with pytest.raises(RetryableError):
            await client.collections()


async def test_html_where_a_zip_was_expected_is_retryable(client: NbiaClient) -> None:
    with aioresponses() as m:
        m.get(
            API + "getImage?SeriesInstanceUID=1.2.3&IncludeMD5=Yes",
            status=200,
            body="<html>Internal error</html>",
            content_type="text/html",
            response_class=_Response,
        )
        with pytest.raises(RetryableError, match=r"(?i)zip|html"):
            async with client.stream_series("1.2.3") as chunks:
                async for _ in chunks:
                    pass


@pytest.mark.parametrize(
    "raised",
    [
        aiohttp.ClientConnectionError("refused"),
        aiohttp.ServerDisconnectedError(),
        aiohttp.ClientPayloadError("body cut short"),
        TimeoutError(),
    ],
    ids=["connection", "disconnected", "payload", "timeout"],
)
async def test_no_aiohttp_exception_leaves_a_query(client: NbiaClient, raised: Exception) -> None:
    with aioresponses() as m:
        m.get(API + "getCollectionValues", exception=raised)
        with pytest.raises(RetryableError) as caught:
            await client.collections()
    assert not isinstance(caught.value, aiohttp.ClientError)


async def test_no_aiohttp_exception_leaves_a_download_opening(client: NbiaClient) -> None:
    with aioresponses() as m:
        m.get(
            API + "getImage?SeriesInstanceUID=1.2.3&IncludeMD5=Yes",
            exception=aiohttp.ClientOSError(104, "Connection reset by peer"),
        )
        with pytest.raises(RetryableError, match="ClientOSError"):
            async with client.stream_series("1.2.3"):
                pass


def _refused_certificate() -> aiohttp.ClientError:
    refused = ssl.SSLCertVerificationError(1, "certificate verify failed")
    refused.verify_message = "self-signed certificate"
    wrapped = aiohttp.ClientConnectionError("cannot connect: ssl")
    wrapped.__cause__ = refused  # as aiohttp raises it: `... from` ssl's error
    return wrapped


async def test_a_certificate_not_accepted_is_not_worth_a_retry(client: NbiaClient) -> None:
    with aioresponses() as m:
        m.get(API + "getCollectionValues", exception=_refused_certificate())
        with pytest.raises(UntrustedServerError, match=r"not accepted \(self-signed"):
            await client.collections()


async def test_a_tls_handshake_cut_short_is_retryable(client: NbiaClient) -> None:
    with aioresponses() as m:
        m.get(API + "getCollectionValues", exception=ssl.SSLError(1, "unexpected eof"))
        with pytest.raises(RetryableError):
            await client.collections()


async def test_the_retry_policy_gives_up_at_once_on_a_refused_certificate() -> None:
    calls = 0

    async def connect() -> None:
        nonlocal calls
        calls += 1
        raise _refused_certificate()

    policy = RetryPolicy(base_delay=0.0, max_delay=0.0, attempts=5, clock=FakeClock())
    with pytest.raises(UntrustedServerError):
        await policy.call(connect, what="getSeries")
    assert calls == 1
