"""HTTPS end to end: the archive's certificate is checked, on both event loops.

The simulator serves HTTPS with a certificate from a throwaway CA (trustme). `nbia-sync`
runs as a real process, so the CA reaches it the way an operator's would: through
SSL_CERT_FILE, which OpenSSL reads when the default trust store is loaded.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
import trustme
from aiohttp import web
from cli_fixtures import assert_mirror_is_truth, mirror_files, run_subprocess, write_config
from served_apps import serving

from nbia_sync.sim import SimServer
from nbia_sync.sim.testing import small_archive

pytestmark = pytest.mark.asyncio


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest_asyncio.fixture
async def https_sim(ca: trustme.CA) -> AsyncIterator[SimServer]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    async with SimServer(small_archive(), tls=context) as server:
        yield server


def _config(tmp_path: Path, sim: SimServer, *, event_loop: str = "auto", **source: object) -> Path:
    return write_config(
        tmp_path / "tls.toml",
        tmp_path / "mirror",
        sim.url,
        transfer={"event_loop": event_loop},
        source=source,
    )


def _trusting(ca: trustme.CA, tmp_path: Path) -> dict[str, str]:
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    return {"SSL_CERT_FILE": str(bundle)}


@pytest.mark.parametrize("event_loop", ["auto", "asyncio"])
async def test_sync_over_https_with_a_trusted_certificate_mirrors_everything(
    event_loop: str, https_sim: SimServer, ca: trustme.CA, tmp_path: Path
) -> None:
    assert https_sim.url.startswith("https://")
    config = _config(tmp_path, https_sim, event_loop=event_loop)
    done = await run_subprocess("-c", str(config), "sync", env=_trusting(ca, tmp_path))
    assert done.code == 0, done.stderr
    assert_mirror_is_truth(https_sim.archive, tmp_path / "mirror")


async def test_an_untrusted_certificate_stops_the_sync_naming_the_cause(
    https_sim: SimServer, tmp_path: Path
) -> None:
    # TLS verification is on by default: a certificate no trusted CA signed is refused.
    done = await run_subprocess("-c", str(_config(tmp_path, https_sim)), "sync")
    assert done.code == 2  # a source unreachable at discovery
    # OpenSSL's reason is given: here no trusted CA signed the server's certificate.
    assert re.search(r"\): TLS certificate not accepted \(.*issuer.*\)$", done.stderr.rstrip())
    assert "retry." not in done.stderr  # asked once: no wait makes it trusted
    assert mirror_files(tmp_path / "mirror") == set()
    assert sum(https_sim.counters.downloads_started.values()) == 0


async def test_verification_turned_off_mirrors_an_untrusted_archive_with_a_warning(
    https_sim: SimServer, tmp_path: Path
) -> None:
    config = _config(tmp_path, https_sim, verify_tls=False)
    done = await run_subprocess("-c", str(config), "sync")
    assert done.code == 0, done.stderr
    assert "client.tls_verification_off" in done.stderr
    assert_mirror_is_truth(https_sim.archive, tmp_path / "mirror")


async def test_a_trusted_certificate_for_another_host_name_is_refused(
    ca: trustme.CA, tmp_path: Path
) -> None:
    # A small real-shaped server: valid answers, and a certificate the trusted CA signed,
    # but for another name than the one connected to (a misrouted or hijacked address;
    # connected to by IP, so OpenSSL calls it an IP address mismatch).
    async def empty_listing(request: web.Request) -> web.Response:
        return web.json_response([])

    app = web.Application()
    app.router.add_get("/nbia-api/services/{version}/{endpoint}", empty_listing)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("archive.example").configure_cert(context)
    async with serving(app, tls=context) as url:
        config = write_config(tmp_path / "tls.toml", tmp_path / "mirror", url)
        done = await run_subprocess("-c", str(config), "sync", env=_trusting(ca, tmp_path))
    assert done.code == 2
    refused = r"TLS certificate not accepted \(IP address mismatch.*127\.0\.0\.1.*\)$"
    assert re.search(refused, done.stderr.rstrip())
    assert "retry." not in done.stderr
