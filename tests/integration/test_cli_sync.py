"""sync, status, verify, retry-failed and add-manifest end to end against the simulator."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
from cli_fixtures import (
    REPO,
    SimMirror,
    assert_mirror_is_truth,
    expected_files,
    free_port,
    mirror_files,
    run_main,
    run_subprocess,
    write_config,
)
from sqlalchemy.exc import OperationalError

from nbia_sync.catalog.models import SeriesState

pytestmark = [pytest.mark.asyncio, pytest.mark.usefixtures("restore_logging")]


def assert_mirror_complete(m: SimMirror) -> None:
    assert_mirror_is_truth(m.archive, m.root)


async def status_json(m: SimMirror) -> dict[str, object]:
    done = await run_subprocess("-c", str(m.config), "status", "--json")
    assert done.code == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result


async def test_sync_mirrors_every_file_and_exits_0(sim_mirror: SimMirror) -> None:
    done = await run_subprocess("-c", str(sim_mirror.config), "sync")
    assert done.code == 0, done.stderr
    assert "sync ok" in done.stdout
    assert_mirror_complete(sim_mirror)


@pytest.mark.parametrize("event_loop", ["auto", "asyncio"])
async def test_sync_runs_on_the_event_loop_the_config_names(
    event_loop: str, sim_mirror: SimMirror, tmp_path: Path
) -> None:
    if event_loop == "auto":
        pytest.importorskip("uvloop", reason="uvloop is not built for this platform")
    config = write_config(
        tmp_path / "loop.toml",
        sim_mirror.root,
        sim_mirror.server.url,
        transfer={"event_loop": event_loop},
        sections={"logging": {"level": "debug", "format": "json"}},
    )
    done = await run_subprocess("-c", str(config), "sync")
    assert done.code == 0, done.stderr
    events = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    loops = [e["loop"] for e in events if e["event"] == "event_loop"]
    assert loops == ["uvloop" if event_loop == "auto" else "asyncio"]
    assert_mirror_complete(sim_mirror)


async def test_second_sync_downloads_nothing(sim_mirror: SimMirror) -> None:
    assert await run_main("-c", str(sim_mirror.config), "sync") == 0
    before = sum(sim_mirror.server.counters.downloads_started.values())
    assert await run_main("-c", str(sim_mirror.config), "sync") == 0
    assert sum(sim_mirror.server.counters.downloads_started.values()) == before


async def test_permanent_failure_exits_1_and_keeps_the_rest(sim_mirror: SimMirror) -> None:
    victim = next(iter(sim_mirror.archive.series))
    sim_mirror.server.faults.script_series(victim, ["hostile"])
    assert await run_main("-c", str(sim_mirror.config), "sync") == 1
    placed = {p.parent.name for p in mirror_files(sim_mirror.root)}
    assert placed == set(sim_mirror.archive.series) - {victim}


async def test_status_json_shape(sim_mirror: SimMirror) -> None:
    victim = next(iter(sim_mirror.archive.series))
    sim_mirror.server.faults.script_series(victim, ["hostile"])
    assert await run_main("-c", str(sim_mirror.config), "sync") == 1
    status = await status_json(sim_mirror)
    assert set(status) == {
        "catalog",
        "mirror",
        "series",
        "unverified",
        "last_run",
        "failures",
        "workers",
        "withdrawn",
    }
    assert status["unverified"] == {"series": 0, "files": 0}
    series = status["series"]
    assert isinstance(series, dict)
    assert set(series) == {s.value for s in SeriesState}
    total = len(sim_mirror.archive.series)
    assert series["done"]["count"] == total - 1 and series["failed"]["count"] == 1
    assert series["done"]["bytes"] > 0
    last_run = status["last_run"]
    assert isinstance(last_run, dict)
    assert (last_run["command"], last_run["outcome"]) == ("sync", "failures")
    assert last_run["done"] == total - 1
    failures = status["failures"]
    assert isinstance(failures, list) and len(failures) == 1
    assert failures[0]["series_uid"] == victim and failures[0]["state"] == "failed"
    assert failures[0]["source"] == "sim"
    assert status["workers"] == []  # the sync process unregistered itself


async def test_status_text_shows_states_and_failures(sim_mirror: SimMirror) -> None:
    victim = next(iter(sim_mirror.archive.series))
    sim_mirror.server.faults.script_series(victim, ["hostile"])
    await run_main("-c", str(sim_mirror.config), "sync")
    done = await run_subprocess("-c", str(sim_mirror.config), "status")
    assert done.code == 0
    assert "done" in done.stdout and victim in done.stdout
    assert "processes: none running" in done.stdout


async def test_status_shows_files_placed_without_an_md5(sim_mirror: SimMirror) -> None:
    sim_mirror.server.faults.md5_blank = 1.0  # the archive lists no hash for any file
    assert await run_main("-c", str(sim_mirror.config), "sync") == 0
    assert_mirror_complete(sim_mirror)
    files = len(expected_files(sim_mirror.archive, sim_mirror.root))
    series = len(sim_mirror.archive.series)
    done = await run_subprocess("-c", str(sim_mirror.config), "status")
    assert f"unverified: {files} files in {series} series" in done.stdout
    status = await status_json(sim_mirror)
    assert status["unverified"] == {"series": series, "files": files}


async def test_retry_failed_then_sync_completes(sim_mirror: SimMirror) -> None:
    victim = next(iter(sim_mirror.archive.series))
    sim_mirror.server.faults.script_series(victim, ["hostile"])
    assert await run_main("-c", str(sim_mirror.config), "sync") == 1
    done = await run_subprocess("-c", str(sim_mirror.config), "retry-failed")
    assert done.code == 0 and "1 series queued again" in done.stdout
    assert await run_main("-c", str(sim_mirror.config), "sync") == 0
    assert_mirror_complete(sim_mirror)


async def test_verify_clean_mirror_exits_0(sim_mirror: SimMirror) -> None:
    assert await run_main("-c", str(sim_mirror.config), "sync") == 0
    done = await run_subprocess("-c", str(sim_mirror.config), "verify")
    assert done.code == 0, done.stdout + done.stderr
    assert done.stdout == ""
    files = len(expected_files(sim_mirror.archive, sim_mirror.root))
    assert f"{files} of {files} files match" in done.stderr


async def test_verify_names_tampered_missing_and_extra_files(sim_mirror: SimMirror) -> None:
    assert await run_main("-c", str(sim_mirror.config), "sync") == 0
    tampered, missing = sorted(mirror_files(sim_mirror.root))[:2]
    data = bytearray(tampered.read_bytes())
    data[-1] ^= 0x01
    tampered.write_bytes(bytes(data))
    missing.unlink()
    extra = tampered.parent / "stray.dcm"
    extra.write_bytes(b"not ours")
    done = await run_subprocess("-c", str(sim_mirror.config), "verify")
    assert done.code == 1
    lines = sorted(done.stdout.splitlines())

    def rel(path: Path) -> str:
        return path.relative_to(sim_mirror.root).as_posix()

    assert len(lines) == 3
    assert any(line.startswith(f"differs: {rel(tampered)} (md5 ") for line in lines)
    assert f"missing: {rel(missing)}" in lines
    assert f"extra: {rel(extra)}" in lines


async def test_unreachable_source_exits_2_naming_it(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/nbia-api/"
    config = write_config(
        tmp_path / "c.toml", tmp_path / "m", url, transfer={"request_attempts": 1}
    )
    done = await run_subprocess("-c", str(config), "sync")
    assert done.code == 2
    [line] = [x for x in done.stderr.splitlines() if x.startswith("nbia-sync: error:")]
    assert "source 'sim'" in line
    assert "Traceback" not in done.stderr


async def test_refused_credentials_exit_2(sim_mirror: SimMirror, tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "bad-user.toml",
        sim_mirror.root,
        sim_mirror.server.url,
        source={"username": "mallory", "password": "wrong-pw"},
    )
    done = await run_subprocess("-c", str(config), "sync")
    assert done.code == 2
    assert "source 'sim'" in done.stderr
    assert "wrong-pw" not in done.stderr + done.stdout
    assert "Traceback" not in done.stderr


def error_lines(stderr: str) -> list[str]:
    return [x for x in stderr.splitlines() if x.startswith("nbia-sync: error:")]


async def test_catalog_error_mid_pass_exits_2_with_one_line(
    sim_mirror: SimMirror, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from nbia_sync.catalog import queue

    real, calls = queue._claim_in, 0

    def claim_in(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls > 1:  # the catalog's disk fills up after the first claim
            raise OperationalError("UPDATE series", {}, Exception("database or disk is full"))
        return real(*args, **kwargs)

    monkeypatch.setattr(queue, "_claim_in", claim_in)
    assert await run_main("-c", str(sim_mirror.config), "sync") == 2
    err = capsys.readouterr().err
    [line] = error_lines(err)
    assert "database or disk is full" in line and "catalog" in line
    assert "TaskGroup" not in line and "unexpected" not in line
    assert "Traceback" not in err


async def test_credentials_revoked_mid_pass_exit_2_and_fail_no_series(
    sim_mirror: SimMirror, capsys: pytest.CaptureFixture[str]
) -> None:
    sim = sim_mirror.server
    sim.faults.bandwidth = 20_000

    async def revoke_when_downloading() -> None:
        while True:  # the simulator has no event for it: poll its counters
            if sim.counters.downloads_started:
                break
            await asyncio.sleep(0.01)
        sim.users.clear()  # the password no longer works: no token can be renewed
        sim.revoke_all_tokens()

    revoker = asyncio.create_task(revoke_when_downloading())
    try:
        code = await asyncio.wait_for(run_main("-c", str(sim_mirror.config), "sync"), 60)
    finally:
        revoker.cancel()
    assert code == 2
    err = capsys.readouterr().err
    [line] = error_lines(err)
    assert "source 'sim'" in line and "credentials" in line
    assert "Traceback" not in err
    sim.users["nbia_guest"] = ""  # access restored: nothing was marked failed
    status = await status_json(sim_mirror)
    series = status["series"]
    assert isinstance(series, dict)
    assert series["failed"]["count"] == 0 and series["downloading"]["count"] == 0


async def test_add_manifest_queues_only_its_series(sim_mirror: SimMirror, tmp_path: Path) -> None:
    wanted = list(sim_mirror.archive.series)[:3]
    manifest = tmp_path / "pick.tcia"
    manifest.write_text(
        "downloadServerUrl=https://services.cancerimagingarchive.net/nbia-api/services/\n"
        "manifestVersion=3.0\nListOfSeriesToDownload=\n" + "\n".join(wanted) + "\n"
    )
    done = await run_subprocess("-c", str(sim_mirror.config), "add-manifest", str(manifest))
    assert done.code == 0, done.stderr
    status = await status_json(sim_mirror)
    series = status["series"]
    assert isinstance(series, dict)
    assert series["wanted"]["count"] == 3


async def test_add_manifest_lists_series_the_archive_lacks_and_exits_1(
    sim_mirror: SimMirror, tmp_path: Path
) -> None:
    known = next(iter(sim_mirror.archive.series))
    manifest = tmp_path / "stale.tcia"
    manifest.write_text(f"ListOfSeriesToDownload=\n{known}\n1.2.3.999999\n")
    done = await run_subprocess("-c", str(sim_mirror.config), "add-manifest", str(manifest))
    assert done.code == 1
    assert "unknown: 1.2.3.999999" in done.stdout.splitlines()
    assert "1 new" in done.stdout


async def test_add_manifest_with_garbage_exits_2(sim_mirror: SimMirror, tmp_path: Path) -> None:
    manifest = tmp_path / "bad.tcia"
    manifest.write_text("ListOfSeriesToDownload=\nnot-a-uid\n")
    done = await run_subprocess("-c", str(sim_mirror.config), "add-manifest", str(manifest))
    assert done.code == 2
    assert "line 2" in done.stderr and "Traceback" not in done.stderr


async def test_sigint_exits_130_keeps_placed_work_and_next_sync_resumes(
    sim_mirror: SimMirror,
) -> None:
    sim_mirror.server.faults.bandwidth = 15_000  # ~1 s per series: SIGINT lands mid-pass
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "nbia_sync",
        "-c",
        str(sim_mirror.config),
        "sync",
        cwd=REPO,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    counters = sim_mirror.server.counters
    for _ in range(400):  # the simulator's counter: polled, with a deadline
        if counters.streams_current:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("no download started")
    proc.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 130, err.decode()
    assert "Traceback" not in err.decode()
    staging = sim_mirror.root / ".nbia-sync" / "staging"
    assert not [p for p in staging.rglob("*") if p.is_file()]
    placed_before = mirror_files(sim_mirror.root)
    assert placed_before < set(expected_files(sim_mirror.archive, sim_mirror.root))
    sim_mirror.server.faults.bandwidth = None
    assert await run_main("-c", str(sim_mirror.config), "sync") == 0
    assert_mirror_complete(sim_mirror)
