"""`add-manifest` with a portal manifest and two sources: matched by host, no --source."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_fixtures import run_subprocess, toml_value, write_config

from nbia_sync.sim import SimArchive, SimServer

pytestmark = pytest.mark.asyncio


def _add_source(config: Path, name: str, url: str) -> None:
    with config.open("a") as out:
        out.write(f'\n[[sources]]\nname = "{name}"\nurl = {toml_value(url)}\napi = "v2"\n')


async def test_portal_manifest_goes_to_the_server_it_names_without_source(
    sim: SimServer, tmp_path: Path
) -> None:
    other_archive = SimArchive.generate(seed=1, collections=("NLST-SIM",))
    async with SimServer(other_archive) as other:
        config = write_config(tmp_path / "nbia-sync.toml", tmp_path / "m", sim.url)
        _add_source(config, "other", other.url)
        manifest = tmp_path / "portal.tcia"
        wanted = sorted(other_archive.series)[:2]
        manifest.write_text(other.portal_manifest(wanted))
        done = await run_subprocess("-c", str(config), "add-manifest", str(manifest))
        assert done.code == 0, done.stderr
        assert "2 new" in done.stdout
    assert other.counters.requests["getSeries"] >= 2
    assert sim.counters.requests["getSeries"] == 0


async def test_manifest_naming_no_configured_server_is_one_clear_error(
    sim: SimServer, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "nbia-sync.toml", tmp_path / "m", sim.url)
    _add_source(config, "other", "http://127.0.0.1:9/nbia-api/")
    manifest = tmp_path / "nlst.tcia"
    manifest.write_text(
        "downloadServerUrl=https://nlst.cancerimagingarchive.net/nbia-download/servlet/"
        "DownloadServlet\nListOfSeriesToDownload=\n1.2.3\n"
    )
    done = await run_subprocess("-c", str(config), "add-manifest", str(manifest))
    assert done.code == 2
    assert "TCIA's NLST server" in done.stderr and "--source" in done.stderr
    assert sim.counters.requests["getSeries"] == 0
