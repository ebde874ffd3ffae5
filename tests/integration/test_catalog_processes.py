"""Several processes on one SQLite catalog: migrations and claims stay exclusive."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest
from catalog_fixtures import make_series, make_source

from nbia_sync.catalog import Catalog, SeriesState

pytestmark = pytest.mark.asyncio

REPO = Path(__file__).resolve().parents[2]

# Each child opens the catalog (racing the others through the migration lock), says
# "ready", waits for "go" on stdin so all start claiming together, then claims and
# completes series until none are left, printing what it claimed.
_CHILD = """
import asyncio, json, sys
from nbia_sync.catalog import Catalog, InstanceRecord

async def main(url, owner):
    catalog = await Catalog.open(url)
    print("ready", flush=True)
    sys.stdin.readline()
    got = []
    try:
        while claims := await catalog.queue.claim(owner, limit=2, lease_seconds=60):
            # Stands in for the download between a claim and its placement: a real worker
            # never claims back to back, and SQLite's busy handler (which backs off) gives
            # no turn to a waiting process while another re-takes the lock in a tight loop.
            await asyncio.sleep(0.005)
            for c in claims:
                async with catalog.queue.placing(c, owner) as guard:
                    guard.done([InstanceRecord("1", "0" * 32, 1, "p")], "p", 1)
                got.append(c.series_uid)
    finally:
        await catalog.close()
    print(json.dumps(got))

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


class _Child:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, url: str, owner: str, cwd: Path) -> _Child:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _CHILD,
            url,
            owner,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=cwd,
        )
        assert proc.stdout is not None
        # Skip log lines until the child is ready (EOF means it died).
        while (line := await proc.stdout.readline()).strip() != b"ready":
            if not line:
                _, err = await proc.communicate()
                raise AssertionError(err.decode()[-2000:])
        return cls(proc)

    async def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")
        await self.proc.stdin.drain()

    async def finish(self) -> list[str]:
        out, err = await self.proc.communicate()
        assert self.proc.returncode == 0, err.decode()[-2000:]
        return list(json.loads(out.decode().strip().splitlines()[-1]))


async def _run_children(url: str, n: int) -> list[list[str]]:
    children = await asyncio.gather(*(_Child.start(url, f"p{i}", REPO) for i in range(n)))
    # Every child is told to start before any result is awaited, so they start together.
    for c in children:
        await c.go()
    return list(await asyncio.gather(*(c.finish() for c in children)))


async def test_two_processes_never_claim_the_same_series(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/catalog.sqlite"
    catalog = await Catalog.open(url)
    sid = await catalog.sources.ensure_source(make_source())
    await catalog.sources.upsert_series(sid, [make_series(f"s{i:03d}") for i in range(200)])
    try:
        results = await _run_children(url, 2)
        claimed = [uid for got in results for uid in got]
        assert len(claimed) == 200 and len(set(claimed)) == 200
        assert all(results), "both processes should have claimed work"
        assert (await catalog.state_counts())[SeriesState.DONE][0] == 200
    finally:
        await catalog.close()


async def test_processes_opening_a_new_catalog_at_once_all_succeed(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/fresh/catalog.sqlite"
    assert await _run_children(url, 3) == [[], [], []]
