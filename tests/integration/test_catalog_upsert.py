"""Merging discovery results: what is queued, what is not, and what survives a reopen."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from catalog_fixtures import make_series, make_source

from nbia_sync.api.models import PatientInfo, StudyInfo
from nbia_sync.catalog import Catalog, InstanceRecord, LeaseLostError, SeriesState, UpsertResult

pytestmark = pytest.mark.asyncio

T0 = datetime(2024, 1, 1, tzinfo=UTC)


async def _complete_all(catalog: Catalog) -> None:
    for claim in await catalog.queue.claim("w", limit=10_000, lease_seconds=60):
        async with catalog.queue.placing(claim, "w") as guard:
            guard.done([], placed_path=f"x/{claim.series_uid}", bytes=1)


async def test_new_series_are_queued_as_wanted(catalog: Catalog) -> None:
    sid = await catalog.sources.ensure_source(make_source())
    result = await catalog.sources.upsert_series(sid, [make_series("1"), make_series("2")])
    assert result == UpsertResult(new=2, changed=0, unchanged=0)
    counts = await catalog.state_counts()
    assert counts[SeriesState.WANTED] == (2, 2000)


async def test_repeated_uid_in_one_call_counts_once(catalog: Catalog) -> None:
    sid = await catalog.sources.ensure_source(make_source())
    result = await catalog.sources.upsert_series(sid, [make_series("1"), make_series("1")])
    assert result == UpsertResult(new=1)


async def test_unchanged_series_are_not_requeued(catalog: Catalog) -> None:
    sid = await catalog.sources.ensure_source(make_source())
    await catalog.sources.upsert_series(sid, [make_series("1"), make_series("2")])
    await _complete_all(catalog)
    result = await catalog.sources.upsert_series(sid, [make_series("1"), make_series("2")])
    assert result == UpsertResult(unchanged=2)
    assert (await catalog.state_counts())[SeriesState.DONE][0] == 2


@pytest.mark.parametrize(
    "change",
    [
        {"released": T0 + timedelta(days=3)},
        {"image_count": 11},
        {"file_size": 1001},
    ],
    ids=["date_released", "image_count", "file_size"],
)
async def test_changed_done_series_is_requeued_with_new_generation(
    catalog: Catalog, change: dict[str, Any]
) -> None:
    sid = await catalog.sources.ensure_source(make_source())
    await catalog.sources.upsert_series(sid, [make_series("1"), make_series("2")])
    await _complete_all(catalog)
    result = await catalog.sources.upsert_series(
        sid, [make_series("1", **change), make_series("2")]
    )
    assert result == UpsertResult(changed=1, unchanged=1)
    [claim] = await catalog.queue.claim("w", limit=10, lease_seconds=60)
    assert (claim.series_uid, claim.generation, claim.attempts) == ("1", 2, 0)


async def test_one_change_reported_by_two_concurrent_queries_counts_once(
    catalog: Catalog,
) -> None:
    # Discovery stores getUpdatedSeries and a new study's getSeries at once: both list
    # the re-released series. The second writer must see the first one's change.
    sid = await catalog.sources.ensure_source(make_source())
    await catalog.sources.upsert_series(sid, [make_series("1"), make_series("2")])
    await _complete_all(catalog)
    changed = make_series("1", released=T0 + timedelta(days=3))
    results = await asyncio.gather(
        *(catalog.sources.upsert_series(sid, [changed, make_series("2")]) for _ in range(4))
    )
    assert sum(r.changed for r in results) == 1
    [claim] = await catalog.queue.claim("w", limit=10, lease_seconds=60)
    assert (claim.series_uid, claim.generation) == ("1", 2)


@pytest.mark.parametrize(
    "move",
    [{"collection": "OTHER"}, {"patient_id": "P2"}, {"study_uid": "1.2.9"}],
    ids=["collection", "patient_id", "study_uid"],
)
async def test_moved_series_is_requeued_with_its_new_place(
    catalog: Catalog, move: dict[str, Any]
) -> None:
    """Same SeriesInstanceUID under another collection, patient or study: the mirror
    path changes, so the series is a change even when its files and date are not."""
    sid = await catalog.sources.ensure_source(make_source())
    await catalog.sources.upsert_series(sid, [make_series("1"), make_series("2")])
    await _complete_all(catalog)
    result = await catalog.sources.upsert_series(sid, [make_series("1", **move), make_series("2")])
    assert result == UpsertResult(changed=1, unchanged=1)
    [claim] = await catalog.queue.claim("w", limit=10, lease_seconds=60)
    assert (claim.series_uid, claim.generation, claim.placed_path) == ("1", 2, "x/1")
    where = {"collection": "COLL", "patient_id": "P1", "study_uid": "1.2.3", **move}
    assert (claim.collection, claim.patient_id, claim.study_uid) == (
        where["collection"],
        where["patient_id"],
        where["study_uid"],
    )
    # Reported again at its new place: nothing more to do.
    assert await catalog.sources.upsert_series(sid, [make_series("1", **move)]) == UpsertResult(
        unchanged=1
    )


async def test_omitted_attribute_is_not_a_change(catalog: Catalog) -> None:
    sid = await catalog.sources.ensure_source(make_source())
    await catalog.sources.upsert_series(sid, [make_series("1")])
    await _complete_all(catalog)
    bare = replace(make_series("1"), image_count=None, file_size=None, date_released=None)
    assert await catalog.sources.upsert_series(sid, [bare]) == UpsertResult(unchanged=1)


async def test_changed_failed_series_gets_fresh_attempts(catalog: Catalog) -> None:
    sid = await catalog.sources.ensure_source(make_source())
    await catalog.sources.upsert_series(sid, [make_series("1")])
    [claim] = await catalog.queue.claim("w", limit=1, lease_seconds=60)
    await catalog.queue.fail(claim, "w", error="boom", retryable=False, max_attempts=3, delay=0)
    await catalog.sources.upsert_series(sid, [make_series("1", image_count=99)])
    [again] = await catalog.queue.claim("w", limit=1, lease_seconds=60)
    assert (again.attempts, again.generation) == (0, 2)


async def test_change_during_download_rejects_placement_and_requeues(catalog: Catalog) -> None:
    sid = await catalog.sources.ensure_source(make_source())
    await catalog.sources.upsert_series(sid, [make_series("1")])
    [claim] = await catalog.queue.claim("w", limit=1, lease_seconds=60)
    assert await catalog.sources.upsert_series(
        sid, [make_series("1", file_size=5)]
    ) == UpsertResult(changed=1)
    # Still leased to the worker (its staging stays its own) until it tries to place.
    assert await catalog.queue.heartbeat("w", [claim.series_id], 60) == {claim.series_id}
    with pytest.raises(LeaseLostError, match="changed"):
        async with catalog.queue.placing(claim, "w") as guard:
            guard.done([], "x", 1)
    [again] = await catalog.queue.claim("w2", limit=1, lease_seconds=60)
    assert (again.series_uid, again.generation, again.file_size) == ("1", 2, 5)


async def test_batches_larger_than_one_transaction(catalog: Catalog) -> None:
    sid = await catalog.sources.ensure_source(make_source())
    many = [make_series(f"s{i:05d}") for i in range(1234)]
    assert await catalog.sources.upsert_series(sid, many) == UpsertResult(new=1234)
    changed = [make_series(f"s{i:05d}", image_count=1) for i in range(0, 1234, 2)]
    assert await catalog.sources.upsert_series(sid, many[1::2] + changed) == UpsertResult(
        changed=617, unchanged=617
    )


async def test_same_uid_in_a_second_source_is_held_as_a_conflict(catalog: Catalog) -> None:
    """One UID, one place in the mirror: the second source's row is held, not queued
    (tests/integration/test_identity_conflicts.py covers the rest of the rule)."""
    a = await catalog.sources.ensure_source(make_source("a"))
    b = await catalog.sources.ensure_source(make_source("b"))
    assert a != b
    await catalog.sources.upsert_series(a, [make_series("1")])
    assert await catalog.sources.upsert_series(b, [make_series("1")]) == UpsertResult(conflicts=1)


async def test_ensure_source_is_idempotent(catalog: Catalog) -> None:
    first = await catalog.sources.ensure_source(make_source("main"))
    assert await catalog.sources.ensure_source(make_source("main", api="v4")) == first


async def test_concurrent_ensure_source_creates_one_row(catalog: Catalog) -> None:
    ids = await asyncio.gather(
        *(catalog.sources.ensure_source(make_source("fleet")) for _ in range(4))
    )
    assert len(set(ids)) == 1


async def test_watermark_round_trips_as_aware_utc(catalog: Catalog) -> None:
    sid = await catalog.sources.ensure_source(make_source())
    assert await catalog.sources.get_watermark(sid) is None
    await catalog.sources.set_watermark(
        sid, datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC), full_listing=True
    )
    mark = await catalog.sources.get_watermark(sid)
    assert mark == datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
    assert mark is not None and mark.tzinfo is not None
    assert await catalog.sources.last_full_listing_at(sid) is not None


async def test_collections_patients_studies_are_recorded_once(catalog: Catalog) -> None:
    sid = await catalog.sources.ensure_source(make_source())
    for _ in range(2):
        await catalog.sources.record_collections(sid, ["B", "A", "A"])
        await catalog.sources.record_patients(sid, [PatientInfo("A", "P1"), PatientInfo("A", "P1")])
        await catalog.sources.record_studies(sid, [StudyInfo("A", "P1", "1.2")])
    assert await catalog.sources.known_collections(sid) == ["A", "B"]


async def test_catalog_survives_close_and_reopen(catalog_url: str) -> None:
    catalog = await Catalog.open(catalog_url)
    sid = await catalog.sources.ensure_source(make_source("reopen"))
    await catalog.sources.upsert_series(sid, [make_series("r1"), make_series("r2")])
    [claim] = await catalog.queue.claim("w", limit=1, lease_seconds=60)
    async with catalog.queue.placing(claim, "w") as guard:
        guard.done([InstanceRecord("1.1", "0" * 32, 5, "p/1.1.dcm")], "p", 5)
    await catalog.close()

    reopened = await Catalog.open(catalog_url)
    try:
        assert await reopened.sources.ensure_source(make_source("reopen")) == sid
        counts = await reopened.state_counts()
        assert counts[SeriesState.DONE][0] >= 1 and counts[SeriesState.WANTED][0] >= 1
        done = [item async for item in reopened.iter_done_instances()]
        assert (claim.series_uid, [InstanceRecord("1.1", "0" * 32, 5, "p/1.1.dcm")]) in done
    finally:
        await reopened.close()
