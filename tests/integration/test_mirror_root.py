"""Unusable or absent mirror roots (issue 12, item 8): exit 2, one line naming the path.

`sync` needs a root (and state directory) it can write; `status` and `verify` on a root
that holds no mirror say so instead of creating an empty one. Real processes: exit codes
and stderr are what is tested.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cli_fixtures import run_subprocess, write_config

pytestmark = pytest.mark.asyncio

NOWHERE = "http://127.0.0.1:9/"  # never contacted: the root is checked first


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("nbia-sync: error: "), stderr
    return lines[0]


async def test_sync_into_a_root_below_a_file_exits_2_naming_it(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    root = tmp_path / "file" / "mirror"
    config = write_config(tmp_path / "c.toml", root, NOWHERE)
    done = await run_subprocess("-c", str(config), "sync")
    assert done.code == 2
    assert str(root) in one_error_line(done.stderr)


async def test_sync_with_a_state_directory_that_is_a_file_exits_2(tmp_path: Path) -> None:
    root = tmp_path / "mirror"
    root.mkdir()
    (root / ".nbia-sync").write_text("in the way")
    config = write_config(tmp_path / "c.toml", root, NOWHERE)
    done = await run_subprocess("-c", str(config), "sync")
    assert done.code == 2
    assert str(root / ".nbia-sync") in one_error_line(done.stderr)


async def test_sync_into_a_read_only_file_system_exits_2(tmp_path: Path) -> None:
    root = Path("/sys")  # sysfs: a directory nobody, not even root, may add entries to
    if not _read_only_dir(root):
        pytest.skip("no read-only directory to point at")
    config = write_config(tmp_path / "c.toml", root, NOWHERE)
    done = await run_subprocess("-c", str(config), "sync")
    assert done.code == 2
    assert "/sys" in one_error_line(done.stderr)


def _read_only_dir(path: Path) -> bool:
    if not path.is_dir():
        return False
    probe = path / ".nbia-sync-probe"
    try:
        probe.mkdir()
    except OSError:
        return True
    probe.rmdir()
    return False


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
async def test_sync_into_an_unwritable_root_exits_2(tmp_path: Path) -> None:
    root = tmp_path / "mirror"
    root.mkdir()
    root.chmod(0o555)
    try:
        config = write_config(tmp_path / "c.toml", root, NOWHERE)
        done = await run_subprocess("-c", str(config), "sync")
    finally:
        root.chmod(0o755)
    assert done.code == 2
    assert str(root) in one_error_line(done.stderr)


@pytest.mark.parametrize("command", ["status", "verify"])
async def test_read_only_command_on_a_missing_root_exits_2_and_creates_nothing(
    tmp_path: Path, command: str
) -> None:
    root = tmp_path / "typo"
    config = write_config(tmp_path / "c.toml", root, NOWHERE)
    done = await run_subprocess("-c", str(config), command)
    assert done.code == 2
    assert "no mirror at" in one_error_line(done.stderr)
    assert not root.exists()


@pytest.mark.parametrize("command", ["status", "verify"])
async def test_read_only_command_on_a_plain_directory_exits_2_and_leaves_it_alone(
    tmp_path: Path, command: str
) -> None:
    root = tmp_path / "photos"
    root.mkdir()
    (root / "holiday.jpg").write_bytes(b"\xff\xd8")
    config = write_config(tmp_path / "c.toml", root, NOWHERE)
    done = await run_subprocess("-c", str(config), command)
    assert done.code == 2
    assert str(root) in one_error_line(done.stderr)
    assert sorted(p.name for p in root.iterdir()) == ["holiday.jpg"]
