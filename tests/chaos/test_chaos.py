"""Chaos: the simulator misbehaves, the engine is killed -9; the mirror must still converge.

The simulator runs in this process (on the test's event loop); the engine always runs as
a real `python -m nbia_sync` subprocess, so a SIGKILL is a real crash: no finally blocks,
no clean shutdown, the catalog and the staging area left as they were at that instant.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import signal
import sqlite3
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cli_fixtures import STATE, expected_files, mirror_files

from nbia_sync.sim import SimArchive, SimFaults, SimServer

pytestmark = [pytest.mark.asyncio, pytest.mark.chaos]

REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- helpers


def write_config(path: Path, root: Path, url: str, **transfer: Any) -> Path:
    settings: dict[str, Any] = {
        "workers": 4,
        "max_attempts": 40,
        "retry_base_delay": 0.01,
        "retry_max_delay": 0.2,
        "request_attempts": 30,
        "read_timeout": 2.0,
        "connect_timeout": 5.0,
        "lease_seconds": 4.0,
        "heartbeat_interval": 1.0,
    }
    settings.update(transfer)
    lines = ["[mirror]", f"root = {json.dumps(str(root))}", "min_free_bytes = 0", "", "[transfer]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    lines += [
        "",
        "[logging]",
        'level = "warning"',
        'format = "json"',
        "",
        "[[sources]]",
        'name = "sim"',
        f"url = {json.dumps(url)}",
        'api = "v2"',
        "",
    ]
    path.write_text("\n".join(lines))
    return path


async def run_cli(config: Path, *args: str, limit: float = 90.0) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "nbia_sync",
        "-c",
        str(config),
        *args,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), limit)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"nbia-sync {' '.join(args)} did not finish in {limit} s") from None
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def assert_mirror_equals(root: Path, expected: Mapping[Path, str]) -> None:
    found = mirror_files(root)
    assert not found - set(expected), f"unexpected files: {sorted(found - set(expected))[:5]}"
    missing = set(expected) - found
    assert not missing, f"{len(missing)} files missing, e.g. {sorted(missing)[:3]}"
    wrong = [p for p, md5 in expected.items() if md5_of(p) != md5]
    assert not wrong, f"{len(wrong)} files differ from the archive, e.g. {wrong[:3]}"


def assert_no_escape(tmp_path: Path) -> None:
    """No hostile entry was written anywhere: not beside the mirror, not at its absolute name."""
    assert not list(tmp_path.rglob("evil*")), "a hostile entry was written somewhere"
    assert not Path("/etc/evil.dcm").exists()


def staging_leftovers(root: Path) -> list[Path]:
    """Anything left in staging (partial downloads live only there)."""
    staging = root / STATE / "staging"
    return [p for p in staging.rglob("*") if p.is_file()] if staging.exists() else []


def catalog_states(root: Path) -> dict[str, str]:
    """series_uid -> state, read straight from the SQLite catalog (engine not running)."""
    db = root / STATE / "catalog.sqlite"
    if not db.exists():
        return {}
    con = sqlite3.connect(db)
    try:
        return dict(con.execute("SELECT series_uid, state FROM series").fetchall())
    except sqlite3.OperationalError:  # killed before the schema was created
        return {}
    finally:
        con.close()


def started_per_series(server: SimServer) -> dict[str, int]:
    return dict(server.counters.downloads_started)


def completed_per_series(server: SimServer) -> dict[str, int]:
    """Archives the simulator sent whole and unharmed, per series."""
    return dict(server.counters.downloads_completed)


def faults_injected(server: SimServer) -> int:
    """Error statuses served plus downloads that did not go through unharmed."""
    c = server.counters
    errors = sum(n for status, n in c.statuses.items() if status == 429 or status >= 500)
    return errors + sum(c.downloads_started.values()) - sum(c.downloads_completed.values())


@dataclass
class Observer:
    """Polls the mirror tree while the engine runs: every file visible outside the
    bookkeeping directory must be an expected path with its final content already."""

    root: Path
    expected: Mapping[Path, str]
    seen: dict[tuple[Path, int], str] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    observations: int = 0

    def observe(self) -> None:
        self.observations += 1
        for path in mirror_files(self.root):
            if path not in self.expected:
                self.violations.append(f"unexpected {path}")
                continue
            try:
                key = (path, path.stat().st_ino)
                if key in self.seen:
                    continue  # placed files are renamed in, never rewritten in place
                digest = md5_of(path)
            except FileNotFoundError:
                continue  # replaced between listing and reading
            self.seen[key] = digest
            if digest != self.expected[path]:
                self.violations.append(f"partial or wrong {path}")

    async def watch(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.observe()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.05)


def small_archive(
    seed: int, *, patients: int = 3, series: int = 2, images: int = 3, image_size: int = 6000
) -> SimArchive:
    return SimArchive.generate(
        seed=seed,
        collections=("CHAOS-CT", "CHAOS-MR"),
        patients=patients,
        studies=1,
        series=series,
        images=images,
        image_size=image_size,
    )


# ------------------------------------------------------------------- faults at 10-30 %

# Each retryable fault kind alone at 30 %, then all of them together at 10 % each.
FAULT_KINDS: dict[str, dict[str, Any]] = {
    "5xx": {"error_5xx": 0.3},
    "429": {"rate_429": 0.3, "retry_after": 0.05},
    "reset": {"reset": 0.3},
    "truncate": {"truncate": 0.3},
    "corrupt": {"corrupt": 0.3},
    "stall": {"stall": 0.3, "stall_seconds": 5.0},
    "html": {"html_instead_of_zip": 0.3},
    "all": {
        "error_5xx": 0.1,
        "rate_429": 0.1,
        "retry_after": 0.05,
        "reset": 0.1,
        "truncate": 0.1,
        "corrupt": 0.1,
        "stall": 0.1,
        "stall_seconds": 5.0,
        "html_instead_of_zip": 0.1,
    },
}


@pytest.mark.parametrize("kind", list(FAULT_KINDS))
async def test_faults_converge_to_truth(kind: str, tmp_path: Path) -> None:
    """With every retryable fault kind injected, one `sync` still ends with the mirror equal
    to the archive file by file, `verify` clean, and nothing left in staging.

    max_attempts is generous (40): at 30 % per attempt a series fails 40 times in a row with
    probability 0.3**40. A stall lasts longer than the read timeout, so it is only survived
    by cutting the stream and trying again."""
    archive = small_archive(seed=100 + list(FAULT_KINDS).index(kind))
    root = tmp_path / "mirror"
    faults = SimFaults(seed=7, **FAULT_KINDS[kind])
    async with SimServer(archive, faults) as server:
        cfg = write_config(tmp_path / "cfg.toml", root, server.url, read_timeout=0.5)
        rc, out = await run_cli(cfg, "sync")
        assert rc == 0, out[-3000:]
        injected = faults_injected(server)
    # The faults really happened (otherwise this test proves nothing).
    assert injected > 0, f"no {kind} fault was injected: {server.counters!r}"
    assert_mirror_equals(root, expected_files(archive, root))
    assert staging_leftovers(root) == []
    rc, out = await run_cli(cfg, "verify")
    assert rc == 0, out[-3000:]


async def test_hostile_series_fails_alone(tmp_path: Path) -> None:
    """A hostile archive (entries named ../../evil.dcm or /etc/evil.dcm) is permanent on a
    real server, so it is scripted for two series for good: `sync` exits 1, those series
    end `failed` after a single download (no retry of a permanent error), nothing lands
    outside the mirror, and every other series is mirrored exactly."""
    archive = small_archive(seed=300)
    root = tmp_path / "mirror"
    faults = SimFaults(seed=5, error_5xx=0.1, reset=0.1)
    hostile = sorted(archive.series)[:2]
    for uid in hostile:
        faults.script_series(uid, ["hostile"] * 50)
    async with SimServer(archive, faults) as server:
        cfg = write_config(tmp_path / "cfg.toml", root, server.url)
        rc, out = await run_cli(cfg, "sync")
        assert rc == 1, out[-3000:]
        started = started_per_series(server)
    states = catalog_states(root)
    assert {uid: states[uid] for uid in hostile} == dict.fromkeys(hostile, "failed")
    assert all(started[uid] == 1 for uid in hostile), started
    assert_no_escape(tmp_path)
    rest = {
        p: md5 for p, md5 in expected_files(archive, root).items() if p.parent.name not in hostile
    }
    assert_mirror_equals(root, rest)
    assert staging_leftovers(root) == []


# ------------------------------------------------------------------------ kill -9 loop


async def test_repeated_sigkill_then_resume(tmp_path: Path) -> None:
    """SIGKILL a running `sync` at seeded random moments, restart it each time, then let a
    final run finish: the mirror equals the archive, `verify` is clean, no partial or
    unexpected file was ever visible under the mirror tree (polled every 50 ms throughout),
    and no series was fetched again once the catalog said it was done.

    The last assertion, worked out: a series may legitimately be fetched more than once --
    the kill can land after the simulator sent the whole archive but before the engine
    placed it and committed `done` (a completed download that never counted). What must
    never happen is a fetch *after* the commit. So after each kill we read the catalog
    (SQLite, the engine being dead) and snapshot the simulator's per-series download
    starts; for every series `done` at that moment, the final count of starts must equal
    the snapshot: the restarts never asked for it again. Globally, completed downloads
    are at most one per series plus one per worker per kill (the work in flight)."""
    rng = random.Random(20240607)
    # 48 series of 4 x 64 KB at 400 KB/s per stream with 4 workers: a clean run streams for
    # ~8 s after start-up, so the kills land in discovery, mid-stream and while placing.
    archive = small_archive(seed=42, patients=12, series=2, images=4, image_size=64_000)
    root = tmp_path / "mirror"
    expected = expected_files(archive, root)
    observer = Observer(root, expected)
    kills = 5
    workers = 4
    async with SimServer(archive, SimFaults(seed=3, bandwidth=400_000)) as server:
        cfg = write_config(tmp_path / "cfg.toml", root, server.url, workers=workers)
        done_snapshots: list[tuple[set[str], dict[str, int]]] = []
        killed = 0
        for _ in range(kills):
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "nbia_sync",
                "-c",
                str(cfg),
                "sync",
                cwd=REPO,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            stop = asyncio.Event()
            watcher = asyncio.create_task(observer.watch(stop))
            # Python start-up and imports take ~1 s on this machine; kill in [0.8, 3.5] s.
            try:
                await asyncio.wait_for(proc.wait(), rng.uniform(0.8, 3.5))
            except TimeoutError:
                proc.send_signal(signal.SIGKILL)
                await proc.wait()
                killed += 1
            stop.set()
            await watcher
            observer.observe()
            states = catalog_states(root)
            done = {uid for uid, state in states.items() if state == "done"}
            done_snapshots.append((done, dict(started_per_series(server))))

        # The final run, to completion, once the killed processes' heartbeats are stale
        # (config.stale_after: the lease, 4 s): only then is their staging theirs to
        # remove. Downloads stage from their first 64 KiB on, so a kill mid-stream
        # leaves a .part file there.
        await asyncio.sleep(4.5)
        rc, out = await run_cli(cfg, "sync")
        assert rc == 0, out[-3000:]
        rc, out = await run_cli(cfg, "verify")
        assert rc == 0, out[-3000:]
        started = started_per_series(server)
        completed = completed_per_series(server)

    # Enough kills landed mid-run for this test to mean something.
    assert killed >= 3, f"only {killed} of {kills} runs were killed: lengthen the archive"
    assert observer.observations > 20
    assert observer.violations == [], observer.violations[:5]
    assert_mirror_equals(root, expected)
    assert staging_leftovers(root) == []
    assert set(catalog_states(root).values()) == {"done"}
    for done, snapshot in done_snapshots:
        refetched = {uid for uid in done if started.get(uid, 0) != snapshot.get(uid, 0)}
        assert not refetched, f"series fetched again after `done`: {sorted(refetched)[:3]}"
    assert sum(completed.values()) <= len(archive.series) + killed * workers
    assert all(completed.get(uid, 0) >= 1 for uid in archive.series)


# ------------------------------------------------------- kill -9 inside the group commit

# Runs `sync` in this child with a SIGKILL planted at one point of the production
# placement path (Mirror.place_many inside Queue.placing_many).
_KILL_IN_COMMIT = """
import os, signal, sys, types
import nbia_sync.storage as storage
from nbia_sync.cli import main

where, cfg = sys.argv[1], sys.argv[2]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if where == "between-renames":
    # The second series rename of a batch: one series renamed, the rest not, nothing
    # fsynced, nothing committed.
    calls = [0]
    def rename(src, dst):
        if ".nbia-sync" in str(src) and ".nbia-sync" not in str(dst):
            calls[0] += 1
            if calls[0] == 2:
                die()
        os.rename(src, dst)
    storage.os = types.SimpleNamespace(**{**vars(os), "rename": rename})
elif where == "before-commit":
    # Every rename and directory fsync of the first batch done; the commit not yet.
    real = storage.Mirror._place_many_sync
    def place(self, moves, *args):
        errors = real(self, moves, *args)
        die()
        return errors
    storage.Mirror._place_many_sync = place
sys.exit(main(["-c", cfg, "sync"]))
"""


@pytest.mark.parametrize("where", ["between-renames", "before-commit"])
async def test_kill_inside_the_group_commit_leaves_catalog_and_tree_consistent(
    where: str, tmp_path: Path
) -> None:
    """SIGKILL at a chosen point of the real placement path (renames into the tree, then
    directory fsyncs, then the commit): the tree holds only whole series, every series
    the catalog says done is whole in the tree, and a resumed sync converges."""
    archive = small_archive(seed=7, patients=6, series=2, images=3, image_size=4000)
    root = tmp_path / "mirror"
    expected = expected_files(archive, root)
    by_series: dict[Path, set[Path]] = {}
    for path in expected:
        by_series.setdefault(path.parent, set()).add(path)
    async with SimServer(archive, SimFaults(seed=1)) as server:
        cfg = write_config(tmp_path / "cfg.toml", root, server.url, workers=6)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _KILL_IN_COMMIT, where, str(cfg), cwd=REPO
        )
        assert await asyncio.wait_for(proc.wait(), 90) == -signal.SIGKILL
        found = mirror_files(root)
        assert found <= set(expected)
        present = {p.parent for p in found}
        for series_dir in present:
            assert by_series[series_dir] <= found, f"partial series {series_dir}"
        assert present, "killed before anything was renamed into the tree"
        done = {uid for uid, state in catalog_states(root).items() if state == "done"}
        assert {d.name for d in by_series if d in present} >= done
        assert len(done) < len(by_series)  # the kill came before the first commit
        await asyncio.sleep(4.5)  # the killed process's staging is removable once stale
        rc, out = await run_cli(cfg, "sync")
        assert rc == 0, out[-3000:]
        rc, out = await run_cli(cfg, "verify")
        assert rc == 0, out[-3000:]
    assert_mirror_equals(root, expected)
    assert staging_leftovers(root) == []
    assert set(catalog_states(root).values()) == {"done"}
