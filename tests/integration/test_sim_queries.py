"""The simulator's query endpoints, per API version, over loopback HTTP."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from nbia_sync.sim import SimArchive, SimServer
from nbia_sync.sim.testing import guest_token, running_sim

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


class Api:
    def __init__(self, http: aiohttp.ClientSession, sim: SimServer, token: str) -> None:
        self.http, self.sim, self.token = http, sim, token

    async def raw(self, version: str, endpoint: str, **params: str) -> tuple[int, bytes]:
        headers = {"Authorization": f"Bearer {self.token}"} if version != "v4" else {}
        url = f"{self.sim.url}services/{version}/{endpoint}"
        async with self.http.get(url, params=params, headers=headers) as r:
            return r.status, await r.read()

    async def rows(self, version: str, endpoint: str, **params: str) -> list[dict[str, Any]]:
        async with self.http.get(
            f"{self.sim.url}services/{version}/{endpoint}",
            params=params,
            headers={"Authorization": f"Bearer {self.token}"},
        ) as r:
            assert r.status == 200, await r.text()
            body = await r.read()
        return [] if not body else list(await r.json())


@pytest_asyncio.fixture
async def api(http: aiohttp.ClientSession, sim: SimServer) -> Api:
    return Api(http, sim, await guest_token(http, sim.url))


def _series_in(archive: SimArchive, collection: str) -> set[str]:
    return {s.uid for s in archive.in_collection(collection)}


async def test_collection_values_lists_every_collection(api: Api) -> None:
    rows = await api.rows("v2", "getCollectionValues")
    assert rows == [{"Collection": "SIM-CT"}, {"Collection": "SIM-MR"}]


async def test_modality_and_body_part_values_are_distinct_columns(api: Api) -> None:
    assert await api.rows("v2", "getModalityValues", Collection="SIM-MR") == [{"Modality": "MR"}]
    parts = await api.rows("v1", "getBodyPartValues", Collection="SIM-CT")
    expected = {s.body_part for s in api.sim.archive.in_collection("SIM-CT")} - {None}
    assert {r["BodyPartExamined"] for r in parts} == expected


async def test_get_patient_uses_patientid_on_v2_and_patientid_lowercase_d_on_v4(api: Api) -> None:
    v2 = await api.rows("v2", "getPatient", Collection="SIM-CT")
    v4 = await api.rows("v4", "getPatient", Collection="SIM-CT")
    assert [r["PatientID"] for r in v2] == ["SIM-CT-0001", "SIM-CT-0002"]
    assert [r["PatientId"] for r in v4] == ["SIM-CT-0001", "SIM-CT-0002"]
    assert "PatientID" not in v4[0]


async def test_get_patient_study_counts_series(api: Api) -> None:
    rows = await api.rows("v2", "getPatientStudy", Collection="SIM-CT", PatientID="SIM-CT-0001")
    assert len(rows) == 1
    assert rows[0]["SeriesCount"] == 2
    assert rows[0]["PatientID"] == "SIM-CT-0001"


async def test_get_series_filters_by_collection(api: Api) -> None:
    rows = await api.rows("v2", "getSeries", Collection="SIM-MR")
    assert {r["SeriesInstanceUID"] for r in rows} == _series_in(api.sim.archive, "SIM-MR")


async def test_get_series_v2_columns_and_formats(api: Api) -> None:
    rows = await api.rows("v2", "getSeries", Collection="SIM-CT")
    by_uid = {r["SeriesInstanceUID"]: r for r in rows}
    for uid, s in ((u, api.sim.archive.series[u]) for u in by_uid):
        row = by_uid[uid]
        assert row["ImageCount"] == s.image_count
        assert int(row["FileSize"]) == s.file_size
        assert row["DateReleased"] == s.date_released.strftime("%Y-%m-%d %H:%M:%S.0")
        assert "TimeStamp" in row and "CollectionURI" in row
        assert "Site" not in row


async def test_get_series_v4_column_set(api: Api) -> None:
    rows = await api.rows("v4", "getSeries", Collection="SIM-CT")
    assert all("TimeStamp" not in r and "CollectionURI" not in r for r in rows)
    assert all({"Site", "ReleasedStatus", "StudyDate", "PatientSex"} <= set(r) for r in rows)
    assert all(isinstance(r["FileSize"], str) for r in rows)


async def test_numbers_are_sometimes_strings(api: Api) -> None:
    rows = await api.rows("v2", "getSeries")
    kinds = {type(r["FileSize"]) for r in rows}
    assert kinds == {int, str}


async def test_unpopulated_attributes_are_omitted() -> None:
    archive = SimArchive.generate(patients=6)
    missing = next(s for s in archive.series.values() if s.body_part is None)
    async with running_sim(archive) as sim, aiohttp.ClientSession() as http:
        api = Api(http, sim, "")
        rows = await api.rows("v4", "getSeries", SeriesInstanceUID=missing.uid)
    assert len(rows) == 1
    assert "BodyPartExamined" not in rows[0]
    assert all(v is not None for v in rows[0].values())


async def test_no_results_is_200_with_an_empty_body(api: Api) -> None:
    assert await api.raw("v2", "getSeries", Collection="NOPE") == (200, b"")


async def test_unknown_parameter_is_400(api: Api) -> None:
    status, body = await api.raw("v2", "getSeries", Colection="SIM-CT")
    assert (status, body) == (400, b"Invalid query parameter")


async def test_unknown_endpoint_is_404(api: Api) -> None:
    assert (await api.raw("v2", "getEverything"))[0] == 404


async def test_csv_format(api: Api) -> None:
    status, body = await api.raw("v2", "getCollectionValues", format="csv")
    assert status == 200
    assert list(csv.DictReader(io.StringIO(body.decode()))) == [
        {"Collection": "SIM-CT"},
        {"Collection": "SIM-MR"},
    ]


async def test_series_size_metadata_and_sop_uids(api: Api) -> None:
    s = next(iter(api.sim.archive.series.values()))
    size = await api.rows("v2", "getSeriesSize", SeriesInstanceUID=s.uid)
    assert size == [{"TotalSizeInBytes": f"{s.file_size}.0", "ObjectCount": s.image_count}]
    meta = await api.rows("v2", "getSeriesMetaData", SeriesInstanceUID=s.uid)
    assert meta[0]["Series UID"] == s.uid
    assert meta[0]["Number of Images"] == str(s.image_count)
    sops = await api.rows("v2", "getSOPInstanceUIDs", SeriesInstanceUID=s.uid)
    assert [r["SOPInstanceUID"] for r in sops] == [i.sop_uid for i in s.instances]


async def test_get_single_image_returns_the_dicom_file(api: Api) -> None:
    s = next(iter(api.sim.archive.series.values()))
    inst = s.instances[1]
    status, body = await api.raw(
        "v2", "getSingleImage", SeriesInstanceUID=s.uid, SOPInstanceUID=inst.sop_uid
    )
    assert (status, body) == (200, inst.read())


async def test_missing_required_parameter_is_400(api: Api) -> None:
    assert (await api.raw("v2", "getSeriesSize"))[0] == 400


# ---- dates ---------------------------------------------------------------------------


def _released(archive: SimArchive, uid: str, when: datetime) -> None:
    archive.update_series(uid, released=when)


async def test_updated_series_is_strictly_after_the_date_dd_mm_yyyy_on_v2(api: Api) -> None:
    archive = api.sim.archive
    uids = list(archive.series)
    for uid in uids:
        _released(archive, uid, datetime(2020, 1, 1, 10))
    _released(archive, uids[0], datetime(2023, 2, 1, 10))  # 1 Feb
    _released(archive, uids[1], datetime(2023, 2, 2, 0, 0, 1))
    # 01/02/2023 is 1 February on the server (dd/MM/yyyy): strictly after excludes uids[0].
    rows = await api.rows("v2", "getUpdatedSeries", fromDate="01/02/2023")
    assert {r["SeriesInstanceUID"] for r in rows} == {uids[1]}


async def test_updated_series_takes_mm_dd_yyyy_on_v4(api: Api) -> None:
    archive = api.sim.archive
    uids = list(archive.series)
    for uid in uids:
        _released(archive, uid, datetime(2020, 1, 1, 10))
    _released(archive, uids[2], datetime(2023, 2, 2, 9))
    rows = await api.rows("v4", "getUpdatedSeries", fromDate="02-01-2023")
    assert {r["SeriesInstanceUID"] for r in rows} == {uids[2]}


@pytest.mark.parametrize(
    ("version", "endpoint", "params"),
    [
        ("v2", "getUpdatedSeries", {"fromDate": "2023-02-01"}),
        ("v2", "getUpdatedSeries", {"fromDate": "31/31/2023"}),
        ("v4", "getUpdatedSeries", {"fromDate": "01/02/2023"}),
        ("v2", "NewPatientsInCollection", {"Collection": "SIM-CT", "Date": "01/02/2023"}),
        ("v4", "NewPatientsInCollection", {"Collection": "SIM-CT", "fromDate": "2023/02/01"}),
    ],
)
async def test_malformed_dates_are_400(
    api: Api, version: str, endpoint: str, params: dict[str, str]
) -> None:
    assert (await api.raw(version, endpoint, **params))[0] == 400


async def test_v4_new_patients_rejects_the_v2_date_parameter(api: Api) -> None:
    status, _ = await api.raw(
        "v4", "NewPatientsInCollection", Collection="SIM-CT", Date="2023/02/01"
    )
    assert status == 400


async def test_new_patients_and_studies_include_the_day_itself(api: Api) -> None:
    archive = api.sim.archive
    added = archive.add_patient("SIM-CT", released=datetime(2025, 6, 1, 23, 59))
    v2 = await api.rows("v2", "NewPatientsInCollection", Collection="SIM-CT", Date="2025/06/01")
    v4 = await api.rows("v4", "NewPatientsInCollection", Collection="SIM-CT", fromDate="06-01-2025")
    assert [r["PatientID"] for r in v2] == [added[0].patient_id]
    assert [r["PatientId"] for r in v4] == [added[0].patient_id]
    studies = await api.rows(
        "v2", "NewStudiesInPatientCollection", Collection="SIM-CT", Date="2025/06/01"
    )
    assert [r["StudyInstanceUID"] for r in studies] == [added[0].study_uid]
    later = await api.rows("v2", "NewPatientsInCollection", Collection="SIM-CT", Date="2025/06/02")
    assert later == []


async def test_nothing_is_updated_after_the_last_initial_release(api: Api) -> None:
    rows = await api.rows("v2", "getUpdatedSeries", fromDate="31/12/2024")
    assert rows == []


# ---- restricted collections ----------------------------------------------------------


async def test_restricted_collection_is_400_for_others_and_open_to_its_users(
    http: aiohttp.ClientSession,
) -> None:
    users = {"nbia_guest": "", "alice": "secret"}
    async with running_sim(users=users, restricted={"SIM-MR": {"alice"}}) as sim:
        guest = Api(http, sim, await guest_token(http, sim.url))
        alice = Api(http, sim, await guest_token(http, sim.url, "alice", "secret"))
        assert await guest.rows("v2", "getCollectionValues") == [{"Collection": "SIM-CT"}]
        assert (await guest.raw("v2", "getSeries", Collection="SIM-MR"))[0] == 400
        assert (await guest.raw("v4", "getSeries", Collection="SIM-MR"))[0] == 400
        rows = await alice.rows("v2", "getSeries", Collection="SIM-MR")
        assert {r["SeriesInstanceUID"] for r in rows} == _series_in(sim.archive, "SIM-MR")
        hidden = next(iter(_series_in(sim.archive, "SIM-MR")))
        status, _ = await guest.raw("v2", "getImageWithMD5Hash", SeriesInstanceUID=hidden)
        assert status == 400
