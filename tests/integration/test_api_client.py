"""NbiaClient against a scripted archive on loopback: parsing, error mapping, streams."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from datetime import UTC, date, datetime
from typing import Any

import pytest
import pytest_asyncio
import structlog
from api_fake import FakeArchive, Reply

from nbia_sync.api.client import NbiaClient
from nbia_sync.api.models import SeriesSize
from nbia_sync.api.retry import RetryPolicy
from nbia_sync.config import SourceSettings, TransferSettings
from nbia_sync.errors import PermanentError, RetryableError

pytestmark = pytest.mark.asyncio

V4 = "services/v4/"
V2 = "services/v2/"
ZIP = b"PK\x03\x04" + b"\x00" * 60


class Sleeps:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


ClientFactory = Callable[..., NbiaClient]


@pytest_asyncio.fixture
async def make_client(fake_archive: FakeArchive, sleeps: Sleeps) -> AsyncIterator[ClientFactory]:
    opened: list[NbiaClient] = []

    def make(api: str = "v4", attempts: int = 3, **source: Any) -> NbiaClient:
        settings = SourceSettings(name="src", url=fake_archive.url, api=api, **source)
        transfer = TransferSettings(chunk_size=4096, read_timeout=0.5)
        policy = RetryPolicy(0.0, 0.0, attempts, sleep=sleeps, rand=lambda: 1.0)
        client = NbiaClient(settings, transfer, policy=policy)
        opened.append(client)
        return client

    yield make
    for client in opened:
        await client.close()


def rows(*records: dict[str, Any]) -> Reply:
    return Reply(body=json.dumps(list(records)))


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


async def test_collections_lists_names(
    make_client: ClientFactory, fake_archive: FakeArchive
) -> None:
    fake_archive.reply(V4 + "getCollectionValues", rows({"Collection": "A"}, {"Collection": "B"}))
    async with make_client() as client:
        assert await client.collections() == ["A", "B"]


async def test_empty_body_is_an_empty_result(
    make_client: ClientFactory, fake_archive: FakeArchive
) -> None:
    fake_archive.reply(V4 + "getSeries", Reply(body=b""))
    async with make_client() as client:
        assert await client.series(collection="LIDC") == []


async def test_series_parses_strings_into_numbers_and_dates(
    make_client: ClientFactory, fake_archive: FakeArchive
) -> None:
    fake_archive.reply(V4 + "getSeries", rows(SERIES))
    async with make_client() as client:
        (info,) = await client.series(collection="LIDC")
    assert (info.series_uid, info.study_uid, info.patient_id) == ("1.2.3.4", "1.2.3", "P-1")
    assert (info.series_number, info.image_count, info.file_size) == (3, 12, 123456)
    assert info.date_released == datetime(2020, 3, 16, 12, 34, 56, tzinfo=UTC)
    assert info.extra == {"ProtocolName": "chest"}


async def test_series_tolerates_missing_optional_attributes(
    make_client: ClientFactory, fake_archive: FakeArchive
) -> None:
    minimal = {k: SERIES[k] for k in ("SeriesInstanceUID", "StudyInstanceUID", "PatientID")}
    fake_archive.reply(V4 + "getSeries", rows(minimal))
    async with make_client() as client:
        (info,) = await client.series(collection="LIDC")
    assert info.collection == "LIDC"  # taken from the query
    assert info.modality is None and info.image_count is None and info.date_released is None


async def test_series_sends_only_the_given_filters(
    make_client: ClientFactory, fake_archive: FakeArchive
) -> None:
    fake_archive.reply(V4 + "getSeries", rows())
    async with make_client() as client:
        await client.series(collection="LIDC", modality="CT", body_part="CHEST")
    (call,) = fake_archive.calls(V4 + "getSeries")
    assert call.query == {"Collection": "LIDC", "Modality": "CT", "BodyPartExamined": "CHEST"}


async def test_record_without_its_uid_comes_back_marked_for_the_catalog_to_skip(
    make_client: ClientFactory, fake_archive: FakeArchive
) -> None:
    broken = {k: v for k, v in SERIES.items() if k != "SeriesInstanceUID"}
    fake_archive.reply(V4 + "getSeries", rows(SERIES, broken))
    async with make_client() as client:
        good, bad = await client.series(collection="LIDC")
    assert good.problem is None
    assert bad.problem is not None and "record 1 has no SeriesInstanceUID" in bad.problem


async def test_malformed_json_is_retryable_and_retried(
    make_client: ClientFactory, fake_archive: FakeArchive
) -> None:
    fake_archive.reply(V4 + "getCollectionValues", Reply(body='[{"Collection": "A"'))
    async with make_client(attempts=3) as client:
        with pytest.raises(RetryableError, match="not valid JSON"):
            await client.collections()
    assert len(fake_archive.calls(V4 + "getCollectionValues")) == 3


async def test_5xx_is_retried_until_success(
    make_client: ClientFactory, fake_archive: FakeArchive
) -> None:
    fake_archive.reply(
        V4 + "getCollectionValues",
        Reply(status=500, body="<html>oops</html>", content_type="text/html"),
        Reply(status=502),
        rows({"Collection": "A"}),
    )
    async with make_client(attempts=3) as client:
        assert await client.collections() == ["A"]


async def test_400_is_permanent_and_not_retried(
    make_client: ClientFactory, fake_archive: FakeArchive
) -> None:
    fake_archive.reply(
        V4 + "getSeries",
        Reply(status=400, body="Invalid query parameter", content_type="text/plain"),
    )
    async with make_client() as client:
        with pytest.raises(PermanentError, match="HTTP 400: Invalid query parameter"):
            await client.series(collection="X")
    assert len(fake_archive.calls(V4 + "getSeries")) == 1


async def test_429_waits_at_least_retry_after(
    make_client: ClientFactory, fake_archive: FakeArchive, sleeps: Sleeps
) -> None:
    fake_archive.reply(
        V4 + "getCollectionValues",
        Reply(status=429, headers={"Retry-After": "7"}),
        rows({"Collection": "A"}),
    )
    async with make_client() as client:
        assert await client.collections() == ["A"]
    assert sleeps.delays == [7.0]


async def test_v4_patients_read_patient_id_column(
    make_client: ClientFactory, fake_archive: FakeArchive
) -> None:
    fake_archive.reply(V4 + "getPatient", rows({"PatientId": "P-9", "PatientSex": "F"}))
    async with make_client() as client:
        (patient,) = await client.patients("LIDC")
    assert (patient.collection, patient.patient_id, patient.patient_sex) == ("LIDC", "P-9", "F")


async def test_v4_dates_are_month_first_dashes(
    make_client: ClientFactory, fake_archive: FakeArchive
) -> None:
    for endpoint in (
        "getUpdatedSeries",
        "NewPatientsInCollection",
        "NewStudiesInPatientCollection",
    ):
        fake_archive.reply(V4 + endpoint, rows())
    since = date(2020, 3, 16)
    async with make_client("v4") as client:
        await client.updated_series(since)
        await client.new_patients("LIDC", since)
        await client.new_studies("LIDC", since, patient_id="P-1")
    assert fake_archive.calls(V4 + "getUpdatedSeries")[0].query == {"fromDate": "03-16-2020"}
    assert fake_archive.calls(V4 + "NewPatientsInCollection")[0].query == {
        "Collection": "LIDC",
        "fromDate": "03-16-2020",
    }
    assert fake_archive.calls(V4 + "NewStudiesInPatientCollection")[0].query == {
        "Collection": "LIDC",
        "fromDate": "03-16-2020",
        "PatientID": "P-1",
    }


async def test_v2_dates_and_bearer(make_client: ClientFactory, fake_archive: FakeArchive) -> None:
    fake_archive.reply(
        "oauth/token", Reply(body=json.dumps({"access_token": "tok", "expires_in": 60}))
    )
    fake_archive.reply(V2 + "getUpdatedSeries", rows(SERIES))
    fake_archive.reply(V2 + "NewPatientsInCollection", rows({"PatientID": "P-1"}))
    since = date(2020, 3, 16)
    async with make_client("v2") as client:
        (series,) = await client.updated_series(since)
        (patient,) = await client.new_patients("LIDC", since)
    updated = fake_archive.calls(V2 + "getUpdatedSeries")[0]
    assert updated.query == {"fromDate": "16/03/2020"}
    assert updated.headers["Authorization"] == "Bearer tok"
    assert fake_archive.calls(V2 + "NewPatientsInCollection")[0].query == {
        "Collection": "LIDC",
        "Date": "2020/03/16",
    }
    assert (series.collection, patient.patient_id) == ("LIDC", "P-1")


async def test_v4_sends_no_token_and_never_logs_in(
    make_client: ClientFactory, fake_archive: FakeArchive
) -> None:
    fake_archive.reply(V4 + "getCollectionValues", rows({"Collection": "A"}))
    async with make_client("v4") as client:
        await client.collections()
    assert "Authorization" not in fake_archive.calls(V4 + "getCollectionValues")[0].headers
    assert fake_archive.calls("oauth/token") == [] and fake_archive.calls("logout") == []


async def test_401_renews_the_token_and_replays(
    make_client: ClientFactory, fake_archive: FakeArchive
) -> None:
    fake_archive.reply(
        "oauth/token",
        Reply(body=json.dumps({"access_token": "old", "expires_in": 60, "refresh_token": "r"})),
        Reply(body=json.dumps({"access_token": "new", "expires_in": 60})),
    )
    fake_archive.reply(
        V2 + "getCollectionValues",
        Reply(status=401, body='{"error":"invalid_token"}'),
        rows({"Collection": "A"}),
    )
    async with make_client("v2") as client:
        assert await client.collections() == ["A"]
    sent = [c.headers["Authorization"] for c in fake_archive.calls(V2 + "getCollectionValues")]
    assert sent == ["Bearer old", "Bearer new"]


async def test_close_logs_out(make_client: ClientFactory, fake_archive: FakeArchive) -> None:
    fake_archive.reply("oauth/token", Reply(body=json.dumps({"access_token": "tok"})))
    fake_archive.reply(V2 + "getCollectionValues", rows())
    fake_archive.reply("logout", Reply(body="You Have Logged Out successfully."))
    async with make_client("v2") as client:
        await client.collections()
    (call,) = fake_archive.calls("logout")
    assert call.headers["Authorization"] == "Bearer tok"


async def test_series_size_parses_string_numbers(
    make_client: ClientFactory, fake_archive: FakeArchive
) -> None:
    fake_archive.reply(
        V4 + "getSeriesSize", rows({"TotalSizeInBytes": "2048.0", "ObjectCount": "4"})
    )
    async with make_client() as client:
        assert await client.series_size("1.2") == SeriesSize(total_bytes=2048, object_count=4)


async def test_series_size_of_an_unknown_series_is_permanent(
    make_client: ClientFactory, fake_archive: FakeArchive
) -> None:
    fake_archive.reply(V4 + "getSeriesSize", Reply(body=b""))
    async with make_client() as client:
        with pytest.raises(PermanentError, match="no such series"):
            await client.series_size("1.2")


async def test_sop_uids_and_metadata(make_client: ClientFactory, fake_archive: FakeArchive) -> None:
    fake_archive.reply(
        V4 + "getSOPInstanceUIDs", rows({"SOPInstanceUID": "1.1"}, {"SOPInstanceUID": "1.2"})
    )
    fake_archive.reply(V4 + "getSeriesMetaData", rows({"Series UID": "1.2", "Number of Images": 2}))
    async with make_client() as client:
        assert await client.sop_instance_uids("1.2") == ["1.1", "1.2"]
        assert await client.series_metadata("1.2") == {"Series UID": "1.2", "Number of Images": "2"}


async def test_single_image_returns_the_bytes(
    make_client: ClientFactory, fake_archive: FakeArchive
) -> None:
    fake_archive.reply(
        V4 + "getSingleImage", Reply(body=b"DICM-bytes", content_type="application/dicom")
    )
    async with make_client() as client:
        assert await client.single_image("1.2", "1.2.1") == b"DICM-bytes"
    assert fake_archive.calls(V4 + "getSingleImage")[0].query == {
        "SeriesInstanceUID": "1.2",
        "SOPInstanceUID": "1.2.1",
    }


async def collect(client: NbiaClient, uid: str) -> bytes:
    async with client.stream_series(uid) as chunks:
        return b"".join([chunk async for chunk in chunks])


async def test_stream_yields_the_whole_zip(
    make_client: ClientFactory, fake_archive: FakeArchive
) -> None:
    body = ZIP + bytes(range(256)) * 100
    pieces = tuple(body[i : i + 1000] for i in range(0, len(body), 1000))
    fake_archive.reply(V4 + "getImage", Reply(chunks=pieces, content_type="application/zip"))
    async with make_client("v4") as client:
        assert await collect(client, "1.2") == body
    assert fake_archive.calls(V4 + "getImage")[0].query == {
        "SeriesInstanceUID": "1.2",
        "IncludeMD5": "Yes",
    }


async def test_v2_stream_uses_get_image_with_md5_hash(
    make_client: ClientFactory, fake_archive: FakeArchive
) -> None:
    fake_archive.reply("oauth/token", Reply(body=json.dumps({"access_token": "tok"})))
    fake_archive.reply(V2 + "getImageWithMD5Hash", Reply(body=ZIP, content_type="application/zip"))
    async with make_client("v2") as client:
        assert await collect(client, "1.2") == ZIP
    call = fake_archive.calls(V2 + "getImageWithMD5Hash")[0]
    assert call.query == {"SeriesInstanceUID": "1.2"}
    assert call.headers["Authorization"] == "Bearer tok"


async def test_html_where_a_zip_was_expected_is_retryable(
    make_client: ClientFactory, fake_archive: FakeArchive
) -> None:
    fake_archive.reply(
        V4 + "getImage", Reply(body="<html>Internal error</html>", content_type="text/html")
    )
    async with make_client("v4", attempts=2) as client:
        with pytest.raises(RetryableError, match="text/html"):
            await collect(client, "1.2")
    assert len(fake_archive.calls(V4 + "getImage")) == 2


async def test_non_zip_bytes_with_a_zip_type_are_retryable(
    make_client: ClientFactory, fake_archive: FakeArchive
) -> None:
    fake_archive.reply(
        V4 + "getImage", Reply(body=b'{"error": "boom"}', content_type="application/octet-stream")
    )
    async with make_client("v4", attempts=1) as client:
        with pytest.raises(RetryableError, match="expected a ZIP"):
            await collect(client, "1.2")


async def test_empty_download_is_retryable(
    make_client: ClientFactory, fake_archive: FakeArchive
) -> None:
    fake_archive.reply(V4 + "getImage", Reply(body=b"", content_type="application/zip"))
    async with make_client("v4", attempts=1) as client:
        with pytest.raises(RetryableError, match="empty body"):
            await collect(client, "1.2")


async def test_stream_opening_retries_5xx(
    make_client: ClientFactory, fake_archive: FakeArchive
) -> None:
    fake_archive.reply(
        V4 + "getImage", Reply(status=503), Reply(body=ZIP, content_type="application/zip")
    )
    async with make_client("v4") as client:
        assert await collect(client, "1.2") == ZIP


async def test_connection_reset_mid_stream_is_retryable(
    make_client: ClientFactory, fake_archive: FakeArchive
) -> None:
    fake_archive.reply(
        V4 + "getImage",
        Reply(chunks=(ZIP, b"x" * 5000), content_type="application/zip", reset_after_chunks=True),
    )
    async with make_client("v4") as client:
        with pytest.raises(RetryableError, match="stream broke"):
            await collect(client, "1.2")
    assert len(fake_archive.calls(V4 + "getImage")) == 1  # mid-stream: the caller retries


async def test_stalled_stream_is_cut_by_the_read_timeout(
    make_client: ClientFactory, fake_archive: FakeArchive
) -> None:
    # read_timeout is 0.5 s in these tests; the server pauses 1 s after the first piece.
    fake_archive.reply(
        V4 + "getImage", Reply(chunks=(ZIP, b"late"), pause=1.0, content_type="application/zip")
    )
    async with make_client("v4") as client:
        with pytest.raises(RetryableError, match="stalled"):
            await collect(client, "1.2")


async def test_unverified_tls_warns_once_per_source(fake_archive: FakeArchive) -> None:
    source = SourceSettings(name="insecure-once", url=fake_archive.url, api="v4", verify_tls=False)
    with structlog.testing.capture_logs() as logs:
        for _ in range(2):
            async with NbiaClient(source, TransferSettings()):
                pass
    assert [e["event"] for e in logs].count("client.tls_verification_off") == 1
