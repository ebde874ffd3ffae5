"""A process's membership of the fleet: joining, liveness, the discovery lock, leaving."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest
from catalog_fixtures import make_series, make_source

from nbia_sync.catalog import Catalog, SeriesState
from nbia_sync.catalog.membership import discovery_lock
from nbia_sync.clock import FakeClock
from nbia_sync.config import Settings, settings_from_dict

pytestmark = pytest.mark.asyncio

HOST, PID = socket.gethostname(), os.getpid()
ME = f"{HOST}:{PID}:me"


@pytest.fixture
def clock() -> FakeClock:
    # Time moves only when a test advances it: the heartbeat beats when told to.
    return FakeClock(autojump=False)


def settings(root: Path) -> Settings:
    # stale_after = max(lease, 3 * heartbeat) = 30 s
    return settings_from_dict(
        {
            "mirror": {"root": str(root)},
            "transfer": {"lease_seconds": 30, "heartbeat_interval": 5},
            "sources": [{"name": "main", "url": "http://127.0.0.1:1/nbia-api/"}],
        },
        env={},
    )


async def owners(catalog: Catalog) -> list[str]:
    return [w.owner for w in await catalog.fleet.workers()]


async def test_joining_registers_the_worker_and_leaving_unregisters_it(
    catalog: Catalog, tmp_path: Path
) -> None:
    async with catalog.fleet.join(
        settings(tmp_path), owner=ME, host=HOST, pid=PID, run_id="me"
    ) as me:
        assert await owners(catalog) == [ME]
        assert await me.live_owners() == {ME}
    assert await owners(catalog) == []
    assert me.leave_error is None


async def test_leaving_a_cancelled_block_gives_back_leases_and_locks(
    catalog: Catalog, tmp_path: Path
) -> None:
    source = make_source()
    sid = await catalog.sources.ensure_source(source)
    await catalog.sources.upsert_series(sid, [make_series("1")])
    with anyio.CancelScope() as scope:
        async with catalog.fleet.join(
            settings(tmp_path), owner=ME, host=HOST, pid=PID, run_id="me"
        ) as me:
            assert await catalog.queue.claim(ME, limit=1, lease_seconds=60)
            async with me.discovering(source, sid, forced=False, stop=anyio.Event()) as ours:
                assert ours
                scope.cancel()
                await anyio.lowlevel.checkpoint()  # the cancellation is delivered here
    assert scope.cancelled_caught
    assert await catalog.fleet.lock_holder(discovery_lock(source)) is None
    assert (await catalog.state_counts())[SeriesState.WANTED][0] == 1
    assert await owners(catalog) == []


async def test_a_worker_silent_past_stale_after_is_not_live(
    catalog: Catalog, clock: FakeClock, tmp_path: Path
) -> None:
    await catalog.fleet.register_worker("peer:1:x", "elsewhere", 1, "x")
    async with catalog.fleet.join(
        settings(tmp_path), owner=ME, host=HOST, pid=PID, run_id="me"
    ) as me:
        assert await me.is_live("peer:1:x")
        clock.advance(29)
        assert await me.is_live("peer:1:x")
        clock.advance(1)
        assert not await me.is_live("peer:1:x")
        assert await me.live_owners() == {ME}
        assert me.stale_after == me.lock_ttl == 30


async def test_the_heartbeat_keeps_a_held_discovery_lock_past_its_ttl(
    catalog: Catalog, clock: FakeClock, tmp_path: Path
) -> None:
    source = make_source()
    sid = await catalog.sources.ensure_source(source)
    async with catalog.fleet.join(
        settings(tmp_path), owner=ME, host=HOST, pid=PID, run_id="me"
    ) as me:
        async with me.discovering(source, sid, forced=False, stop=anyio.Event()) as ours:
            assert ours
            for _ in range(12):  # 60 s: twice the lock's 30 s lease
                await clock.until_sleeping(1)
                clock.advance(5)
            await clock.until_sleeping(1)  # the last beat is done
            assert await catalog.fleet.lock_holder(discovery_lock(source)) == ME
            assert await me.is_live(ME)
        assert await catalog.fleet.lock_holder(discovery_lock(source)) is None


async def test_a_peer_holding_the_lock_alive_is_waited_for_until_it_unlocks(
    catalog: Catalog, clock: FakeClock, tmp_path: Path
) -> None:
    source = make_source()
    sid = await catalog.sources.ensure_source(source)
    peer = "peer:1:x"
    await catalog.fleet.register_worker(peer, "elsewhere", 1, "x")
    assert await catalog.fleet.try_lock(discovery_lock(source), peer, 30)
    turns: list[bool] = []
    async with catalog.fleet.join(
        settings(tmp_path), owner=ME, host=HOST, pid=PID, run_id="me"
    ) as me:

        async def take_turn() -> None:
            async with me.discovering(source, sid, forced=True, stop=anyio.Event()) as ours:
                turns.append(ours)

        async with anyio.create_task_group() as tg:
            tg.start_soon(take_turn)
            await clock.until_sleeping(2)  # our heartbeat and the waiting discovery
            assert turns == []
            await catalog.fleet.unlock(discovery_lock(source), peer)
            clock.advance(0.25)
    assert turns == [True]
