"""NbiaClient against the simulator: parsing, what is sent, error mapping, streams.

The simulator answers as the archive does; where a test needs an odd answer (a record
the archive may send, an error page, a bad body) it scripts that reply on the simulator
(`SimFaults.script_endpoint`) and reads what the client sent from `sim.recorded`.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import AsyncIterator, Callable
from datetime import UTC, date, datetime
from typing import Any

import pytest
import pytest_asyncio
import structlog

from nbia_sync.api.client import NbiaClient
from nbia_sync.api.models import SeriesInfo, SeriesSize
from nbia_sync.api.retry import RetryPolicy
from nbia_sync.clock import FakeClock
from nbia_sync.config import SourceSettings, TransferSettings
from nbia_sync.errors import PermanentError, RetryableError
from nbia_sync.sim import SimReply, SimRequest, SimServer

pytestmark = pytest.mark.asyncio

ClientFactory = Callable[..., NbiaClient]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def recorded(sim: SimServer) -> list[SimRequest]:
    sim.recorded = []
    return sim.recorded


@pytest_asyncio.fixture
async def make_client(sim: SimServer, clock: FakeClock) -> AsyncIterator[ClientFactory]:
    opened: list[NbiaClient] = []

    def make(api: str = "v4", attempts: int = 3, **source: Any) -> NbiaClient:
        settings = SourceSettings(name="src", url=sim.url, api=api, **source)
        transfer = TransferSettings(chunk_size=4096, read_timeout=0.5)
        # base 0: no backoff of our own; max 60: room for the Retry-After tests.
        policy = RetryPolicy(0.0, 60.0, attempts, clock=clock, rand=lambda: 1.0)
        client = NbiaClient(settings, transfer, policy=policy)
        opened.append(client)
        return client

    yield make
    for client in opened:
        await client.close()


def rows(*records: dict[str, Any]) -> SimReply:
    return SimReply(body=json.dumps(list(records)))


def calls(recorded: list[SimRequest], endpoint: str) -> list[SimRequest]:
    return [r for r in recorded if r.endpoint == endpoint]


def any_series_uid(sim: SimServer) -> str:
    return next(iter(sim.archive.series))


# A record as the real archive sends it: numbers as strings, a float file size, a date
# with a fraction, an attribute the client does not model.
SERIES = {
    "SeriesInstanceUID": "1.2.3.4",
    "StudyInstanceUID": "1.2.3",
    "Collection": "LIDC",
    "PatientID": "P-1",
    "Modality": "CT",
    "SeriesNumber": "3",
    "ImageCount": "12",
    "FileSize": "123456.0",
    "DateReleased": "2020-03-16 12:34:56.0",
    "ProtocolName": "chest",
}


async def test_collections_lists_names(make_client: ClientFactory, sim: SimServer) -> None:
    async with make_client() as client:
        names = await client.collections()
    assert sorted(names) == sorted({s.collection for s in sim.archive.series.values()})


async def test_empty_body_is_an_empty_result(make_client: ClientFactory, sim: SimServer) -> None:
    sim.faults.script_endpoint("getSeries", [SimReply(body=b"")])
    async with make_client() as client:
        assert await client.series(collection="SIM-CT") == []


def numbered(count: int) -> list[dict[str, Any]]:
    return [SERIES | {"SeriesInstanceUID": f"1.2.3.4.{i}"} for i in range(count)]


async def test_series_batches_hands_a_listing_on_size_series_at_a_time(
    make_client: ClientFactory, sim: SimServer
) -> None:
    sim.faults.script_endpoint("getSeries", [rows(*numbered(5))])
    handed: list[list[str]] = []

    async def each(batch: list[SeriesInfo]) -> None:
        handed.append([s.series_uid for s in batch])

    async with make_client() as client:
        count = await client.series_batches(each, "LIDC", size=2)
    assert count == 5
    assert handed == [["1.2.3.4.0", "1.2.3.4.1"], ["1.2.3.4.2", "1.2.3.4.3"], ["1.2.3.4.4"]]


async def test_series_batches_hands_again_from_the_first_after_a_retry(
    make_client: ClientFactory, sim: SimServer
) -> None:
    whole = json.dumps(numbered(3))
    cut = whole[: whole.index('"1.2.3.4.2"')]  # two whole records, then the answer ends
    sim.faults.script_endpoint("getSeries", [SimReply(body=cut), rows(*numbered(3))])
    handed: list[list[str]] = []

    async def each(batch: list[SeriesInfo]) -> None:
        handed.append([s.series_uid for s in batch])

    async with make_client(attempts=2) as client:
        assert await client.series_batches(each, "LIDC", size=2) == 3
    assert handed == [["1.2.3.4.0", "1.2.3.4.1"], ["1.2.3.4.0", "1.2.3.4.1"], ["1.2.3.4.2"]]


async def test_series_batches_raises_what_the_receiver_raised_without_a_retry(
    make_client: ClientFactory, sim: SimServer
) -> None:
    # An OSError is what a failed request raises too: it must not be taken for one.
    sim.faults.script_endpoint("getSeries", [rows(*numbered(3))] * 3)

    async def each(batch: list[SeriesInfo]) -> None:
        raise OSError("the catalog's disk is full")

    async with make_client(attempts=3) as client:
        with pytest.raises(OSError, match="disk is full"):
            await client.series_batches(each, "LIDC", size=2)
    assert sim.counters.requests["getSeries"] == 1


async def test_series_parses_strings_into_numbers_and_dates(
    make_client: ClientFactory, sim: SimServer
) -> None:
    sim.faults.script_endpoint("getSeries", [rows(SERIES)])
    async with make_client() as client:
        (info,) = await client.series(collection="LIDC")
    assert (info.series_uid, info.study_uid, info.patient_id) == ("1.2.3.4", "1.2.3", "P-1")
    assert (info.series_number, info.image_count, info.file_size) == (3, 12, 123456)
    assert info.date_released == datetime(2020, 3, 16, 12, 34, 56, tzinfo=UTC)
    assert info.extra == {"ProtocolName": "chest"}


async def test_series_of_the_simulator_match_its_archive(
    make_client: ClientFactory, sim: SimServer
) -> None:
    async with make_client() as client:
        found = {s.series_uid: s for s in await client.series(collection="SIM-CT")}
    truth = {u: s for u, s in sim.archive.series.items() if s.collection == "SIM-CT"}
    assert set(found) == set(truth)
    for uid, s in truth.items():
        got = found[uid]
        assert (got.patient_id, got.study_uid, got.image_count) == (
            s.patient_id,
            s.study_uid,
            s.image_count,
        )


async def test_series_tolerates_missing_optional_attributes(
    make_client: ClientFactory, sim: SimServer
) -> None:
    minimal = {k: SERIES[k] for k in ("SeriesInstanceUID", "StudyInstanceUID", "PatientID")}
    sim.faults.script_endpoint("getSeries", [rows(minimal)])
    async with make_client() as client:
        (info,) = await client.series(collection="LIDC")
    assert info.collection == "LIDC"  # taken from the query
    assert info.modality is None and info.image_count is None and info.date_released is None


async def test_series_sends_only_the_given_filters(
    make_client: ClientFactory, recorded: list[SimRequest]
) -> None:
    async with make_client() as client:
        await client.series(collection="SIM-CT", modality="CT", body_part="CHEST")
    (call,) = calls(recorded, "getSeries")
    assert call.query == {"Collection": "SIM-CT", "Modality": "CT", "BodyPartExamined": "CHEST"}


async def test_record_without_its_uid_comes_back_marked_for_the_catalog_to_skip(
    make_client: ClientFactory, sim: SimServer
) -> None:
    broken = {k: v for k, v in SERIES.items() if k != "SeriesInstanceUID"}
    sim.faults.script_endpoint("getSeries", [rows(SERIES, broken)])
    async with make_client() as client:
        good, bad = await client.series(collection="LIDC")
    assert good.problem is None
    assert bad.problem is not None and "record 1 has no SeriesInstanceUID" in bad.problem


async def test_malformed_json_is_retryable_and_retried(
    make_client: ClientFactory, sim: SimServer
) -> None:
    sim.faults.script_endpoint("getCollectionValues", [SimReply(body='[{"Collection": "A"')] * 3)
    async with make_client(attempts=3) as client:
        with pytest.raises(RetryableError, match="not valid JSON"):
            await client.collections()
    assert sim.counters.requests["getCollectionValues"] == 3


async def test_5xx_is_retried_until_success(make_client: ClientFactory, sim: SimServer) -> None:
    sim.faults.script_endpoint(
        "getCollectionValues",
        [
            SimReply(status=500, body="<html>oops</html>", content_type="text/html"),
            SimReply(status=502),
            None,
        ],
    )
    async with make_client(attempts=3) as client:
        assert "SIM-CT" in await client.collections()
    assert sim.counters.requests["getCollectionValues"] == 3


async def test_400_is_permanent_and_not_retried(make_client: ClientFactory, sim: SimServer) -> None:
    sim.faults.script_endpoint(
        "getSeries",
        [SimReply(status=400, body="Invalid query parameter", content_type="text/plain")],
    )
    async with make_client() as client:
        with pytest.raises(PermanentError, match="HTTP 400: Invalid query parameter"):
            await client.series(collection="X")
    assert sim.counters.requests["getSeries"] == 1


async def test_429_waits_at_least_retry_after(
    make_client: ClientFactory, sim: SimServer, clock: FakeClock
) -> None:
    sim.faults.script_endpoint(
        "getCollectionValues", [SimReply(status=429, headers={"Retry-After": "7"}), None]
    )
    async with make_client() as client:
        assert "SIM-CT" in await client.collections()
    assert clock.sleeps == [7.0]


async def test_v4_patients_read_patient_id_column(
    make_client: ClientFactory, sim: SimServer
) -> None:
    sim.faults.script_endpoint("getPatient", [rows({"PatientId": "P-9", "PatientSex": "F"})])
    async with make_client() as client:
        (patient,) = await client.patients("LIDC")
    assert (patient.collection, patient.patient_id, patient.patient_sex) == ("LIDC", "P-9", "F")


async def test_patients_of_the_simulator_match_its_archive(
    make_client: ClientFactory, sim: SimServer
) -> None:
    truth = {s.patient_id for s in sim.archive.series.values() if s.collection == "SIM-CT"}
    for api in ("v4", "v2"):
        async with make_client(api) as client:
            assert {p.patient_id for p in await client.patients("SIM-CT")} == truth


async def test_v4_dates_are_month_first_dashes(
    make_client: ClientFactory, recorded: list[SimRequest]
) -> None:
    since = date(2020, 3, 16)
    async with make_client("v4") as client:
        await client.updated_series(since)
        await client.new_patients("SIM-CT", since)
        await client.new_studies("SIM-CT", since, patient_id="P-1")
    assert calls(recorded, "getUpdatedSeries")[0].query == {"fromDate": "03-16-2020"}
    assert calls(recorded, "NewPatientsInCollection")[0].query == {
        "Collection": "SIM-CT",
        "fromDate": "03-16-2020",
    }
    assert calls(recorded, "NewStudiesInPatientCollection")[0].query == {
        "Collection": "SIM-CT",
        "fromDate": "03-16-2020",
        "PatientID": "P-1",
    }


async def test_v2_dates_and_bearer(
    make_client: ClientFactory, sim: SimServer, recorded: list[SimRequest]
) -> None:
    since = date(2020, 3, 16)
    async with make_client("v2") as client:
        series = await client.updated_series(since)
        patients = await client.new_patients("SIM-CT", since)
    updated = calls(recorded, "getUpdatedSeries")[0]
    assert updated.query == {"fromDate": "16/03/2020"}
    assert updated.headers["Authorization"].startswith("Bearer ")
    assert calls(recorded, "NewPatientsInCollection")[0].query == {
        "Collection": "SIM-CT",
        "Date": "2020/03/16",
    }
    # The simulator parsed both dates and answered: everything was released after 2020.
    assert {s.series_uid for s in series} == set(sim.archive.series)
    assert {p.collection for p in patients} == {"SIM-CT"} and patients
    assert sim.counters.unauthorized == 0


async def test_v4_sends_no_token_and_never_logs_in(
    make_client: ClientFactory, sim: SimServer, recorded: list[SimRequest]
) -> None:
    async with make_client("v4") as client:
        await client.collections()
    assert "Authorization" not in calls(recorded, "getCollectionValues")[0].headers
    assert sim.counters.requests["oauth/token"] == 0 and sim.counters.requests["logout"] == 0


async def test_401_on_a_query_renews_the_token_and_replays_on_a_spring_server(
    make_client: ClientFactory, sim: SimServer, recorded: list[SimRequest]
) -> None:
    sim.keycloak = False  # older deployments answer a dead token with 401 on queries too
    async with make_client("v2") as client:
        await client.collections()
        sim.revoke_all_tokens()
        assert "SIM-CT" in await client.collections()
    first, refused, replayed = (
        c.headers["Authorization"] for c in calls(recorded, "getCollectionValues")
    )
    assert first == refused != replayed
    # The refresh token died with the session: a new login, then the replay.
    assert sim.counters.grants["password"] == 2


async def test_close_logs_out(
    make_client: ClientFactory, sim: SimServer, recorded: list[SimRequest]
) -> None:
    async with make_client("v2") as client:
        await client.collections()
    (call,) = calls(recorded, "logout")
    assert (
        call.headers["Authorization"]
        == calls(recorded, "getCollectionValues")[0].headers["Authorization"]
    )
    assert sim.counters.logouts == 1  # the simulator knew the token: a real logout


async def test_series_size_parses_string_numbers(
    make_client: ClientFactory, sim: SimServer
) -> None:
    sim.faults.script_endpoint(
        "getSeriesSize", [rows({"TotalSizeInBytes": "2048.0", "ObjectCount": "4"})]
    )
    async with make_client() as client:
        assert await client.series_size("1.2") == SeriesSize(total_bytes=2048, object_count=4)


async def test_series_size_of_the_simulator_matches_its_archive(
    make_client: ClientFactory, sim: SimServer
) -> None:
    uid = any_series_uid(sim)
    truth = sim.archive.series[uid]
    async with make_client() as client:
        size = await client.series_size(uid)
    assert size.object_count == truth.image_count and size.total_bytes > 0


async def test_series_size_of_an_unknown_series_is_permanent(
    make_client: ClientFactory, sim: SimServer
) -> None:
    sim.faults.script_endpoint("getSeriesSize", [SimReply(body=b"")])
    async with make_client() as client:
        with pytest.raises(PermanentError, match="no such series"):
            await client.series_size("1.2")


async def test_sop_uids_of_the_simulator_match_its_archive(
    make_client: ClientFactory, sim: SimServer
) -> None:
    uid = any_series_uid(sim)
    async with make_client() as client:
        sops = await client.sop_instance_uids(uid)
    assert sorted(sops) == sorted(i.sop_uid for i in sim.archive.series[uid].instances)


async def test_metadata_values_become_strings(make_client: ClientFactory, sim: SimServer) -> None:
    sim.faults.script_endpoint(
        "getSeriesMetaData", [rows({"Series UID": "1.2", "Number of Images": 2})]
    )
    async with make_client() as client:
        assert await client.series_metadata("1.2") == {"Series UID": "1.2", "Number of Images": "2"}


async def test_single_image_returns_the_bytes(
    make_client: ClientFactory, sim: SimServer, recorded: list[SimRequest]
) -> None:
    uid = any_series_uid(sim)
    sop = sim.archive.series[uid].instances[0].sop_uid
    async with make_client() as client:
        image = await client.single_image(uid, sop)
    assert image[128:132] == b"DICM"  # a DICOM file, as the simulator made it
    assert calls(recorded, "getSingleImage")[0].query == {
        "SeriesInstanceUID": uid,
        "SOPInstanceUID": sop,
    }


async def collect(client: NbiaClient, uid: str) -> bytes:
    async with client.stream_series(uid) as chunks:
        return b"".join([chunk async for chunk in chunks])


async def test_stream_yields_the_whole_zip(
    make_client: ClientFactory, sim: SimServer, recorded: list[SimRequest]
) -> None:
    uid = any_series_uid(sim)
    async with make_client("v4") as client:
        body = await collect(client, uid)
    assert len(body) == sim.counters.bytes_sent
    names = zipfile.ZipFile(io.BytesIO(body)).namelist()
    assert len([n for n in names if n.endswith(".dcm")]) == sim.archive.series[uid].image_count
    assert calls(recorded, "getImage")[0].query == {"SeriesInstanceUID": uid, "IncludeMD5": "Yes"}


async def test_v2_stream_uses_get_image_with_md5_hash(
    make_client: ClientFactory, sim: SimServer, recorded: list[SimRequest]
) -> None:
    uid = any_series_uid(sim)
    async with make_client("v2") as client:
        body = await collect(client, uid)
    assert body.startswith(b"PK\x03\x04") and len(body) == sim.counters.bytes_sent
    call = calls(recorded, "getImageWithMD5Hash")[0]
    assert call.query == {"SeriesInstanceUID": uid}
    assert call.headers["Authorization"].startswith("Bearer ")


async def test_html_where_a_zip_was_expected_is_retryable(
    make_client: ClientFactory, sim: SimServer
) -> None:
    uid = any_series_uid(sim)
    sim.faults.script_series(uid, ["html", "html"])
    async with make_client("v4", attempts=2) as client:
        with pytest.raises(RetryableError, match="text/html"):
            await collect(client, uid)
    assert sim.counters.requests["getImage"] == 2


async def test_non_zip_bytes_with_a_zip_type_are_retryable(
    make_client: ClientFactory, sim: SimServer
) -> None:
    sim.faults.script_endpoint(
        "getImage", [SimReply(body=b'{"error": "boom"}', content_type="application/octet-stream")]
    )
    async with make_client("v4", attempts=1) as client:
        with pytest.raises(RetryableError, match="expected a ZIP"):
            await collect(client, any_series_uid(sim))


async def test_empty_download_is_retryable(make_client: ClientFactory, sim: SimServer) -> None:
    sim.faults.script_endpoint("getImage", [SimReply(body=b"", content_type="application/zip")])
    async with make_client("v4", attempts=1) as client:
        with pytest.raises(RetryableError, match="empty body"):
            await collect(client, any_series_uid(sim))


async def test_stream_opening_retries_5xx(make_client: ClientFactory, sim: SimServer) -> None:
    uid = any_series_uid(sim)
    sim.faults.script_series(uid, ["5xx", "ok"])
    async with make_client("v4") as client:
        body = await collect(client, uid)
    assert body.startswith(b"PK\x03\x04") and sim.counters.downloads_completed[uid] == 1


async def test_connection_reset_mid_stream_is_retryable(
    make_client: ClientFactory, sim: SimServer
) -> None:
    uid = any_series_uid(sim)
    sim.faults.script_series(uid, ["reset"])
    async with make_client("v4") as client:
        with pytest.raises(RetryableError, match="stream broke"):
            await collect(client, uid)
    assert sim.counters.requests["getImage"] == 1  # mid-stream: the caller retries


async def test_stalled_stream_is_cut_by_the_read_timeout(
    make_client: ClientFactory, sim: SimServer
) -> None:
    # read_timeout is 0.5 s in these tests; the simulator stalls 5 s, then resets.
    uid = any_series_uid(sim)
    sim.faults.stall_seconds = 5.0
    sim.faults.script_series(uid, ["stall"])
    async with make_client("v4") as client:
        with pytest.raises(RetryableError, match="stalled"):
            await collect(client, uid)


async def test_unverified_tls_warns_once_per_source(sim: SimServer) -> None:
    source = SourceSettings(name="insecure-once", url=sim.url, api="v4", verify_tls=False)
    with structlog.testing.capture_logs() as logs:
        for _ in range(2):
            async with NbiaClient(source, TransferSettings()):
                pass
    assert [e["event"] for e in logs].count("client.tls_verification_off") == 1
