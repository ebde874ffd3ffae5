"""Start-up and exit paths of real `nbia-sync` processes: what `status` imports, and
that the entry point's quick exit (no interpreter teardown) loses no output or exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytest_asyncio
from cli_fixtures import REPO, run_subprocess, write_config

from nbia_sync.catalog import Catalog
from nbia_sync.config import load_settings


@pytest_asyncio.fixture
async def empty_mirror(tmp_path: Path) -> Path:
    """A config whose catalog exists (at the schema head) and holds nothing yet."""
    config = write_config(tmp_path / "nbia-sync.toml", tmp_path / "mirror", "http://127.0.0.1:9/")
    catalog = await Catalog.open(load_settings(config).catalog_url)
    await catalog.close()
    return config


def test_status_loads_no_http_client_rich_alembic_orm_or_anyio_backend(empty_mirror: Path) -> None:
    code = (
        "import sys; from nbia_sync.cli import main; "
        f"rc = main(['-c', {str(empty_mirror)!r}, 'status', '--json']); "
        "unwanted = ('aiohttp', 'rich', 'alembic', 'sqlalchemy.orm', 'anyio._backends._asyncio'); "
        "print(rc, sorted(m for m in unwanted if m in sys.modules), file=sys.stderr)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert out.stderr.strip().splitlines()[-1] == "0 []"


def test_the_entry_point_delivers_all_of_stdout_through_a_pipe(empty_mirror: Path) -> None:
    # Block-buffered stdout (no PYTHONUNBUFFERED): the quick exit must flush it first.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    argv = [sys.executable, "-m", "nbia_sync", "-c", str(empty_mirror), "status", "--json"]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=env)
    assert done.returncode == 0
    assert json.loads(done.stdout)["series"]["done"] == {"count": 0, "bytes": 0}


@pytest.mark.asyncio
async def test_the_entry_point_keeps_the_exit_code_and_the_error_line(tmp_path: Path) -> None:
    config = write_config(tmp_path / "nbia-sync.toml", tmp_path / "nowhere", "http://127.0.0.1:9/")
    done = await run_subprocess("-c", str(config), "status")
    assert done.code == 2
    assert done.stderr.startswith("nbia-sync: error: no mirror at ")
