"""What `fetch` reads: manifests, plain UID lists, CSV files; where it writes by default."""

from __future__ import annotations

from pathlib import Path

import pytest

from nbia_sync.cli import default_fetch_dir, source_name_for
from nbia_sync.config import DEFAULT_TCIA_URL
from nbia_sync.discovery import read_series_list
from nbia_sync.errors import ConfigError


def test_csv_takes_the_first_column_after_a_header(tmp_path: Path) -> None:
    path = tmp_path / "series.csv"
    path.write_text("SeriesInstanceUID,StudyInstanceUID\n1.2.3,4.5.6\n1.2.7,4.5.6\n")
    assert read_series_list(path) == ["1.2.3", "1.2.7"]


def test_csv_refuses_a_row_that_is_not_a_uid(tmp_path: Path) -> None:
    path = tmp_path / "series.csv"
    path.write_text("uid\n1.2.3\nnot-a-uid,1.2\n")
    with pytest.raises(ConfigError, match="line 3"):
        read_series_list(path)


def test_default_destination_is_named_after_the_manifest(tmp_path: Path) -> None:
    assert default_fetch_dir(tmp_path / "lung-ct.tcia") == Path("lung-ct")


def test_plain_list_without_header_is_read_as_uids(tmp_path: Path) -> None:
    path = tmp_path / "uids"
    path.write_text("1.2.3\r\n\r\n1.2.4\r\n1.2.3\r\n")
    assert read_series_list(path) == ["1.2.3", "1.2.4"]


def test_default_destination_never_is_the_list_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert default_fetch_dir((tmp_path / "uids").absolute()) == Path("uids-series")


def test_source_is_named_tcia_for_the_public_api() -> None:
    assert source_name_for(DEFAULT_TCIA_URL) == "tcia"
    assert source_name_for("http://127.0.0.1:8080/nbia-api/") == "127.0.0.1_8080"
