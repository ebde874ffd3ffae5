"""The shortcuts on the per-series path agree with the general code they skip."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbia_sync import storage
from nbia_sync.storage import Mirror, safe_part


@settings(max_examples=300)
@given(st.text(alphabet=st.characters(max_codepoint=0x7F), max_size=70))
def test_the_fast_path_for_plain_names_agrees_with_the_escaping_walk(text: str) -> None:
    fast = safe_part(text)
    real = storage._PLAIN_PART
    storage._PLAIN_PART = re.compile(r"(?!)")  # never matches: every name takes the walk
    try:
        walked = safe_part(text)
    finally:
        storage._PLAIN_PART = real
    assert fast == walked


def test_relative_path_under_the_root_is_slash_separated(tmp_path: Path) -> None:
    m = Mirror(tmp_path / "mirror")
    path = m.series_dir("C", "P", "1.2", "1.2.3") / "4.dcm"
    assert (
        m.relative(path)
        == path.relative_to(tmp_path / "mirror").as_posix()
        == "C/P/1.2/1.2.3/4.dcm"
    )


def test_relative_refuses_a_path_outside_the_root(tmp_path: Path) -> None:
    m = Mirror(tmp_path / "mirror")
    with pytest.raises(ValueError):
        m.relative(tmp_path / "mirror-other" / "x.dcm")  # shares the root's text as a prefix


def test_relative_works_for_a_root_at_the_file_system_root() -> None:
    assert Mirror(Path("/")).relative(Path("/a/b.dcm")) == "a/b.dcm"
