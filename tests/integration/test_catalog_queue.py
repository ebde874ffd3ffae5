"""The work queue: claims, leases, placement, failure and release.

The catalog runs on a FakeClock: a lease or a backoff runs out when the test advances
the clock, never by sleeping, and expiry times are exact."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from catalog_fixtures import make_series, make_source

from nbia_sync.catalog import Catalog, Claim, InstanceRecord, LeaseLostError, SeriesState
from nbia_sync.clock import FakeClock

pytestmark = pytest.mark.asyncio


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


async def _queue(catalog: Catalog, n: int, source: str = "main") -> int:
    sid = await catalog.sources.ensure_source(make_source(source))
    await catalog.sources.upsert_series(sid, [make_series(f"{source}-{i:04d}") for i in range(n)])
    return sid


async def _claim_one(catalog: Catalog, owner: str = "w", lease: float = 60) -> Claim:
    [claim] = await catalog.queue.claim(owner, limit=1, lease_seconds=lease)
    return claim


async def test_claim_leases_series_with_their_details(catalog: Catalog) -> None:
    sid = await _queue(catalog, 3)
    claims = await catalog.queue.claim("w", limit=2, lease_seconds=60)
    assert len(claims) == 2
    first = claims[0]
    assert (first.source_id, first.source_name, first.collection) == (sid, "main", "COLL")
    assert (first.generation, first.attempts, first.image_count) == (1, 0, 10)
    counts = await catalog.state_counts()
    assert counts[SeriesState.DOWNLOADING][0] == 2 and counts[SeriesState.WANTED][0] == 1


async def test_concurrent_claimers_never_share_a_series(catalog: Catalog) -> None:
    await _queue(catalog, 150)

    async def claimer(owner: str) -> list[str]:
        got: list[str] = []
        while claims := await catalog.queue.claim(owner, limit=3, lease_seconds=60):
            got.extend(c.series_uid for c in claims)
        return got

    results = await asyncio.gather(*(claimer(f"w{i}") for i in range(8)))
    claimed = [uid for got in results for uid in got]
    assert len(claimed) == 150 and len(set(claimed)) == 150


async def test_claim_is_limited_to_the_given_sources(catalog: Catalog) -> None:
    await _queue(catalog, 2, "a")
    b = await _queue(catalog, 2, "b")
    claims = await catalog.queue.claim("w", limit=10, lease_seconds=60, source_ids=[b])
    assert {c.source_name for c in claims} == {"b"} and len(claims) == 2


async def test_expired_lease_is_reclaimed_and_counts_an_attempt(
    catalog: Catalog, clock: FakeClock
) -> None:
    await _queue(catalog, 1)
    lost = await _claim_one(catalog, "dead", lease=0.05)
    clock.advance(0.1)
    taken = await _claim_one(catalog, "other")
    assert (taken.series_id, taken.attempts) == (lost.series_id, 1)


async def test_leased_series_is_not_claimable(catalog: Catalog) -> None:
    await _queue(catalog, 1)
    await _claim_one(catalog, "w", lease=60)
    assert await catalog.queue.claim("other", limit=1, lease_seconds=60) == []


async def test_heartbeat_extends_the_lease(catalog: Catalog, clock: FakeClock) -> None:
    await _queue(catalog, 1)
    claim = await _claim_one(catalog, "w", lease=60)
    clock.advance(30)
    assert await catalog.queue.heartbeat("w", [claim.series_id], 3600) == {claim.series_id}
    assert await catalog.queue.next_ready_at() == clock.now() + timedelta(seconds=3600)


async def test_heartbeat_of_a_lease_held_by_another_owner_extends_nothing(
    catalog: Catalog, clock: FakeClock
) -> None:
    await _queue(catalog, 1)
    claim = await _claim_one(catalog, "w", lease=60)
    start = clock.now()
    clock.advance(30)
    assert await catalog.queue.heartbeat("other", [claim.series_id], 3600) == set()
    assert await catalog.queue.next_ready_at() == start + timedelta(seconds=60)


async def test_heartbeat_does_not_wait_behind_a_placement_holding_row_locks(
    catalog: Catalog, clock: FakeClock
) -> None:
    # PostgreSQL: a group commit keeps its rows locked across renames and fsyncs; the
    # heartbeat of the other in-flight series must not queue behind it (their leases
    # would run out meanwhile). SQLite serialises writers by design, so not there.
    if catalog.database.is_sqlite:
        pytest.skip("SQLite has one writer at a time: no row locks to skip")
    await _queue(catalog, 2)
    placed, running = await catalog.queue.claim("w", limit=2, lease_seconds=60)
    async with catalog.queue.placing_many([placed], "w") as batch:
        held = await asyncio.wait_for(
            catalog.queue.heartbeat("w", [placed.series_id, running.series_id], 3600), timeout=10
        )
        batch.done(placed, [], "p", 0)
    # The locked row is still ours (its placement is finishing it): not reported lost.
    assert held == {placed.series_id, running.series_id}
    # Only `running` is still leased.
    assert await catalog.queue.next_ready_at() == clock.now() + timedelta(seconds=3600)


async def test_placing_marks_done_and_replaces_instances(catalog: Catalog) -> None:
    await _queue(catalog, 1)
    claim = await _claim_one(catalog)
    old = [InstanceRecord("1", "a" * 32, 3, "p/1.dcm"), InstanceRecord("2", "b" * 32, 4, "p/2.dcm")]
    async with catalog.queue.placing(claim, "w") as guard:
        guard.done(old, "p", 7)
    await catalog.sources.upsert_series(
        claim.source_id, [make_series(claim.series_uid, image_count=1)]
    )
    again = await _claim_one(catalog)
    new = [InstanceRecord("3", "c" * 32, 9, "p/3.dcm")]
    async with catalog.queue.placing(again, "w") as guard:
        guard.done(new, "p", 9)
    assert [item async for item in catalog.iter_done_instances()] == [(claim.series_uid, new)]
    assert (await catalog.state_counts())[SeriesState.DONE] == (1, 9)
    assert await catalog.queue.next_ready_at() is None


async def test_placing_block_that_raises_changes_nothing(catalog: Catalog) -> None:
    await _queue(catalog, 1)
    claim = await _claim_one(catalog)
    with pytest.raises(OSError):
        async with catalog.queue.placing(claim, "w") as guard:
            guard.done([InstanceRecord("1", "a" * 32, 3, "p/1.dcm")], "p", 3)
            raise OSError("rename failed")
    assert (await catalog.state_counts())[SeriesState.DOWNLOADING][0] == 1
    assert [item async for item in catalog.iter_done_instances()] == []
    assert await catalog.queue.heartbeat("w", [claim.series_id], 60) == {claim.series_id}


async def test_placing_rejects_a_lost_lease(catalog: Catalog, clock: FakeClock) -> None:
    await _queue(catalog, 1)
    claim = await _claim_one(catalog, "slow", lease=0.05)
    clock.advance(0.1)
    await _claim_one(catalog, "other")
    with pytest.raises(LeaseLostError):
        async with catalog.queue.placing(claim, "slow") as guard:
            guard.done([], "p", 0)
    assert (await catalog.state_counts())[SeriesState.DOWNLOADING][0] == 1


async def test_placing_without_done_is_an_error(catalog: Catalog) -> None:
    await _queue(catalog, 1)
    claim = await _claim_one(catalog)
    with pytest.raises(Exception, match=r"guard\.done"):
        async with catalog.queue.placing(claim, "w"):
            pass
    assert (await catalog.state_counts())[SeriesState.DONE][0] == 0


async def test_retryable_failure_backs_off_then_is_claimable(
    catalog: Catalog, clock: FakeClock
) -> None:
    await _queue(catalog, 1)
    claim = await _claim_one(catalog)
    state = await catalog.queue.fail(
        claim, "w", error="timeout", retryable=True, max_attempts=3, delay=0.2
    )
    assert state is SeriesState.PENDING
    ready_at = await catalog.queue.next_ready_at()
    assert ready_at == clock.now() + timedelta(seconds=0.2)
    assert await catalog.queue.claim("w", limit=1, lease_seconds=60) == []
    clock.advance(0.19)
    assert await catalog.queue.claim("w", limit=1, lease_seconds=60) == []
    clock.advance(0.01)
    retry = await _claim_one(catalog)
    assert retry.attempts == 1


async def test_failure_with_attempts_exhausted_is_final(catalog: Catalog) -> None:
    await _queue(catalog, 1)
    for expected in (SeriesState.PENDING, SeriesState.FAILED):
        claim = await _claim_one(catalog)
        state = await catalog.queue.fail(
            claim, "w", error="bad zip", retryable=True, max_attempts=2, delay=0
        )
        assert state is expected
    assert await catalog.queue.claim("w", limit=1, lease_seconds=60) == []
    assert await catalog.queue.next_ready_at() is None
    [failure] = await catalog.failures(10)
    assert (failure.state, failure.attempts, failure.last_error) == (
        SeriesState.FAILED,
        2,
        "bad zip",
    )


async def test_permanent_failure_is_final_at_once(catalog: Catalog) -> None:
    await _queue(catalog, 1)
    claim = await _claim_one(catalog)
    state = await catalog.queue.fail(
        claim, "w", error="400", retryable=False, max_attempts=9, delay=0
    )
    assert state is SeriesState.FAILED


async def test_fail_after_losing_the_lease_is_a_no_op(catalog: Catalog, clock: FakeClock) -> None:
    await _queue(catalog, 1)
    claim = await _claim_one(catalog, "slow", lease=0.05)
    clock.advance(0.1)
    await _claim_one(catalog, "other")
    state = await catalog.queue.fail(
        claim, "slow", error="x", retryable=True, max_attempts=5, delay=0
    )
    assert state is SeriesState.DOWNLOADING
    assert await catalog.failures(10) == []


async def test_retry_failed_requeues_with_fresh_attempts(catalog: Catalog) -> None:
    await _queue(catalog, 2)
    for _ in range(2):
        claim = await _claim_one(catalog)
        await catalog.queue.fail(claim, "w", error="x", retryable=False, max_attempts=1, delay=0)
    assert await catalog.queue.retry_failed() == 2
    assert all(c.attempts == 0 for c in await catalog.queue.claim("w", limit=5, lease_seconds=60))


async def test_release_gives_back_without_an_attempt(catalog: Catalog) -> None:
    await _queue(catalog, 3)
    first = await _claim_one(catalog)
    assert await catalog.queue.release(first, "w")
    assert not await catalog.queue.release(first, "w")
    await catalog.queue.claim("w", limit=3, lease_seconds=60)
    assert await catalog.queue.release_leases("w") == 3
    claims = await catalog.queue.claim("x", limit=5, lease_seconds=60)
    assert len(claims) == 3 and all(c.attempts == 0 for c in claims)


async def test_next_ready_at_reports_foreign_lease_expiry(
    catalog: Catalog, clock: FakeClock
) -> None:
    assert await catalog.queue.next_ready_at() is None
    await _queue(catalog, 1)
    assert await catalog.queue.next_ready_at() == clock.now()  # claimable now
    await _claim_one(catalog, "other", lease=120)
    assert await catalog.queue.next_ready_at() == clock.now() + timedelta(seconds=120)


async def test_placing_many_rejects_one_lost_lease_without_affecting_the_others(
    catalog: Catalog, clock: FakeClock
) -> None:
    sid = await _queue(catalog, 3)
    claims = await catalog.queue.claim("w", limit=2, lease_seconds=60)
    slow = await _claim_one(catalog, "slow", lease=0.05)
    clock.advance(0.1)
    taken = await _claim_one(catalog, "other")  # the expired lease changes hands
    assert taken.series_id == slow.series_id
    kept, changed = claims
    # The archive replaced one series while we fetched it: it must be re-queued.
    await catalog.sources.upsert_series(sid, [make_series(changed.series_uid, image_count=1)])
    async with catalog.queue.placing_many([kept, changed], "w") as batch:
        assert [c.series_id for c in batch.held] == [kept.series_id]
        batch.done(kept, [InstanceRecord("1.2", "a" * 32, 3, "p/1.2.dcm")], "p", 3)
    async with catalog.queue.placing_many([slow], "slow") as lost_batch:
        assert lost_batch.held == []
    assert set(batch.lost) == {changed.series_id}
    assert "changed" in str(batch.lost[changed.series_id])
    assert set(lost_batch.lost) == {slow.series_id}
    counts = await catalog.state_counts()
    assert counts[SeriesState.DONE][0] == 1
    assert counts[SeriesState.WANTED][0] == 1  # the changed one, queued again
    assert counts[SeriesState.DOWNLOADING][0] == 1  # "other" keeps the one it took
    assert [
        (uid, [i.sop_uid for i in inst]) async for uid, inst in catalog.iter_done_instances()
    ] == [(kept.series_uid, ["1.2"])]


async def test_placing_many_claims_the_next_series_in_the_same_commit(catalog: Catalog) -> None:
    await _queue(catalog, 5)
    first = await catalog.queue.claim("w", limit=2, lease_seconds=60)
    async with catalog.queue.placing_many(first, "w", claim_next=2, lease_seconds=60) as batch:
        for c in batch.held:
            batch.done(c, [], f"p/{c.series_uid}", 0)
        assert batch.claimed == []  # known only once committed
    assert len(batch.claimed) == 2
    assert not {c.series_id for c in batch.claimed} & {c.series_id for c in first}
    counts = await catalog.state_counts()
    assert (counts[SeriesState.DONE][0], counts[SeriesState.DOWNLOADING][0]) == (2, 2)
    # Another claimer never gets what the placement claimed.
    rest = await catalog.queue.claim("other", limit=5, lease_seconds=60)
    assert len(rest) == 1
    assert rest[0].series_id not in {c.series_id for c in batch.claimed}


async def test_placing_many_that_raises_records_and_claims_nothing(catalog: Catalog) -> None:
    await _queue(catalog, 3)
    first = await catalog.queue.claim("w", limit=1, lease_seconds=60)
    with pytest.raises(RuntimeError):
        async with catalog.queue.placing_many(first, "w", claim_next=2, lease_seconds=60) as batch:
            batch.done(first[0], [], "p", 0)
            raise RuntimeError("rename failed")
    assert batch.claimed == []
    counts = await catalog.state_counts()
    assert (
        counts.get(SeriesState.DONE, (0, 0))[0],
        counts[SeriesState.DOWNLOADING][0],
        counts[SeriesState.WANTED][0],
    ) == (0, 1, 2)


async def test_placing_many_refuses_done_for_a_series_it_does_not_hold(catalog: Catalog) -> None:
    await _queue(catalog, 2)
    mine, theirs = await catalog.queue.claim("w", limit=2, lease_seconds=60)
    with pytest.raises(Exception, match="not held"):
        async with catalog.queue.placing_many([mine], "w") as batch:
            batch.done(theirs, [], "p", 0)
    assert (await catalog.state_counts()).get(SeriesState.DONE, (0, 0))[0] == 0
