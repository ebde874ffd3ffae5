"""Runs, worker liveness and named lease locks."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from catalog_fixtures import make_series, make_source
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncConnection

from nbia_sync.catalog import Catalog, RunCounts
from nbia_sync.catalog.tables import WORKERS
from nbia_sync.config import forget_workers_after, settings_from_dict, stale_after

pytestmark = pytest.mark.asyncio


async def test_run_is_recorded_from_start_to_finish(catalog: Catalog) -> None:
    assert await catalog.fleet.last_run() is None
    run_id = await catalog.fleet.start_run("host:1", "sync")
    run = await catalog.fleet.last_run()
    assert run is not None and (run.run_id, run.finished_at, run.outcome) == (run_id, None, None)
    await catalog.fleet.finish_run(
        run_id, "ok", RunCounts(discovered=5, queued=3, done=2, bytes=10)
    )
    run = await catalog.fleet.last_run()
    assert run is not None and run.finished_at is not None
    assert (run.outcome, run.discovered, run.queued, run.done, run.bytes) == ("ok", 5, 3, 2, 10)


async def test_workers_report_heartbeat_age_and_series_in_flight(catalog: Catalog) -> None:
    sid = await catalog.sources.ensure_source(make_source())
    await catalog.sources.upsert_series(sid, [make_series(str(i)) for i in range(3)])
    await catalog.fleet.register_worker("h:1", "h", 1, "run")
    await catalog.fleet.register_worker("h:2", "h", 2, "run")
    await catalog.queue.claim("h:1", limit=2, lease_seconds=60)
    assert await catalog.fleet.worker_heartbeat("h:1")
    found = {w.owner: w for w in await catalog.fleet.workers()}
    assert (found["h:1"].in_flight, found["h:2"].in_flight) == (2, 0)
    assert 0 <= found["h:1"].heartbeat_age < 5
    await catalog.fleet.unregister_worker("h:2")
    assert [w.owner for w in await catalog.fleet.workers()] == ["h:1"]
    assert not await catalog.fleet.worker_heartbeat("h:2")


async def _set_heartbeat(catalog: Catalog, owner: str, at: datetime) -> None:
    async def op(conn: AsyncConnection) -> None:
        await conn.execute(update(WORKERS).where(WORKERS.c.owner == owner).values(heartbeat_at=at))

    await catalog.database.run_write(op)


async def test_prune_forgets_only_workers_silent_past_the_horizon(catalog: Catalog) -> None:
    """kill -9 leaves a row behind: long-dead ones go, recently stale ones stay visible."""
    now = datetime.now(UTC)
    ages = {
        "live": 0,
        "stale": 600,
        "just-inside": 23 * 3600,
        "dead": 25 * 3600,
        "ancient": 400 * 86400,
    }
    for n, (owner, age) in enumerate(ages.items()):
        await catalog.fleet.register_worker(owner, "h", n, "run")
        await _set_heartbeat(catalog, owner, now - timedelta(seconds=age))
    assert sorted(await catalog.fleet.prune_workers(older_than=24 * 3600)) == ["ancient", "dead"]
    assert sorted(w.owner for w in await catalog.fleet.workers()) == [
        "just-inside",
        "live",
        "stale",
    ]
    assert await catalog.fleet.prune_workers(older_than=24 * 3600) == []


async def test_prune_horizon_is_a_day_or_seven_stale_periods() -> None:
    base = {"mirror": {"root": "/m"}, "sources": [{"name": "s", "url": "http://nbia"}]}
    quick = settings_from_dict(base, env={})
    assert forget_workers_after(quick) == 24 * 3600 > 7 * stale_after(quick)
    slow = settings_from_dict({**base, "transfer": {"lease_seconds": 6 * 3600}}, env={})
    assert forget_workers_after(slow) == 7 * 6 * 3600


async def test_registering_twice_replaces_the_row(catalog: Catalog) -> None:
    await catalog.fleet.register_worker("h:1", "h", 1, "run1")
    await catalog.fleet.register_worker("h:1", "h", 1, "run2")
    assert [w.run_id for w in await catalog.fleet.workers()] == ["run2"]


async def test_lock_is_exclusive_until_unlocked(catalog: Catalog) -> None:
    assert await catalog.fleet.try_lock("discovery", "a", ttl=60)
    assert await catalog.fleet.try_lock("discovery", "a", ttl=60)  # re-entrant for its owner
    assert not await catalog.fleet.try_lock("discovery", "b", ttl=60)
    await catalog.fleet.unlock("discovery", "b")  # not b's: no effect
    assert not await catalog.fleet.try_lock("discovery", "b", ttl=60)
    await catalog.fleet.unlock("discovery", "a")
    assert await catalog.fleet.try_lock("discovery", "b", ttl=60)


async def test_expired_lock_can_be_taken_over(catalog: Catalog) -> None:
    assert await catalog.fleet.try_lock("discovery", "dead", ttl=0.05)
    await asyncio.sleep(0.1)
    assert await catalog.fleet.try_lock("discovery", "b", ttl=60)
    assert not await catalog.fleet.renew_lock("discovery", "dead", ttl=60)
    assert await catalog.fleet.renew_lock("discovery", "b", ttl=60)


async def test_concurrent_lockers_get_one_winner(catalog: Catalog) -> None:
    won = await asyncio.gather(*(catalog.fleet.try_lock("d", f"o{i}", ttl=60) for i in range(8)))
    assert sum(won) == 1
