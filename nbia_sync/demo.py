"""`nbia-sync demo`: mirror the built-in simulator, offline, with a few injected faults.

It runs the real engine (discovery, catalog, transfer pool, verification) against a
loopback archive, so a newcomer sees the whole path work, retries included, without an
account or a network. A second run finds nothing to do: the mirror is already complete.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, TextIO

import anyio

from nbia_sync.catalog.repository import Catalog
from nbia_sync.config import Settings, settings_from_dict
from nbia_sync.display import terminal_progress
from nbia_sync.engine import run_pass
from nbia_sync.outcome import Outcome
from nbia_sync.sim import SimArchive, SimFaults, SimServer
from nbia_sync.status import human_bytes
from nbia_sync.verify import verify_mirror


def demo_archive() -> SimArchive:
    """Small enough for seconds on a laptop, large enough to show concurrency."""
    return SimArchive.generate(
        seed=0,
        collections=("DEMO-CT", "DEMO-MR"),
        patients=3,
        studies=1,
        series=2,
        images=4,
        image_size=64 * 1024,
    )


def demo_faults() -> SimFaults:
    """One download in ten is cut or corrupted: the engine must retry and still converge."""
    return SimFaults(reset=0.05, corrupt=0.05, seed=7)


def demo_settings(directory: Path, url: str) -> dict[str, Any]:
    return {
        "mirror": {"root": str(directory / "mirror"), "min_free_bytes": 0},
        "transfer": {"workers": 4, "retry_base_delay": 0.05, "retry_max_delay": 1.0},
        "logging": {"level": "warning"},
        "sources": [{"name": "demo-sim", "url": url, "api": "v4"}],
    }


def _prepare(directory: Path) -> Path:
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _write_config(path: Path, raw: dict[str, Any]) -> None:
    """A TOML copy of the demo settings, for `nbia-sync -c ... status|verify` afterwards."""
    lines = ["# Written by `nbia-sync demo`; the simulator URL only lived during the demo."]
    for section, values in raw.items():
        if section == "sources":
            continue
        lines.append(f"\n[{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    for src in raw["sources"]:
        lines.append("\n[[sources]]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in src.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


async def run_demo(directory: Path, *, stop: anyio.Event, out: TextIO) -> int:
    directory = await asyncio.to_thread(_prepare, directory)
    archive = demo_archive()
    async with SimServer(archive, demo_faults()) as server:
        raw = demo_settings(directory, server.url)
        settings: Settings = settings_from_dict(raw, env={})
        config = directory / "nbia-sync.toml"
        await asyncio.to_thread(_write_config, config, raw)
        out.write(
            f"Simulated NBIA archive at {server.url}: {len(archive.series)} series, "
            f"{sum(s.image_count for s in archive.series.values())} files.\n"
            f"Mirroring into {settings.mirror.root} (catalog in {settings.state_dir}) ...\n"
        )
        out.flush()
        catalog = await Catalog.open(settings.catalog_url)
        try:
            with terminal_progress() as progress:
                report = await run_pass(
                    settings, catalog, progress=progress, stop=stop, command="demo"
                )
            check = await verify_mirror(catalog, settings.mirror.root)
        finally:
            await catalog.close()
        retried = sum(server.counters.downloads_started.values()) - len(
            server.counters.downloads_completed
        )
    out.write(
        f"\nPass {report.outcome}: {report.done} series placed ({human_bytes(report.bytes)}) "
        f"in {report.duration:.1f} s; {report.failed} failed; {max(0, retried)} downloads "
        f"were faulty on purpose and retried.\n"
        f"Verify: {check.matched} of {check.checked} files match their MD5"
        + ("" if check.ok else f"; problems: {', '.join(map(str, check.problems[:5]))}")
        + f".\n\nNext: nbia-sync -c {config} status\n"
        f"      nbia-sync -c {config} verify\n"
    )
    return 0 if report.outcome is Outcome.OK and check.ok else 1
