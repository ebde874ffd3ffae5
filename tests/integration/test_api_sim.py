"""NbiaClient against the NBIA simulator over loopback: tokens, retries, dates, downloads."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import date, timedelta

import pytest

from nbia_sync.api.client import NbiaClient
from nbia_sync.api.retry import RetryPolicy
from nbia_sync.clock import SYSTEM_CLOCK, Clock, FakeClock
from nbia_sync.config import SourceSettings, TransferSettings
from nbia_sync.errors import RetryableError
from nbia_sync.sim import SimArchive, SimFaults, SimServer
from nbia_sync.sim.testing import running_sim

pytestmark = pytest.mark.asyncio

EOCD = b"PK\x05\x06"  # a complete ZIP ends with its end-of-central-directory record


def client_for(
    sim: SimServer,
    api: str = "v2",
    *,
    attempts: int = 8,
    clock: FakeClock | None = None,
    token_clock: Clock = SYSTEM_CLOCK,
    rand: Callable[[], float] = lambda: 1.0,
    read_timeout: float = 30.0,
    refresh_margin: float = 0.2,
) -> NbiaClient:
    source = SourceSettings(name="sim", url=sim.url, api=api, refresh_margin=refresh_margin)
    transfer = TransferSettings(read_timeout=read_timeout, chunk_size=16384)
    # Backoff on a fake clock: recorded, not waited (the simulator enforces no pause).
    policy = RetryPolicy(0.01, 0.05, attempts, clock=clock or FakeClock(), rand=rand)
    return NbiaClient(source, transfer, policy=policy, clock=token_clock)


async def drain(chunks: AsyncIterator[bytes]) -> tuple[int, bytes]:
    """Bytes received and the tail of the archive, without holding the archive."""
    size, tail = 0, b""
    async for chunk in chunks:
        size += len(chunk)
        tail = (tail + chunk)[-64:]
    return size, tail


async def test_long_download_with_short_tokens_serves_no_401(sim_archive: SimArchive) -> None:
    # One ~400 KB series read 16 KB at a time while the shared fake clock runs a second per
    # chunk: a ~25 s stream across a dozen 2-second token lives, a query after each chunk.
    archive = SimArchive.generate(
        collections=("LONG",), patients=1, series=1, images=4, image_size=100_000
    )
    (uid,) = archive.series
    clock = FakeClock(autojump=False)
    faults = SimFaults(token_ttl=2.0, refresh_ttl=3.0)
    queries = 0
    async with (
        running_sim(archive, faults, clock=clock) as sim,
        client_for(sim, token_clock=clock) as client,
    ):
        size, tail = 0, b""
        async with client.stream_series(uid) as chunks:
            async for chunk in chunks:
                size += len(chunk)
                tail = (tail + chunk)[-64:]
                clock.advance(1.0)
                await client.series(collection="LONG")
                queries += 1
        streamed_for = clock.monotonic()
        clock.advance(10.0)  # after the stream both tokens are long dead
        assert await client.collections() == ["LONG"]
        assert [s.series_uid for s in await client.series(collection="LONG")] == [uid]
    assert streamed_for > 15, "the stream must outlive several tokens for this test to mean much"
    assert sim.counters.unauthorized == 0
    assert sim.counters.downloads_completed[uid] == 1
    assert size == sim.counters.bytes_sent and EOCD in tail
    assert queries > 10
    assert sim.counters.grants["refresh_token"] >= 1  # renewed ahead while queries ran
    assert sim.counters.grants["password"] >= 2  # and logged in again after the stream


async def test_revoked_tokens_recover_by_renewing_and_replaying(sim: SimServer) -> None:
    # The older Spring deployments say 401; Keycloak's empty 200 is the discovery
    # witness's business (test_keycloak_mode.py).
    sim.keycloak = False
    async with client_for(sim) as client:
        before = await client.collections()
        sim.revoke_all_tokens()
        assert await client.collections() == before
    assert sim.counters.requests["getCollectionValues"] == 3  # ok, 401, replay
    assert sim.counters.grants["password"] == 2  # the refresh token died with the session


async def test_concurrent_queries_near_expiry_make_one_refresh(sim_archive: SimArchive) -> None:
    clock = FakeClock(autojump=False)
    faults = SimFaults(token_ttl=2.0, refresh_ttl=60.0)
    async with (
        running_sim(sim_archive, faults, clock=clock) as sim,
        client_for(sim, refresh_margin=0.5, token_clock=clock) as client,
    ):
        await client.collections()
        clock.advance(1.2)  # 0.8 s of 2 left: inside the margin, still valid
        results = await asyncio.gather(*(client.series(collection="SIM-CT") for _ in range(32)))
    assert all(len(r) == len(results[0]) > 0 for r in results)
    assert sim.counters.grants == {"password": 1, "refresh_token": 1}
    assert sim.counters.unauthorized == 0


async def test_queries_are_retried_through_5xx_and_429(sim_archive: SimArchive) -> None:
    faults = SimFaults(error_5xx=0.25, rate_429=0.2, retry_after=0.05, seed=3)
    clock = FakeClock()
    expected = {s.uid for s in sim_archive.series.values()}
    # rand=0: every backoff is zero except where Retry-After sets a floor.
    async with (
        running_sim(sim_archive, faults) as sim,
        client_for(sim, attempts=12, clock=clock, rand=lambda: 0.0) as client,
    ):
        for _ in range(10):
            found = set()
            for collection in await client.collections():
                found |= {s.series_uid for s in await client.series(collection=collection)}
            assert found == expected
        sim.faults = SimFaults()  # logout is best effort, not retried: keep it out
    served_5xx = sum(n for status, n in sim.counters.statuses.items() if status >= 500)
    assert served_5xx > 0 and sim.counters.statuses[429] > 0
    assert clock.sleeps.count(0.05) == sim.counters.statuses[429]


async def test_download_opening_is_retried_through_5xx_429_and_html(sim: SimServer) -> None:
    uid = next(iter(sim.archive.series))
    sim.faults.script_series(uid, ["5xx", "429", "html", "ok"])
    sim.faults.retry_after = 0.05
    async with client_for(sim, "v4") as client, client.stream_series(uid) as chunks:
        size, tail = await drain(chunks)
    assert sim.counters.downloads_completed[uid] == 1
    assert EOCD in tail and size > 0


async def test_reset_mid_stream_raises_retryable(sim: SimServer) -> None:
    uid = next(iter(sim.archive.series))
    sim.faults.script_series(uid, ["reset"])
    async with client_for(sim, "v2") as client:
        with pytest.raises(RetryableError, match="stream broke"):
            async with client.stream_series(uid) as chunks:
                await drain(chunks)


async def test_stalled_stream_is_cut_and_retryable(sim: SimServer) -> None:
    uid = next(iter(sim.archive.series))
    sim.faults.stall_seconds = 5.0
    sim.faults.script_series(uid, ["stall"])
    async with client_for(sim, "v2", read_timeout=0.5) as client:
        # "stalled" (a read timeout), not a broken stream: the cut came before the sim's
        # own reset at 5 s.
        with pytest.raises(RetryableError, match="stalled"):
            async with client.stream_series(uid) as chunks:
                await drain(chunks)


async def test_logout_is_sent_on_close(sim: SimServer) -> None:
    async with client_for(sim) as client:
        await client.collections()
    assert sim.counters.logouts == 1


@pytest.mark.parametrize("api", ["v1", "v2", "v4"])
async def test_each_versions_date_parameters_select_the_right_releases(
    sim_archive: SimArchive, api: str
) -> None:
    series = sorted(sim_archive.series.values(), key=lambda s: s.date_released)
    # A day <= 12 that is not the month: a day/month swap would pick other releases.
    since = series[len(series) // 2].date_released.date()
    while since.day > 12 or since.day == since.month:
        since -= timedelta(days=1)
    collection = series[0].collection
    in_collection = [s for s in series if s.collection == collection]
    async with running_sim(sim_archive) as sim, client_for(sim, api) as client:
        updated = {s.series_uid for s in await client.updated_series(since)}
        patients = {p.patient_id for p in await client.new_patients(collection, since)}
        studies = {s.study_uid for s in await client.new_studies(collection, since)}
        everything = await client.updated_series(date(2000, 1, 1))
    assert updated == {s.uid for s in series if s.date_released.date() > since}
    assert patients == {s.patient_id for s in in_collection if s.date_released.date() >= since}
    assert studies == {s.study_uid for s in in_collection if s.date_released.date() >= since}
    assert len(everything) == len(series)


@pytest.mark.parametrize("api", ["v1", "v2", "v4"])
async def test_listing_matches_the_archive(sim_archive: SimArchive, api: str) -> None:
    async with running_sim(sim_archive) as sim, client_for(sim, api) as client:
        listed = [s for c in await client.collections() for s in await client.series(c)]
        patients = [p for c in await client.collections() for p in await client.patients(c)]
        uid = listed[0].series_uid
        size = await client.series_size(uid)
        sops = await client.sop_instance_uids(uid)
    truth = sim_archive.series
    assert {s.series_uid for s in listed} == set(truth)
    for info in listed:
        real = truth[info.series_uid]
        assert (info.image_count, info.file_size) == (real.image_count, real.file_size)
        assert info.date_released is not None
        assert info.date_released.replace(tzinfo=None) == real.date_released
    assert {p.patient_id for p in patients} == {p.patient_id for p in sim_archive.patients}
    assert (size.total_bytes, size.object_count) == (truth[uid].file_size, truth[uid].image_count)
    assert sops == [i.sop_uid for i in truth[uid].instances]


@pytest.mark.parametrize("api", ["v2", "v4"])
async def test_every_series_filter_is_accepted(sim_archive: SimArchive, api: str) -> None:
    real = next(iter(sim_archive.series.values()))
    instance = real.instances[0]
    async with running_sim(sim_archive) as sim, client_for(sim, api) as client:
        found = await client.series(
            collection=real.collection,
            patient_id=real.patient_id,
            study_uid=real.study_uid,
            modality=real.modality,
            series_uid=real.uid,
            body_part=real.body_part,
        )
        studies = await client.patient_studies(real.collection, patient_id=real.patient_id)
        image = await client.single_image(real.uid, instance.sop_uid)
        metadata = await client.series_metadata(real.uid)
    assert [s.series_uid for s in found] == [real.uid]
    assert real.study_uid in {s.study_uid for s in studies}
    assert image == instance.read()
    assert metadata  # human-readable keys, all values as strings
