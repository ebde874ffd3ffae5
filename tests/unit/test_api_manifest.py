"""The .tcia manifest parser."""

from __future__ import annotations

import pytest

from nbia_sync.api.manifest import ManifestError, parse_manifest
from nbia_sync.errors import ConfigError

UID_A = "1.3.6.1.4.1.14519.5.2.1.7009.9004.1234"
UID_B = "1.3.6.1.4.1.14519.5.2.1.7009.9004.5678"

PORTAL = f"""downloadServerUrl=https://services.cancerimagingarchive.net/nbia-api/services/
includeAnnotation=true
noOfrRetry=4
databasketId=manifest-1700000000000.tcia
manifestVersion=3.0
ListOfSeriesToDownload=
{UID_A}
{UID_B}
"""


def test_parses_the_portal_format() -> None:
    manifest = parse_manifest(PORTAL)
    assert manifest.series_uids == [UID_A, UID_B]
    assert manifest.download_server_url == (
        "https://services.cancerimagingarchive.net/nbia-api/services/"
    )
    assert manifest.manifest_version == "3.0"
    assert manifest.databasket_id == "manifest-1700000000000.tcia"
    assert manifest.headers["noOfrRetry"] == "4"


def test_accepts_crlf_blank_lines_and_trailing_commas() -> None:
    text = f"manifestVersion=3.0\r\n\r\nListOfSeriesToDownload=\r\n{UID_A},\r\n\r\n{UID_B},\r\n"
    assert parse_manifest(text).series_uids == [UID_A, UID_B]


def test_header_keys_in_any_order_or_missing() -> None:
    text = f"manifestVersion=3.0\nListOfSeriesToDownload=\n{UID_A}\n"
    manifest = parse_manifest(text)
    assert manifest.series_uids == [UID_A]
    assert manifest.download_server_url is None
    assert manifest.databasket_id is None


def test_a_list_without_its_marker_is_still_read() -> None:
    assert parse_manifest(f"{UID_A}\n{UID_B}\n").series_uids == [UID_A, UID_B]


def test_duplicates_are_dropped_keeping_first_order() -> None:
    text = f"ListOfSeriesToDownload=\n{UID_B}\n{UID_A}\n{UID_B}\n"
    assert parse_manifest(text).series_uids == [UID_B, UID_A]


def test_a_byte_order_mark_is_ignored() -> None:
    assert parse_manifest("\ufeff" + PORTAL).manifest_version == "3.0"


@pytest.mark.parametrize(
    "bad",
    ["1.2.abc", "1..2", ".1.2", "1" + ".1" * 40, "<html>"],
)
def test_a_line_that_is_not_a_uid_is_refused_naming_its_line(bad: str) -> None:
    text = f"manifestVersion=3.0\nListOfSeriesToDownload=\n{UID_A}\n{bad}\n"
    with pytest.raises(ManifestError, match="line 4"):
        parse_manifest(text)


def test_an_empty_manifest_is_refused() -> None:
    with pytest.raises(ManifestError, match="no series"):
        parse_manifest("manifestVersion=3.0\nListOfSeriesToDownload=\n")


def test_manifest_error_is_a_value_error_and_a_config_error() -> None:
    assert issubclass(ManifestError, ValueError)
    assert issubclass(ManifestError, ConfigError)


def test_error_names_the_file() -> None:
    with pytest.raises(ManifestError, match=r"^basket\.tcia, line 1"):
        parse_manifest("garbage line\n", name="basket.tcia")
