"""Series downloads: the ZIP's structure, every fault, and the counters."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import time
import zipfile
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest
import pytest_asyncio
from multidict import CIMultiDictProxy

from nbia_sync.sim import SimArchive, SimCounters, SimFaults, SimServer
from nbia_sync.sim.testing import running_sim

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@dataclass(frozen=True)
class Fetched:
    status: int
    headers: CIMultiDictProxy[str]
    content_type: str
    body: bytes


async def _fetch(
    http: aiohttp.ClientSession,
    sim: SimServer,
    uid: str,
    endpoint: str = "getImageWithMD5Hash",
    **params: str,
) -> Fetched:
    """A v4 download (no token needed), read whole."""
    url = f"{sim.url}services/v4/{endpoint}"
    async with http.get(url, params={"SeriesInstanceUID": uid, **params}) as r:
        return Fetched(r.status, r.headers, r.content_type, await r.read())


async def _zip(http: aiohttp.ClientSession, sim: SimServer, uid: str, **kw: str) -> zipfile.ZipFile:
    r = await _fetch(http, sim, uid, **kw)
    assert r.status == 200
    return zipfile.ZipFile(io.BytesIO(r.body))


def _hashes(archive: zipfile.ZipFile) -> dict[str, str]:
    rows = list(csv.DictReader(io.StringIO(archive.read("md5hashes.csv").decode())))
    return {row["Filename"]: row["MD5Hash"] for row in rows}


def _uid(sim: SimServer) -> str:
    return next(iter(sim.archive.series))


# ---- structure -----------------------------------------------------------------------


async def test_md5_zip_has_numbered_files_then_md5hashes_last(
    http: aiohttp.ClientSession, sim: SimServer
) -> None:
    uid = _uid(sim)
    archive = await _zip(http, sim, uid)
    assert archive.namelist() == ["00000001.dcm", "00000002.dcm", "00000003.dcm", "md5hashes.csv"]
    assert archive.testzip() is None


async def test_md5hashes_match_the_files_and_the_truth(
    http: aiohttp.ClientSession, sim: SimServer
) -> None:
    uid = _uid(sim)
    archive = await _zip(http, sim, uid)
    hashes = _hashes(archive)
    for name, md5 in hashes.items():
        assert hashlib.md5(archive.read(name)).hexdigest() == md5
    assert sorted(hashes.values()) == sorted(sim.archive.truth()[uid].values())


async def test_md5hashes_csv_is_unquoted_with_its_header(
    http: aiohttp.ClientSession, sim: SimServer
) -> None:
    text = (await _zip(http, sim, _uid(sim))).read("md5hashes.csv").decode()
    lines = text.splitlines()
    assert lines[0] == "Filename,MD5Hash"
    assert '"' not in text
    assert sorted(lines[1:]) != lines[1:] or len(lines) < 3  # shuffled for this series


async def test_download_headers_stream_without_length(
    http: aiohttp.ClientSession, sim: SimServer
) -> None:
    uid = _uid(sim)
    r = await _fetch(http, sim, uid)
    assert r.headers["Content-Type"] == "application/zip"
    assert r.headers["Content-Disposition"] == f'attachment; filename="{uid}.zip"'
    assert "Content-Length" not in r.headers
    assert r.headers["Transfer-Encoding"] == "chunked"


async def test_get_image_puts_license_first_and_md5_only_when_asked(
    http: aiohttp.ClientSession, sim: SimServer
) -> None:
    uid = _uid(sim)
    plain = await _zip(http, sim, uid, endpoint="getImage")
    s = sim.archive.series[uid]
    assert plain.namelist() == ["LICENSE"] + [f"{i.sop_uid}.dcm" for i in s.instances]
    named = await _zip(http, sim, uid, endpoint="getImage", NewFileNames="Yes", IncludeMD5="Yes")
    assert named.namelist() == ["LICENSE", "1-001.dcm", "1-002.dcm", "1-003.dcm", "md5hashes.csv"]
    assert set(_hashes(named)) == {"1-001.dcm", "1-002.dcm", "1-003.dcm"}


async def test_v2_download_needs_a_token(http: aiohttp.ClientSession, sim: SimServer) -> None:
    url = f"{sim.url}services/v2/getImageWithMD5Hash"
    async with http.get(url, params={"SeriesInstanceUID": _uid(sim)}) as r:
        assert r.status == 401


async def test_unknown_series_gives_an_empty_archive(
    http: aiohttp.ClientSession, sim: SimServer
) -> None:
    archive = await _zip(http, sim, "1.2.3.4")
    assert archive.namelist() == ["md5hashes.csv"]
    assert _hashes(archive) == {}


async def test_deflate_mode_sends_deflated_entries_with_descriptors(
    http: aiohttp.ClientSession,
) -> None:
    async with running_sim(compression="deflate") as sim:
        uid = _uid(sim)
        archive = await _zip(http, sim, uid)
    infos = archive.infolist()
    assert all(i.compress_type == zipfile.ZIP_DEFLATED for i in infos)
    assert all(i.flag_bits & 0x08 for i in infos)
    hashes = _hashes(archive)
    assert all(hashlib.md5(archive.read(n)).hexdigest() == h for n, h in hashes.items())


async def test_big_files_stream_in_bounded_chunks(http: aiohttp.ClientSession) -> None:
    archive = SimArchive.generate(patients=1, series=1, images=2, image_size=5_000_000)
    async with running_sim(archive) as sim:
        uid = _uid(sim)
        zipped = await _zip(http, sim, uid)
    assert _hashes(zipped) == {
        f"{n:08d}.dcm": i.md5 for n, i in enumerate(archive.series[uid].instances, 1)
    }
    assert zipped.getinfo("00000001.dcm").file_size == archive.series[uid].instances[0].size


async def _chunk_sizes(sim: SimServer, uid: str) -> list[int]:
    """The sizes of the chunked body's chunks, read off the raw socket: each is one write
    of the server, however TCP cut them up."""
    host, port = sim.url.split("//")[1].split("/")[0].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"GET /nbia-api/services/v4/getImageWithMD5Hash?SeriesInstanceUID={uid} HTTP/1.1\r\n"
        f"Host: {host}\r\nConnection: close\r\n\r\n".encode()
    )
    raw = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    sizes = []
    while True:
        line, _, body = body.partition(b"\r\n")
        size = int(line, 16)
        if size == 0:
            return sizes
        sizes.append(size)
        body = body[size + 2 :]


async def test_a_small_series_leaves_in_one_write_as_from_the_archive() -> None:
    # The archive buffers its ZIP 8 KiB at a time (V4_getImageWithMD5Hash wraps the
    # response in a BufferedOutputStream): a few KB arrive in one piece, not one per record.
    archive = SimArchive.generate(patients=1, series=1, images=2, image_size=1500)
    async with running_sim(archive) as sim:
        sizes = await _chunk_sizes(sim, _uid(sim))
    assert len(sizes) == 1 and sizes[0] < 8192


async def test_a_larger_series_leaves_in_buffer_fulls_of_up_to_8_kib() -> None:
    archive = SimArchive.generate(patients=1, series=1, images=20, image_size=3000)
    async with running_sim(archive) as sim:
        sizes = await _chunk_sizes(sim, _uid(sim))
    # 20 files of ~3 KB and their headers: many records, a few buffer-fulls.
    assert 5 <= len(sizes) <= 10
    assert all(size > 8192 - 3200 for size in sizes[:-1])
    assert all(size <= 8192 for size in sizes)


# ---- faults --------------------------------------------------------------------------


async def test_truncate_closes_a_valid_zip_without_md5hashes(
    http: aiohttp.ClientSession, sim: SimServer
) -> None:
    uid = _uid(sim)
    sim.faults.script_series(uid, ["truncate"])
    archive = await _zip(http, sim, uid)
    assert archive.testzip() is None
    assert "md5hashes.csv" not in archive.namelist()
    assert len(archive.namelist()) < sim.archive.series[uid].image_count
    assert sim.counters.downloads_completed[uid] == 0


async def test_corrupt_file_mismatches_its_md5(http: aiohttp.ClientSession, sim: SimServer) -> None:
    uid = _uid(sim)
    sim.faults.script_series(uid, ["corrupt"])
    archive = await _zip(http, sim, uid)
    assert archive.testzip() is None  # the ZIP itself is consistent
    hashes = _hashes(archive)
    bad = [n for n, h in hashes.items() if hashlib.md5(archive.read(n)).hexdigest() != h]
    assert len(bad) == 1
    assert sorted(hashes.values()) == sorted(sim.archive.truth()[uid].values())


async def test_corrupt_in_deflate_mode_mismatches_too(http: aiohttp.ClientSession) -> None:
    async with running_sim(compression="deflate") as sim:
        uid = _uid(sim)
        sim.faults.script_series(uid, ["corrupt"])
        archive = await _zip(http, sim, uid)
    hashes = _hashes(archive)
    assert sum(hashlib.md5(archive.read(n)).hexdigest() != h for n, h in hashes.items()) == 1


async def test_reset_raises_on_the_client(http: aiohttp.ClientSession, sim: SimServer) -> None:
    uid = _uid(sim)
    sim.faults.script_series(uid, ["reset"])
    with pytest.raises(aiohttp.ClientPayloadError):
        await _fetch(http, sim, uid)
    assert sim.counters.downloads_started[uid] == 1
    assert sim.counters.downloads_completed[uid] == 0


async def test_stall_stops_sending_then_resets(http: aiohttp.ClientSession, sim: SimServer) -> None:
    uid = _uid(sim)
    sim.faults.stall_seconds = 0.3
    sim.faults.script_series(uid, ["stall"])
    start = time.monotonic()
    with pytest.raises(aiohttp.ClientPayloadError):
        await _fetch(http, sim, uid)
    assert time.monotonic() - start >= 0.3


async def test_stall_trips_a_client_read_timeout(
    http: aiohttp.ClientSession, sim: SimServer
) -> None:
    uid = _uid(sim)
    sim.faults.stall_seconds = 5
    sim.faults.script_series(uid, ["stall"])
    url = f"{sim.url}services/v4/getImageWithMD5Hash"
    timeout = aiohttp.ClientTimeout(sock_read=0.2)
    with pytest.raises(asyncio.TimeoutError):
        async with http.get(url, params={"SeriesInstanceUID": uid}, timeout=timeout) as r:
            await r.read()


async def test_hostile_archive_has_an_escaping_entry(
    http: aiohttp.ClientSession, sim: SimServer
) -> None:
    uid = _uid(sim)
    sim.faults.script_series(uid, ["hostile"])
    names = (await _zip(http, sim, uid)).namelist()
    assert names[0] in ("../../evil.dcm", "/etc/evil.dcm")


async def test_html_instead_of_zip_is_200_text_html(
    http: aiohttp.ClientSession, sim: SimServer
) -> None:
    uid = _uid(sim)
    sim.faults.script_series(uid, ["html"])
    r = await _fetch(http, sim, uid)
    assert r.status == 200
    assert r.content_type == "text/html"
    assert not zipfile.is_zipfile(io.BytesIO(r.body))


async def test_script_runs_in_order_then_downloads_are_normal(
    http: aiohttp.ClientSession, sim: SimServer
) -> None:
    uid = _uid(sim)
    sim.faults.script_series(uid, ["5xx", "429", "truncate"])
    assert (await _fetch(http, sim, uid)).status in (500, 502, 503)
    assert (await _fetch(http, sim, uid)).status == 429
    assert "md5hashes.csv" not in (await _zip(http, sim, uid)).namelist()
    assert "md5hashes.csv" in (await _zip(http, sim, uid)).namelist()
    assert sim.counters.downloads_completed[uid] == 1


async def test_unknown_scripted_fault_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown"):
        SimFaults().script_series("1.2", ["explode"])  # type: ignore[list-item]


async def test_5xx_rate_answers_html_on_queries(
    http: aiohttp.ClientSession, sim: SimServer
) -> None:
    sim.faults.error_5xx = 1.0
    async with http.get(sim.url + "services/v4/getCollectionValues") as r:
        assert r.status in (500, 502, 503)
        assert r.content_type == "text/html"
    assert sum(n for code, n in sim.counters.statuses.items() if code >= 500) == 1


async def test_429_carries_retry_after(http: aiohttp.ClientSession, sim: SimServer) -> None:
    sim.faults = SimFaults(rate_429=1.0, retry_after=3)
    async with http.get(sim.url + "services/v4/getCollectionValues") as r:
        assert (r.status, r.headers["Retry-After"]) == (429, "3")


async def test_random_rates_are_roughly_respected(
    http: aiohttp.ClientSession, sim: SimServer
) -> None:
    sim.faults = SimFaults(truncate=0.5, seed=3)
    uid = _uid(sim)
    for _ in range(40):
        await _fetch(http, sim, uid)
    assert 8 <= sim.counters.downloads_completed[uid] <= 32


async def test_latency_delays_every_response(http: aiohttp.ClientSession, sim: SimServer) -> None:
    sim.faults.latency = 0.2
    start = time.monotonic()
    async with http.get(sim.url + "services/v4/getCollectionValues") as r:
        assert r.status == 200
    assert time.monotonic() - start >= 0.2


async def test_bandwidth_cap_slows_a_stream(http: aiohttp.ClientSession) -> None:
    archive = SimArchive.generate(patients=1, series=1, images=1, image_size=200_000)
    async with running_sim(archive, SimFaults(bandwidth=500_000)) as sim:
        start = time.monotonic()
        await _zip(http, sim, _uid(sim))
        elapsed = time.monotonic() - start
    assert 0.35 <= elapsed <= 1.5  # 200 KB at 500 KB/s = 0.4 s


# ---- counters and concurrency --------------------------------------------------------


async def test_counters_count_requests_streams_and_bytes(
    http: aiohttp.ClientSession, sim: SimServer
) -> None:
    uids = list(sim.archive.series)[:4]
    responses = await asyncio.gather(*(_fetch(http, sim, u) for u in uids))
    c = sim.counters
    assert c.requests["getImageWithMD5Hash"] == 4
    assert c.statuses[200] == 4
    assert all(c.downloads_started[u] == 1 and c.downloads_completed[u] == 1 for u in uids)
    assert c.streams_current == 0
    assert 1 <= c.streams_max <= 4
    body_bytes = sum(len(r.body) for r in responses)
    assert c.bytes_sent == body_bytes


async def test_dozens_of_concurrent_streams(http: aiohttp.ClientSession) -> None:
    archive = SimArchive.generate(collections=("MANY",), patients=40, series=1, images=2)
    faults = SimFaults(bandwidth=50_000)  # keeps each stream open long enough to overlap
    async with running_sim(archive, faults) as sim:
        connector = aiohttp.TCPConnector(limit=40)
        async with aiohttp.ClientSession(connector=connector) as many:
            zips = await asyncio.gather(*(_zip(many, sim, u) for u in archive.series))
        assert sim.counters.streams_max >= 20
        assert sim.counters.streams_current == 0
    assert all("md5hashes.csv" in z.namelist() for z in zips)


async def test_client_hanging_up_closes_the_stream(http: aiohttp.ClientSession) -> None:
    archive = SimArchive.generate(patients=1, series=1, images=1, image_size=2_000_000)
    async with running_sim(archive, SimFaults(bandwidth=200_000)) as sim:
        url = f"{sim.url}services/v4/getImageWithMD5Hash"
        async with http.get(url, params={"SeriesInstanceUID": _uid(sim)}) as r:
            await r.content.read(10_000)
            assert sim.counters.streams_current == 1
            r.close()
        for _ in range(50):
            if sim.counters.streams_current == 0:
                break
            await asyncio.sleep(0.02)
        assert sim.counters.streams_current == 0


async def test_counters_reset_zeroes_everything(
    http: aiohttp.ClientSession, sim: SimServer
) -> None:
    await _fetch(http, sim, _uid(sim))
    assert sim.counters.bytes_sent > 0
    sim.counters.reset()
    assert sim.counters == SimCounters()
