"""Helpers and fixtures for the command-line, engine and daemon tests.

The simulator runs on the test's event loop; `nbia-sync` runs either in-process in a
worker thread (`main([...])` gets its own event loop there) or as a real subprocess
(`python -m nbia_sync`) when exit codes, signals and stderr are what is tested.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import socket
import sys
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import structlog

from nbia_sync.cli import main
from nbia_sync.sim import SimArchive, SimServer

REPO = Path(__file__).resolve().parent.parent
STATE = ".nbia-sync"

# Fast retries and short leases: tests wait for nothing.
FAST_TRANSFER: dict[str, Any] = {
    "workers": 4,
    "max_attempts": 3,
    "retry_base_delay": 0.01,
    "retry_max_delay": 0.05,
    "request_attempts": 3,
    "connect_timeout": 2.0,
    "read_timeout": 5.0,
    "lease_seconds": 10.0,
    "heartbeat_interval": 0.5,
}


def toml_value(value: Any) -> str:
    return json.dumps(value)  # JSON strings, numbers and booleans are valid TOML


def write_config(
    path: Path,
    root: Path,
    url: str,
    *,
    transfer: Mapping[str, Any] | None = None,
    sections: Mapping[str, Mapping[str, Any]] | None = None,
    source: Mapping[str, Any] | None = None,
) -> Path:
    """A config mirroring the simulator at `url` into `root` (min_free_bytes 0)."""
    body: dict[str, dict[str, Any]] = {
        "mirror": {"root": str(root), "min_free_bytes": 0},
        "transfer": {**FAST_TRANSFER, **(transfer or {})},
        "logging": {"level": "warning", "format": "json"},
    }
    for name, values in (sections or {}).items():
        body[name] = {**body.get(name, {}), **values}
    lines: list[str] = []
    for name, values in body.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
        lines.append("")
    src = {"name": "sim", "url": url, "api": "v2", **(source or {})}
    lines.append("[[sources]]")
    lines += [f"{k} = {toml_value(v)}" for k, v in src.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def expected_files(archive: SimArchive, root: Path) -> dict[Path, str]:
    """Mirror path -> MD5 of every instance (the documented layout)."""
    truth = archive.truth()
    return {
        root / s.collection / s.patient_id / s.study_uid / s.uid / f"{sop}.dcm": md5
        for s in archive.series.values()
        for sop, md5 in truth[s.uid].items()
    }


def mirror_files(root: Path) -> set[Path]:
    found: set[Path] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == root and STATE in dirnames:
            dirnames.remove(STATE)
        found.update(Path(dirpath) / f for f in filenames)
    return found


def assert_mirror_is_truth(archive: SimArchive, root: Path) -> None:
    """Exactly the archive's files under the mirror tree (bookkeeping dir excluded), each
    with the archive's MD5: nothing missing, nothing partial, nothing extra."""
    expected = expected_files(archive, root)
    assert mirror_files(root) == set(expected)
    wrong = [str(p) for p, md5 in expected.items() if md5_of(p) != md5]
    assert wrong == []


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def run_main(*argv: str) -> int:
    """`nbia-sync ARGV` in-process, on its own event loop in a worker thread."""
    return await asyncio.to_thread(main, list(argv))


@dataclass
class Completed:
    code: int
    stdout: str
    stderr: str


async def run_subprocess(
    *argv: str, limit: float = 60.0, env: Mapping[str, str] | None = None
) -> Completed:
    """`python -m nbia_sync ARGV` as a real process."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "nbia_sync",
        *argv,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), limit)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"nbia-sync {' '.join(argv)} did not finish in {limit} s") from None
    assert proc.returncode is not None
    return Completed(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


@dataclass
class SimMirror:
    """A running simulator plus a config that mirrors it into `root`."""

    server: SimServer
    archive: SimArchive
    root: Path
    config: Path


@pytest_asyncio.fixture
async def sim_mirror(
    sim: SimServer, sim_archive: SimArchive, tmp_path: Path
) -> AsyncIterator[SimMirror]:
    root = tmp_path / "mirror"
    config = write_config(tmp_path / "nbia-sync.toml", root, sim.url)
    yield SimMirror(sim, sim_archive, root, config)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """In-process `main()` configures logging globally: put the defaults back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)
