"""`nbia-sync fetch MANIFEST`: exactly a manifest's series, no configuration, resumable.

Also the daemon's form of it: a source limited to manifests (`sources[].manifests`).
"""

from __future__ import annotations

import asyncio
import os
import pty
import signal
import sys
from pathlib import Path

import pytest
from aiohttp import web
from cli_fixtures import REPO, STATE, mirror_files, run_main, run_subprocess, write_config
from served_apps import serving

from nbia_sync.api.client import NbiaClient
from nbia_sync.catalog import Catalog
from nbia_sync.config import ScheduleSettings, SourceSettings, TransferSettings
from nbia_sync.discovery import discover
from nbia_sync.sim import SimArchive, SimFaults, SimServer
from nbia_sync.sim.testing import running_sim

pytestmark = [pytest.mark.asyncio, pytest.mark.usefixtures("restore_logging")]


def write_manifest(path: Path, uids: list[str]) -> Path:
    header = "downloadServerUrl=https://nbia.example.org/nbia-download/servlet/DownloadServlet\n"
    path.write_text(header + "includeAnnotation=true\nListOfSeriesToDownload=\n" + "\n".join(uids))
    return path


def files_of(archive: SimArchive, root: Path, uids: list[str]) -> set[Path]:
    return {
        root / s.collection / s.patient_id / s.study_uid / s.uid / f"{i.sop_uid}.dcm"
        for s in (archive.series[u] for u in uids)
        for i in s.instances
    }


def two_series(archive: SimArchive) -> list[str]:
    return sorted(archive.series)[1:3]


async def test_fetch_places_exactly_the_manifest_series(
    sim: SimServer, sim_archive: SimArchive, tmp_path: Path
) -> None:
    uids = two_series(sim_archive)
    manifest = write_manifest(tmp_path / "lung.tcia", uids)
    dest = tmp_path / "out"
    code = await run_main("fetch", str(manifest), "--dest", str(dest), "--url", sim.url)
    assert code == 0
    assert mirror_files(dest) == files_of(sim_archive, dest, uids)
    assert (dest / STATE / "catalog.sqlite").is_file()
    assert sim.counters.requests["getCollectionValues"] == 0  # no listing of the archive


async def test_fetch_again_downloads_nothing(
    sim: SimServer, sim_archive: SimArchive, tmp_path: Path
) -> None:
    manifest = write_manifest(tmp_path / "m.tcia", two_series(sim_archive))
    args = ("fetch", str(manifest), "--dest", str(tmp_path / "out"), "--url", sim.url)
    assert await run_main(*args) == 0
    started = sum(sim.counters.downloads_started.values())
    assert await run_main(*args) == 0
    assert sum(sim.counters.downloads_started.values()) == started


async def test_fetch_reads_a_plain_list_of_uids(
    sim: SimServer, sim_archive: SimArchive, tmp_path: Path
) -> None:
    uids = two_series(sim_archive)
    listing = tmp_path / "uids.txt"
    listing.write_text("\n".join(uids) + "\n")
    dest = tmp_path / "out"
    assert await run_main("fetch", str(listing), "--dest", str(dest), "--url", sim.url) == 0
    assert mirror_files(dest) == files_of(sim_archive, dest, uids)


async def test_fetch_of_a_uid_unknown_to_the_archive_exits_1(
    sim: SimServer, sim_archive: SimArchive, tmp_path: Path
) -> None:
    uids = [*two_series(sim_archive), "1.2.3.999"]
    manifest = write_manifest(tmp_path / "m.tcia", uids)
    done = await run_subprocess(
        "fetch", str(manifest), "--dest", str(tmp_path / "out"), "--url", sim.url
    )
    assert done.code == 1
    assert "unknown: 1.2.3.999" in done.stdout
    assert "2 of 3 series" in done.stdout


async def test_fetch_of_a_bad_manifest_exits_2_and_creates_nothing(tmp_path: Path) -> None:
    manifest = tmp_path / "m.tcia"
    manifest.write_text("ListOfSeriesToDownload=\n1.2.3\nrm -rf /\n")
    dest = tmp_path / "out"
    done = await run_subprocess("fetch", str(manifest), "--dest", str(dest))
    assert done.code == 2
    assert done.stderr.strip().startswith("nbia-sync: error:")
    assert "line 3" in done.stderr
    assert not dest.exists()


async def test_fetch_killed_9_then_run_again_completes(tmp_path: Path) -> None:
    archive = SimArchive.generate(seed=3, patients=3, series=2, images=4, image_size=64 * 1024)
    uids = sorted(archive.series)[:8]
    # 256 KB per series at 200 KB/s per stream: the run lasts a few seconds.
    async with running_sim(archive, SimFaults(bandwidth=200_000)) as sim:
        manifest = write_manifest(tmp_path / "m.tcia", uids)
        dest = tmp_path / "out"
        argv = ["fetch", str(manifest), "--dest", str(dest), "--url", sim.url]
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "nbia_sync",
            *argv,
            cwd=REPO,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        # Killed once downloads are under way (some streams opened, none all done).
        for _ in range(400):
            if sim.counters.bytes_sent > 0 or proc.returncode is not None:
                break
            await asyncio.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        assert await proc.wait() == -signal.SIGKILL
        assert mirror_files(dest) < files_of(archive, dest, uids)  # the kill landed mid-way
        done = await run_subprocess(*argv, limit=120)
        assert done.code == 0, done.stderr
        assert mirror_files(dest) == files_of(archive, dest, uids)


async def test_fetch_with_a_configured_source(
    sim: SimServer, sim_archive: SimArchive, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "nbia-sync.toml", tmp_path / "elsewhere", sim.url)
    uids = two_series(sim_archive)
    manifest = write_manifest(tmp_path / "m.tcia", uids)
    dest = tmp_path / "out"
    code = await run_main(
        "-c", str(config), "fetch", str(manifest), "--source", "sim", "--dest", str(dest)
    )
    assert code == 0
    assert mirror_files(dest) == files_of(sim_archive, dest, uids)
    assert not (tmp_path / "elsewhere").exists()  # the config's mirror is not touched


# ---- sources limited to manifests -------------------------------------------------------


async def test_manifest_source_syncs_only_its_series_and_refetches_updates(
    sim: SimServer, sim_archive: SimArchive, tmp_path: Path
) -> None:
    uids = two_series(sim_archive)
    write_manifest(tmp_path / "a.tcia", uids)
    root = tmp_path / "mirror"
    # A relative path: relative to the configuration file.
    config = write_config(
        tmp_path / "nbia-sync.toml", root, sim.url, source={"manifests": ["a.tcia"]}
    )
    assert await run_main("-c", str(config), "sync") == 0
    assert mirror_files(root) == files_of(sim_archive, root, uids)
    sim_archive.update_series(uids[0])  # new files, released today
    sim.counters.reset()
    assert await run_main("-c", str(config), "sync") == 0
    assert dict(sim.counters.downloads_started) == {uids[0]: 1}
    assert mirror_files(root) == files_of(sim_archive, root, uids)


async def test_manifest_source_never_lists_the_archive(tmp_path: Path, catalog: Catalog) -> None:
    """A real-shaped archive that fails every listing: a manifest-limited source must only
    ask for its series by UID (and for updates), never fall into a full listing."""
    record = {
        "SeriesInstanceUID": "1.2.3.4",
        "StudyInstanceUID": "1.2.3",
        "Collection": "C",
        "PatientID": "P",
        "Modality": "CT",
        "ImageCount": 1,
        "FileSize": 10,
        "DateReleased": "2024-01-02 03:04:05.0",
    }
    asked: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        endpoint = request.match_info["endpoint"]
        asked.append(endpoint)
        if endpoint == "getSeries" and request.query.get("SeriesInstanceUID") == "1.2.3.4":
            return web.json_response([record])
        if endpoint == "getUpdatedSeries":
            return web.json_response([])
        return web.Response(status=500, text="listing refused")

    app = web.Application()
    app.router.add_get("/nbia-api/services/v4/{endpoint}", handler)
    async with serving(app) as url:
        write_manifest(tmp_path / "a.tcia", ["1.2.3.4"])
        source = SourceSettings(name="s", url=url, api="v4", manifests=[tmp_path / "a.tcia"])
        sid = await catalog.sources.ensure_source(source)
        schedule = ScheduleSettings(full_listing_days=0)
        async with NbiaClient(source, TransferSettings(request_attempts=1)) as client:
            first = await discover(catalog, client, source, sid, schedule)
            second = await discover(catalog, client, source, sid, schedule)
    assert (first.new, first.full, second.full) == (1, True, False)
    assert set(asked) == {"getSeries", "getUpdatedSeries"}


async def test_manifest_source_with_a_missing_manifest_is_one_error(
    sim: SimServer, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path / "nbia-sync.toml", tmp_path / "m", sim.url, source={"manifests": ["gone.tcia"]}
    )
    done = await run_subprocess("-c", str(config), "sync")
    assert done.code == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("nbia-sync: error: source 'sim'") and "gone.tcia" in last


async def test_fetch_on_a_terminal_shows_files_of_the_total_logs_above_and_ends_on_its_summary(
    sim: SimServer, sim_archive: SimArchive, tmp_path: Path
) -> None:
    manifest = write_manifest(tmp_path / "m.tcia", two_series(sim_archive))
    primary, secondary = pty.openpty()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "nbia_sync",
        "fetch",
        str(manifest),
        "--dest",
        str(tmp_path / "out"),
        "--url",
        sim.url,
        "-v",  # log lines too: they must scroll above the bar, not through it
        cwd=REPO,
        stdin=secondary,
        stdout=secondary,
        stderr=secondary,
        env={**os.environ, "COLUMNS": "120", "TERM": "xterm"},
    )
    os.close(secondary)

    def read_all() -> bytes:
        chunks = []
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # EIO: the child closed the terminal
                return b"".join(chunks)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)

    output = (await asyncio.to_thread(read_all)).decode(errors="replace")
    os.close(primary)
    assert await proc.wait() == 0
    assert "files 6/6" in output  # 2 series of 3 images each: done of the total
    # The bar is gone at the end: the last lines are the command's summary.
    lines = [line for line in output.replace("\r", "\n").splitlines() if line.strip()]
    assert lines[-1].startswith("fetch: 2 of 2 series")
    assert "waiting for the queue" not in lines[-2]
    logged = [line for line in lines if "series_done" in line]
    assert len(logged) == 2 and not any("files " in line for line in logged)
