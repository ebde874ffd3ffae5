"""Issue 12, the network side: waits that never end, bodies read whole, secrets echoed.

Each reproduction runs against the simulator (with the fault knob it needed), and each
guarantee again against a small hostile aiohttp server written here, so the client is
not only tested against the simulator's own idea of a hostile server.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cli_fixtures import REPO, free_port, mirror_files, run_subprocess, write_config
from served_apps import serving

from nbia_sync.api.client import NbiaClient
from nbia_sync.api.retry import RetryPolicy
from nbia_sync.clock import FakeClock
from nbia_sync.config import SourceSettings, TransferSettings
from nbia_sync.errors import AuthError, PermanentError, RetryableError
from nbia_sync.log import REDACTED
from nbia_sync.sim import SimArchive, SimFaults, SimServer
from nbia_sync.sim.testing import running_sim

pytestmark = pytest.mark.asyncio

# A hang guard, not a timing assertion: a broken bound would otherwise hang the suite.
GUARD = 60.0
MAX_DELAY = 5.0
ROOT = "/nbia-api/"


def client_for(
    url: str,
    api: str = "v4",
    *,
    attempts: int = 1,
    sleeps: FakeClock | None = None,
    **transfer: Any,
) -> NbiaClient:
    settings = TransferSettings(
        **{"read_timeout": 30.0, "chunk_size": 16384, "retry_max_delay": MAX_DELAY, **transfer}
    )
    policy = RetryPolicy(0.0, settings.retry_max_delay, attempts, clock=sleeps or FakeClock())
    return NbiaClient(SourceSettings(name="h", url=url, api=api), settings, policy=policy)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def hostile(routes: dict[str, Handler], method: str = "GET") -> AsyncIterator[str]:
    """A server answering `routes` (paths under /nbia-api/); yields its API root URL."""
    app = web.Application()
    for path, handler in routes.items():
        app.router.add_route(method if path != "oauth/token" else "POST", ROOT + path, handler)
    async with serving(app, access_log=None, shutdown_timeout=0.5) as url:
        yield url


async def guarded(awaitable: Awaitable[Any]) -> Any:
    return await asyncio.wait_for(awaitable, GUARD)


def live_tokens(sim: SimServer) -> list[str]:
    return list(sim._tokens._access)


async def drain(chunks: AsyncIterator[bytes]) -> tuple[int, int, str]:
    """(bytes, largest chunk, sha256) without holding the stream."""
    size, largest, digest = 0, 0, hashlib.sha256()
    async for chunk in chunks:
        size += len(chunk)
        largest = max(largest, len(chunk))
        digest.update(chunk)
    return size, largest, digest.hexdigest()


def first_series(sim: SimServer) -> str:
    return next(iter(sim.archive.series))


# ---- waits that never end: Retry-After ----------------------------------------------

HUGE_RETRY_AFTERS = ["999999999", "Fri, 01 Jan 2100 00:00:00 GMT", "inf", "1e12", "9" * 400]
ODD_RETRY_AFTERS = ["nan", "-5", "soon", "Mon, 01 Jan 0001 00:00:00 GMT", "1 minute"]


@pytest.mark.parametrize("header", HUGE_RETRY_AFTERS)
async def test_sim_huge_retry_after_waits_retry_max_delay(header: str) -> None:
    async with running_sim(faults=SimFaults(rate_429=1.0, retry_after_header=header)) as sim:
        sleeps = FakeClock()  # records the backoff delays without waiting them
        async with client_for(sim.url, attempts=2, sleeps=sleeps) as client:
            with pytest.raises(RetryableError, match="HTTP 429"):
                await guarded(client.collections())
    assert sleeps.sleeps == [MAX_DELAY]


@pytest.mark.parametrize("header", ODD_RETRY_AFTERS)
async def test_sim_meaningless_retry_after_is_our_own_backoff(header: str) -> None:
    async with running_sim(faults=SimFaults(rate_429=1.0, retry_after_header=header)) as sim:
        sleeps = FakeClock()  # records the backoff delays without waiting them
        async with client_for(sim.url, attempts=2, sleeps=sleeps) as client:
            with pytest.raises(RetryableError):
                await guarded(client.collections())
    assert sleeps.sleeps == [0.0]  # base delay 0, nothing from the server


async def test_hostile_503_on_a_download_with_absurd_retry_after_is_clamped() -> None:
    answers = iter(["1" + "0" * 30, "Fri, 31 Dec 9999 23:59:59 GMT", "Infinity"])

    async def unavailable(_request: web.Request) -> web.Response:
        return web.Response(status=503, headers={"Retry-After": next(answers)})

    sleeps = FakeClock()  # records the backoff delays without waiting them
    async with (
        hostile({"services/v4/getImage": unavailable}) as url,
        client_for(url, attempts=3, sleeps=sleeps) as client,
    ):
        with pytest.raises(RetryableError, match="HTTP 503"):
            async with client.stream_series("1.2.3") as chunks:
                await guarded(drain(chunks))
    assert sleeps.sleeps == [MAX_DELAY, MAX_DELAY]


@pytest.mark.parametrize("header", ["1e12", "inf"])
async def test_sync_survives_absurd_retry_after_on_a_download_with_json_logs(
    sim_archive: SimArchive, tmp_path: Path, header: str
) -> None:
    """Was: OverflowError in the queue's next_try_at, exit 70 on every run; and
    `"delay": Infinity` in the JSON log."""
    async with running_sim(sim_archive, SimFaults(retry_after_header=header)) as sim:
        victim = first_series(sim)
        sim.faults.script_series(victim, ["429"])
        config = write_config(
            tmp_path / "c.toml",
            tmp_path / "m",
            sim.url,
            sections={"logging": {"level": "debug", "format": "json"}},
        )
        done = await run_subprocess("-c", str(config), "sync")
    assert done.code == 0, done.stderr
    assert victim in {p.parent.name for p in mirror_files(tmp_path / "m")}

    def not_json(name: str) -> float:
        raise AssertionError(f"log line with {name}")

    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines and all(json.loads(line, parse_constant=not_json) for line in lines)


# ---- waits that never end: trickles ----------------------------------------------------

FLOOR = {"low_speed_limit": 4096, "low_speed_time": 0.5}


async def test_sim_trickled_query_is_cut_by_the_progress_floor() -> None:
    async with (
        running_sim(faults=SimFaults(trickle=200)) as sim,
        client_for(sim.url, **FLOOR) as client,
    ):
        with pytest.raises(RetryableError, match="too slow"):
            await guarded(client.series())


async def test_sim_trickled_download_is_cut_by_the_progress_floor() -> None:
    async with (
        running_sim(faults=SimFaults(trickle=200)) as sim,
        client_for(sim.url, **FLOOR) as client,
    ):
        with pytest.raises(RetryableError, match="too slow"):
            async with client.stream_series(first_series(sim)) as chunks:
                await guarded(drain(chunks))


async def test_sim_trickled_token_request_is_cut_by_the_progress_floor() -> None:
    async with (
        running_sim(faults=SimFaults(trickle=20)) as sim,
        client_for(sim.url, api="v2", **FLOOR) as client,
    ):
        with pytest.raises(RetryableError, match=r"token password grant.*too slow"):
            await guarded(client.collections())


async def dribble(request: web.Request, *, every: float, size: int = 1) -> web.StreamResponse:
    """Headers at once, then `size` bytes every `every` seconds, forever."""
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    await response.prepare(request)
    await response.write(b"[")
    while True:
        await asyncio.sleep(every)
        await response.write(b" " * size)


async def test_hostile_one_byte_per_tick_query_is_cut() -> None:
    async def slow(request: web.Request) -> web.StreamResponse:
        return await dribble(request, every=0.05)

    async with (
        hostile({"services/v4/getSeries": slow}) as url,
        client_for(url, **FLOOR) as client,
    ):
        with pytest.raises(RetryableError, match="too slow"):
            await guarded(client.series())


async def test_hostile_endless_but_fast_query_hits_the_query_deadline() -> None:
    async def endless(request: web.Request) -> web.StreamResponse:
        return await dribble(request, every=0.01, size=4096)  # ~400 KB/s, never ends

    async with (
        hostile({"services/v4/getSeries": endless}) as url,
        client_for(url, query_timeout=1.0, low_speed_limit=1024) as client,
    ):
        with pytest.raises(RetryableError, match="query_timeout"):
            await guarded(client.series())


async def test_hostile_trickled_download_is_cut() -> None:
    async def slow_zip(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/zip"})
        await response.prepare(request)
        await response.write(b"PK\x03\x04")
        while True:
            await asyncio.sleep(0.05)
            await response.write(b"\0")

    async with (
        hostile({"services/v4/getImage": slow_zip}) as url,
        client_for(url, **FLOOR) as client,
    ):
        with pytest.raises(RetryableError, match="too slow"):
            async with client.stream_series("1.2.3") as chunks:
                await guarded(drain(chunks))


async def test_hostile_trickled_token_answer_is_cut() -> None:
    async def slow_token(request: web.Request) -> web.StreamResponse:
        return await dribble(request, every=0.05)

    async with (
        hostile({"oauth/token": slow_token}) as url,
        client_for(url, api="v2", **FLOOR) as client,
    ):
        with pytest.raises(RetryableError, match=r"token password grant.*too slow"):
            await guarded(client.collections())


async def test_hostile_silent_token_endpoint_hits_the_token_deadline() -> None:
    async def mute(_request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async with (
        hostile({"oauth/token": mute}) as url,
        client_for(url, api="v2", token_timeout=0.5) as client,
    ):
        with pytest.raises(RetryableError, match="token_timeout"):
            await guarded(client.collections())


# ---- bodies: bombs and big listings ----------------------------------------------------


async def test_sim_gzip_bomb_query_is_refused_naming_the_limit() -> None:
    async with (
        running_sim(faults=SimFaults(gzip_bomb=64 << 20)) as sim,
        client_for(sim.url, max_query_bytes=1 << 20) as client,
    ):
        with pytest.raises(PermanentError, match="max_query_bytes = 1048576 bytes"):
            await guarded(client.series())


async def test_sim_1mb_gzip_that_inflates_to_1gb_is_refused_in_bounded_memory() -> None:
    """The issue's reproduction, at the default limit: was 2.1 GB of RSS."""
    async with (
        running_sim(faults=SimFaults(gzip_bomb=1 << 30)) as sim,
        client_for(sim.url) as client,
    ):
        tracemalloc.start()
        try:
            with pytest.raises(PermanentError, match="max_query_bytes"):
                await guarded(client.series())
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak < 16 << 20


async def test_sim_gzip_answer_under_the_limit_parses_in_bounded_memory() -> None:
    async with running_sim(faults=SimFaults()) as sim:
        async with client_for(sim.url) as client:
            plain = await client.series()
        sim.faults.gzip_bomb = 48 << 20
        async with client_for(sim.url, max_query_bytes=64 << 20) as client:
            tracemalloc.start()
            try:
                inflated = await guarded(client.series())
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
    assert inflated == plain
    assert peak < 8 << 20  # 48 MiB of answer, never more than a few chunks held


async def test_downloads_ask_for_no_encoding_and_queries_for_gzip_or_deflate() -> None:
    asked: dict[str, str] = {}

    async def record(request: web.Request) -> web.Response:
        asked[request.path.rsplit("/", 1)[-1]] = request.headers.get("Accept-Encoding", "")
        return web.Response(body=b"", content_type="application/json")

    routes = {"services/v4/getSeries": record, "services/v4/getImage": record}
    async with hostile(routes) as url, client_for(url) as client:
        await guarded(client.series())
        with pytest.raises(RetryableError, match="expected data"):
            async with client.stream_series("1.2.3"):
                pass
    assert asked == {"getSeries": "gzip, deflate", "getImage": "identity"}


def gzip_of_spaces(prefix: bytes, mib: int) -> bytes:
    """Built here with plain zlib, independently of the simulator's helper."""
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [c.compress(prefix)]
    block = b" " * (1 << 20)
    parts += [c.compress(block) for _ in range(mib)]
    parts.append(c.flush())
    return b"".join(parts)


async def test_hostile_gzip_bomb_query_is_refused() -> None:
    bomb = gzip_of_spaces(b"[", 64)

    async def answer(_request: web.Request) -> web.Response:
        return web.Response(
            body=bomb, headers={"Content-Type": "application/json", "Content-Encoding": "gzip"}
        )

    async with (
        hostile({"services/v4/getSeries": answer}) as url,
        client_for(url, max_query_bytes=1 << 20) as client,
    ):
        with pytest.raises(PermanentError, match="after decompression"):
            await guarded(client.series())


async def test_sim_gzip_encoded_download_arrives_whole_in_bounded_chunks() -> None:
    async with running_sim(faults=SimFaults()) as sim:
        uid = first_series(sim)
        async with client_for(sim.url) as client:
            async with client.stream_series(uid) as chunks:
                plain = await guarded(drain(chunks))
            sim.faults.gzip_downloads = True
            async with client.stream_series(uid) as chunks:
                encoded = await guarded(drain(chunks))
        async with (
            aiohttp.ClientSession(auto_decompress=False) as http,
            http.get(sim.url + "services/v4/getImage", params={"SeriesInstanceUID": uid}) as raw,
        ):
            sent = await raw.read()
    assert raw.headers["Content-Encoding"] == "gzip" and len(sent) < plain[0]
    assert encoded[0] == plain[0] and encoded[2] == plain[2]
    assert encoded[1] <= 16384


async def test_hostile_gzip_bomb_download_is_inflated_in_bounded_steps() -> None:
    bomb = gzip_of_spaces(b"PK\x03\x04", 256)

    async def answer(_request: web.Request) -> web.Response:
        return web.Response(
            body=bomb, headers={"Content-Type": "application/zip", "Content-Encoding": "gzip"}
        )

    async with (
        hostile({"services/v4/getImage": answer}) as url,
        client_for(url, chunk_size=1 << 20) as client,
    ):
        tracemalloc.start()
        try:
            async with client.stream_series("1.2.3") as chunks:
                size, largest, _ = await guarded(drain(chunks))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert size == 4 + (256 << 20) and largest <= 1 << 20
    assert peak < 16 << 20  # 256 MiB inflated, a chunk or two at a time


# ---- secrets ---------------------------------------------------------------------------


async def test_sim_echoed_token_never_reaches_last_error_or_status(
    sim_archive: SimArchive, tmp_path: Path
) -> None:
    faults = SimFaults(echo_token_status=500, echo_token_endpoints=("getImageWithMD5Hash",))
    async with running_sim(sim_archive, faults) as sim:
        config = write_config(tmp_path / "c.toml", tmp_path / "m", sim.url)
        synced = await run_subprocess("-c", str(config), "sync")
        status = await run_subprocess("-c", str(config), "status", "--json")
        tokens = live_tokens(sim)
    assert synced.code == 1, synced.stderr
    failures = json.loads(status.stdout)["failures"]
    assert failures and all(
        f"access denied for token {REDACTED}" in json.dumps(f) for f in failures
    )
    shown = synced.stdout + synced.stderr + status.stdout + status.stderr
    assert tokens and not any(t in shown for t in tokens)


async def test_sim_echoed_token_in_a_query_400_is_redacted_in_the_final_error(
    sim_archive: SimArchive, tmp_path: Path
) -> None:
    async with running_sim(sim_archive, SimFaults(echo_token_status=400)) as sim:
        config = write_config(tmp_path / "c.toml", tmp_path / "m", sim.url)
        done = await run_subprocess("-c", str(config), "sync")
        tokens = live_tokens(sim)
    assert done.code != 0 and REDACTED in done.stderr + done.stdout
    assert tokens and not any(t in done.stdout + done.stderr for t in tokens)


async def test_hostile_error_body_echoing_the_token_is_redacted() -> None:
    seen: list[str] = []

    async def grant(_request: web.Request) -> web.Response:
        return web.json_response({"access_token": "tok-" + "q7" * 20, "expires_in": 300})

    async def refuse(request: web.Request) -> web.Response:
        token = request.headers["Authorization"].split()[-1]
        seen.append(token)
        return web.Response(status=400, text=f"no access; your credential {token} is bad")

    async with (
        hostile({"oauth/token": grant, "services/v2/getSeries": refuse}) as url,
        client_for(url, api="v2") as client,
    ):
        with pytest.raises(PermanentError) as caught:
            await guarded(client.series())
    assert seen and seen[0] not in str(caught.value) and REDACTED in str(caught.value)


async def test_sim_oversized_header_echoing_the_token_is_redacted() -> None:
    async with (
        running_sim(faults=SimFaults(echo_token_header=True)) as sim,
        client_for(sim.url, api="v2") as client,
    ):
        with pytest.raises(RetryableError, match="Got more than") as caught:
            await guarded(client.series())
        tokens = live_tokens(sim)
    assert tokens and not any(t[:12] in str(caught.value) for t in tokens)


async def test_hostile_oversized_header_echoing_the_token_is_redacted() -> None:
    """aiohttp's own 'Got more than 8190 bytes when reading' quotes the header line."""

    async def grant(_request: web.Request) -> web.Response:
        return web.json_response({"access_token": "tok-" + "z9" * 20, "expires_in": 300})

    async def echo(request: web.Request) -> web.StreamResponse:
        token = request.headers["Authorization"].split()[-1]
        # aiohttp quotes the first 100 bytes of the line: the token is cut short there.
        head = f"HTTP/1.1 200 OK\r\nX-Echo: {'x' * 70}{token}{'y' * 9000}\r\n\r\n"
        assert request.transport is not None
        request.transport.write(head.encode())
        await asyncio.sleep(1)
        return web.Response()

    async with (
        hostile({"oauth/token": grant, "services/v2/getSeries": echo}) as url,
        client_for(url, api="v2") as client,
    ):
        with pytest.raises(RetryableError) as caught:
            await guarded(client.series())
    message = str(caught.value)
    assert "Got more than" in message and "z9z9z9" not in message, message


async def test_sim_token_redirect_to_another_origin_sends_no_credentials(
    tmp_path: Path,
) -> None:
    stolen: list[str] = []

    async def collector(request: web.Request) -> web.Response:
        stolen.append(await request.text())
        return web.json_response({"access_token": "stolen", "expires_in": 300})

    async with hostile({"oauth/token": collector}) as elsewhere:
        faults = SimFaults(token_redirect=elsewhere + "oauth/token")
        async with (
            running_sim(faults=faults) as sim,
            client_for(sim.url, api="v2") as client,
        ):
            with pytest.raises(AuthError, match=r"redirect to http://127\.0\.0\.1"):
                await guarded(client.collections())
    assert stolen == []


async def test_hostile_token_endpoint_redirect_is_not_followed() -> None:
    stolen: list[str] = []

    async def collector(request: web.Request) -> web.Response:
        stolen.append(await request.text())
        return web.json_response({"access_token": "stolen", "expires_in": 300})

    async with hostile({"oauth/token": collector}) as elsewhere:

        async def moved(_request: web.Request) -> web.Response:
            return web.Response(status=307, headers={"Location": elsewhere + "oauth/token"})

        async with (
            hostile({"oauth/token": moved}) as url,
            client_for(url, api="v2") as client,
        ):
            with pytest.raises(AuthError, match="HTTP 307"):
                await guarded(client.collections())
    assert stolen == []


async def test_sim_token_with_crlf_is_an_auth_error() -> None:
    async with (
        running_sim(faults=SimFaults(token_override="abc\r\nX-Evil: 1")) as sim,
        client_for(sim.url, api="v2") as client,
    ):
        with pytest.raises(AuthError, match="malformed access token"):
            await guarded(client.collections())


async def test_hostile_token_with_a_newline_is_an_auth_error() -> None:
    async def grant(_request: web.Request) -> web.Response:
        return web.json_response({"access_token": "good\nbad", "expires_in": 300})

    async with hostile({"oauth/token": grant}) as url, client_for(url, api="v2") as client:
        with pytest.raises(AuthError, match="malformed access token"):
            await guarded(client.collections())


async def test_sync_with_a_malformed_token_exits_2_with_one_line(
    sim_archive: SimArchive, tmp_path: Path
) -> None:
    async with running_sim(sim_archive, SimFaults(token_override="abc\r\ndef")) as sim:
        config = write_config(tmp_path / "c.toml", tmp_path / "m", sim.url)
        done = await run_subprocess("-c", str(config), "sync")
    assert done.code == 2, done.stderr
    assert "malformed access token" in done.stderr and "Traceback" not in done.stderr


# ---- the daemon's health through an absurd wait ------------------------------------------


async def test_daemon_health_turns_503_instead_of_waiting_out_an_absurd_retry_after(
    sim_archive: SimArchive, tmp_path: Path
) -> None:
    """Was: every query slept 1e12 s while heartbeats kept /healthz at 200."""
    port = free_port()
    faults = SimFaults(rate_429=1.0, retry_after_header="1e12")
    async with running_sim(sim_archive, faults) as sim:
        config = write_config(
            tmp_path / "d.toml",
            tmp_path / "m",
            sim.url,
            sections={
                "schedule": {"poll_interval": 3600},
                "daemon": {"listen_host": "127.0.0.1", "listen_port": port},
            },
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "nbia_sync",
            "-c",
            str(config),
            "daemon",
            cwd=REPO,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            body = await guarded(health_when(port, lambda b: b["last_pass"] is not None))
        finally:
            proc.kill()
            await proc.wait()
    assert body["status"] == "failing" and body["last_pass"]["outcome"] == "error"


async def health_when(port: int, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http:
        while True:
            try:
                async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                    body: dict[str, Any] = await resp.json()
                if predicate(body):
                    return body
            except aiohttp.ClientConnectionError:
                pass  # not listening yet
            await asyncio.sleep(0.1)
