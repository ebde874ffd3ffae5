"""`python -m nbia_sync.sim`: serves a generated archive until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import aiohttp
import pytest

from nbia_sync.sim.cli import _faults, add_arguments

pytestmark = pytest.mark.asyncio


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


async def test_fault_flags_reach_the_fault_knobs() -> None:
    faults = _faults(_parse("--reset", "0.25", "--bandwidth", "1000", "--token-ttl", "60"))
    assert (faults.reset, faults.bandwidth, faults.token_ttl) == (0.25, 1000, 60.0)


async def test_auth_flavour_is_keycloak_unless_spring_is_asked() -> None:
    assert (_parse().auth, _parse("--auth", "spring").auth) == ("keycloak", "spring")


async def test_every_simulate_option_is_explained_in_help() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    unexplained = [
        action.option_strings[0]
        for action in parser._actions
        if action.option_strings and not action.help
    ]
    assert unexplained == []


async def test_module_serves_until_sigterm() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "nbia_sync.sim",
        "--collections",
        "ONE,TWO",
        "--patients",
        "1",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        url = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode().strip()
        # stdout carries the URL alone (logs go to stderr)
        assert url.startswith("http://127.0.0.1:") and url.endswith("/nbia-api/")
        async with (
            aiohttp.ClientSession() as http,
            http.get(url + "services/v4/getCollectionValues") as r,
        ):
            assert await r.json() == [{"Collection": "ONE"}, {"Collection": "TWO"}]
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
