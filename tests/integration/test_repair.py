"""`verify --repair`: damaged series are queued again and the next sync mends them."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_fixtures import SimMirror, expected_files, mirror_files, run_main, run_subprocess

from nbia_sync.sim import SimArchive

pytestmark = [pytest.mark.asyncio, pytest.mark.usefixtures("restore_logging")]


def series_files(archive: SimArchive, root: Path, uid: str) -> list[Path]:
    s = archive.series[uid]
    base = root / s.collection / s.patient_id / s.study_uid / s.uid
    return sorted(base / f"{i.sop_uid}.dcm" for i in s.instances)


async def test_repair_queues_damaged_series_and_sync_mends_exactly_them(
    sim_mirror: SimMirror,
) -> None:
    config, root, archive, sim = (
        sim_mirror.config,
        sim_mirror.root,
        sim_mirror.archive,
        sim_mirror.server,
    )
    assert await run_main("-c", str(config), "sync") == 0
    lost, damaged = sorted(archive.series)[:2]
    series_files(archive, root, lost)[0].unlink()
    with series_files(archive, root, damaged)[1].open("r+b") as fh:
        fh.seek(200)
        fh.write(b"\x00bitrot\x00")
    assert await run_main("-c", str(config), "sync") == 0  # sync alone does not look
    repair = await run_subprocess("-c", str(config), "verify", "--repair")
    assert repair.code == 1
    assert repair.stdout.count("missing: ") == 1 and repair.stdout.count("differs: ") == 1
    assert "repair: 2 series queued again" in repair.stdout
    sim.counters.reset()
    assert await run_main("-c", str(config), "sync") == 0
    assert dict(sim.counters.downloads_started) == {lost: 1, damaged: 1}
    assert await run_main("-c", str(config), "verify") == 0
    assert mirror_files(root) == set(expected_files(archive, root))


async def test_repair_lists_extra_files_and_leaves_them(sim_mirror: SimMirror) -> None:
    config, root = sim_mirror.config, sim_mirror.root
    assert await run_main("-c", str(config), "sync") == 0
    extra = next(iter(mirror_files(root))).parent / "notes.txt"
    extra.write_text("mine")
    repair = await run_subprocess("-c", str(config), "verify", "--repair")
    assert repair.code == 1
    assert "extra: " in repair.stdout and "repair: 0 series queued again" in repair.stdout
    assert extra.read_text() == "mine"


async def test_repair_of_a_clean_mirror_exits_0(sim_mirror: SimMirror) -> None:
    assert await run_main("-c", str(sim_mirror.config), "sync") == 0
    assert await run_main("-c", str(sim_mirror.config), "verify", "--repair") == 0
