"""The simulator's test knobs: scripted replies per endpoint, the request record, holds."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from nbia_sync.sim import SimReply, SimServer

pytestmark = pytest.mark.asyncio


async def test_scripted_replies_come_in_order_then_the_simulator_answers(sim: SimServer) -> None:
    sim.faults.script_endpoint(
        "getCollectionValues",
        [SimReply(status=503, body="busy", content_type="text/plain"), None, SimReply(body="[]")],
    )
    url = sim.url + "services/v4/getCollectionValues"
    async with aiohttp.ClientSession() as http:
        answers = []
        for _ in range(4):
            async with http.get(url) as resp:
                answers.append((resp.status, await resp.text()))
    assert answers[0] == (503, "busy")
    assert answers[1] == answers[3] and "SIM-CT" in answers[1][1]
    assert answers[2] == (200, "[]")


async def test_recorded_requests_keep_query_headers_and_form(sim: SimServer) -> None:
    sim.recorded = []
    async with aiohttp.ClientSession() as http:
        async with http.get(
            sim.url + "services/v4/getSeries", params={"Collection": "SIM-CT"}, headers={"X-A": "1"}
        ):
            pass
        async with http.post(sim.url + "oauth/token", data={"grant_type": "password"}):
            pass
    series, token = sim.recorded
    assert (series.method, series.endpoint, series.query) == (
        "GET",
        "getSeries",
        {"Collection": "SIM-CT"},
    )
    assert series.headers["X-A"] == "1"
    assert (token.endpoint, token.form) == ("oauth/token", {"grant_type": "password"})


async def test_hold_keeps_a_download_in_flight_until_released(sim: SimServer) -> None:
    uid = next(iter(sim.archive.series))
    sim.faults.hold = asyncio.Event()
    url = sim.url + "services/v4/getImage"
    async with (
        aiohttp.ClientSession() as http,
        http.get(url, params={"SeriesInstanceUID": uid}) as r,
    ):
        head = await r.content.readany()
        assert head.startswith(b"PK") and sim.counters.downloads_completed[uid] == 0
        sim.faults.hold.set()
        await r.read()
    assert sim.counters.downloads_completed[uid] == 1
