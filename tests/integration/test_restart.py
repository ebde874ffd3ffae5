"""Restart after a crash: leases of a dead process of this host are taken back at once."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sqlite3
import sys
from pathlib import Path

import pytest
from cli_fixtures import REPO, STATE, expected_files, mirror_files, run_subprocess, write_config

from nbia_sync.api.models import SeriesInfo
from nbia_sync.catalog import Catalog, SeriesState
from nbia_sync.catalog.fleet import process_gone, process_start
from nbia_sync.config import SourceSettings
from nbia_sync.sim import SimArchive, SimFaults
from nbia_sync.sim.testing import running_sim

pytestmark = pytest.mark.asyncio

SLOW_LEASES = {"lease_seconds": 300.0, "heartbeat_interval": 30.0, "workers": 2}


def downloading(root: Path) -> int:
    con = sqlite3.connect(root / STATE / "catalog.sqlite")
    try:
        (n,) = con.execute("SELECT count(*) FROM series WHERE state = 'downloading'").fetchone()
        return int(n)
    finally:
        con.close()


async def test_sync_after_kill_9_takes_the_dead_process_leases_back(tmp_path: Path) -> None:
    archive = SimArchive.generate(seed=5, patients=2, series=2, images=4, image_size=64 * 1024)
    async with running_sim(archive, SimFaults(bandwidth=100_000)) as sim:
        root = tmp_path / "mirror"
        config = write_config(tmp_path / "c.toml", root, sim.url, transfer=SLOW_LEASES)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "nbia_sync",
            "-c",
            str(config),
            "sync",
            cwd=REPO,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        for _ in range(400):  # until downloads are streaming
            if sim.counters.bytes_sent > 0 or proc.returncode is not None:
                break
            await asyncio.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        assert downloading(root) > 0  # the dead process still holds leases (for 300 s)
        # Without the take-back this run would wait out the 300 s leases; the limit is
        # there so a regression fails instead of hanging.
        done = await run_subprocess("-c", str(config), "-v", "sync", limit=150)
        assert done.code == 0, done.stderr
        assert "dead_local_workers_taken_back" in done.stderr
        assert mirror_files(root) == set(expected_files(archive, root))


async def test_a_live_process_with_its_start_time_is_not_gone() -> None:
    assert not process_gone(os.getpid(), process_start(os.getpid()))


async def test_a_reused_pid_is_gone() -> None:
    """Same PID, another start time: the PID now belongs to another process."""
    started = process_start(os.getpid())
    if started is None:
        pytest.skip("no /proc here")
    assert process_gone(os.getpid(), started - 1)


async def test_a_pid_with_no_process_is_gone() -> None:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    await proc.wait()
    assert process_gone(proc.pid, None)


def _info(uid: str) -> SeriesInfo:
    return SeriesInfo(
        series_uid=uid,
        study_uid="1.2",
        collection="C",
        patient_id="P",
        modality="CT",
        image_count=1,
        file_size=10,
    )


async def _held_by(catalog: Catalog, owner: str, host: str, pid: int) -> None:
    await catalog.fleet.register_worker(owner, host, pid, "run")
    claims = await catalog.queue.claim(owner, limit=1, lease_seconds=300)
    assert len(claims) == 1


async def test_dead_local_worker_leases_become_claimable(catalog: Catalog) -> None:
    source_id = await catalog.sources.ensure_source(
        SourceSettings(name="s", url="http://127.0.0.1/")
    )
    await catalog.sources.upsert_series(source_id, [_info("1.1")])
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    await proc.wait()  # a PID with no process behind it
    dead = f"{socket.gethostname()}:{proc.pid}:run"
    await _held_by(catalog, dead, socket.gethostname(), proc.pid)
    assert await catalog.fleet.take_back_dead_local(socket.gethostname(), "me") == [dead]
    claims = await catalog.queue.claim("me", limit=5, lease_seconds=300)
    assert [c.series_uid for c in claims] == ["1.1"]
    assert dead not in {w.owner for w in await catalog.fleet.workers()}


async def test_other_hosts_leases_are_left_to_expire(catalog: Catalog) -> None:
    source_id = await catalog.sources.ensure_source(
        SourceSettings(name="s", url="http://127.0.0.1/")
    )
    await catalog.sources.upsert_series(source_id, [_info("1.1")])
    # PID 2**22 + 1 exists nowhere here, but the process is on another host.
    await _held_by(catalog, "elsewhere:4194305:run", "elsewhere", 4194305)
    assert await catalog.fleet.take_back_dead_local(socket.gethostname(), "me") == []
    assert await catalog.queue.claim("me", limit=5, lease_seconds=300) == []
    counts = await catalog.state_counts()
    assert counts[SeriesState.DOWNLOADING][0] == 1
