"""Matching a portal manifest to a configured source by the host its downloadServerUrl names."""

from __future__ import annotations

import pytest

from nbia_sync.cli import pick_source
from nbia_sync.config import Settings, settings_from_dict
from nbia_sync.errors import ConfigError

PUBLIC = "https://public.cancerimagingarchive.net/nbia-download/servlet/DownloadServlet"
NLST = "https://nlst.cancerimagingarchive.net/nbia-download/servlet/DownloadServlet"
MAIN_API = "https://services.cancerimagingarchive.net/nbia-api/"
NLST_API = "https://nlst.cancerimagingarchive.net/nbia-api/"


def settings(*sources: tuple[str, str]) -> Settings:
    raw = {
        "mirror": {"root": "/m"},
        "sources": [{"name": n, "url": u, "api": "v4"} for n, u in sources],
    }
    return settings_from_dict(raw, env={})


def test_public_servlet_manifest_goes_to_the_services_source() -> None:
    both = settings(("tcia", MAIN_API), ("nlst", NLST_API))
    assert pick_source(both, None, PUBLIC).name == "tcia"


def test_nlst_servlet_manifest_goes_to_the_nlst_source() -> None:
    both = settings(("tcia", MAIN_API), ("nlst", NLST_API))
    assert pick_source(both, None, NLST).name == "nlst"


def test_host_match_ignores_case_and_path() -> None:
    both = settings(("tcia", MAIN_API), ("nlst", NLST_API))
    assert pick_source(both, None, "HTTPS://NLST.CancerImagingArchive.net/x").name == "nlst"


def test_two_sources_on_the_named_server_need_source() -> None:
    two = settings(("tcia", MAIN_API), ("tcia-v2", MAIN_API), ("nlst", NLST_API))
    with pytest.raises(ConfigError, match=r"several configured sources \(tcia, tcia-v2\)"):
        pick_source(two, None, PUBLIC)
    assert pick_source(two, "tcia-v2", PUBLIC).name == "tcia-v2"


def test_manifest_for_a_server_no_source_serves_is_refused_by_name() -> None:
    main_only = settings(("tcia", MAIN_API))
    with pytest.raises(ConfigError, match=r"TCIA.s NLST server .* which no configured source"):
        pick_source(main_only, None, NLST)


def test_single_source_takes_a_manifest_from_an_unknown_host() -> None:
    local = settings(("sim", "http://127.0.0.1:8080/nbia-api/"))
    assert pick_source(local, None, "http://10.0.0.9/nbia-download/servlet/x").name == "sim"
    assert pick_source(local, None, None).name == "sim"


def test_single_proxy_source_takes_a_portal_manifest() -> None:
    proxy = settings(("proxy", "https://nbia.example.org/nbia-api/"))
    assert pick_source(proxy, None, PUBLIC).name == "proxy"


def test_ports_tell_two_local_servers_apart() -> None:
    local = settings(("a", "http://127.0.0.1:8080/nbia-api/"), ("b", "http://127.0.0.1:8081/n/"))
    servlet = "http://127.0.0.1:8081/nbia-download/servlet/DownloadServlet"
    assert pick_source(local, None, servlet).name == "b"
