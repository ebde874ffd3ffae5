"""verify_mirror: every placed file re-hashed; missing, differs, extra and error reported."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from nbia_sync.catalog.records import InstanceRecord
from nbia_sync.verify import Problem, verify_mirror

pytestmark = pytest.mark.asyncio


class FakeCatalog:
    def __init__(self, records: list[InstanceRecord]) -> None:
        self.records = records

    async def iter_done_instances(self) -> AsyncIterator[tuple[str, list[InstanceRecord]]]:
        # Two "series" per page, as the catalog pages them.
        for start in range(0, len(self.records), 2):
            yield f"1.2.{start}", self.records[start : start + 2]


def place(root: Path, rel: str, data: bytes) -> InstanceRecord:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return InstanceRecord(
        sop_uid=Path(rel).stem, md5=hashlib.md5(data).hexdigest(), size=len(data), path=rel
    )


def mirror(root: Path, files: int = 5) -> FakeCatalog:
    return FakeCatalog(
        [
            place(root, f"C/P/1.2/1.2.{n % 2}/1.2.3.{n}.dcm", os.urandom(3000 + n))
            for n in range(files)
        ]
    )


async def test_clean_mirror_has_no_problems(tmp_path: Path) -> None:
    report = await verify_mirror(mirror(tmp_path), tmp_path)
    assert report.ok
    assert (report.checked, report.matched) == (5, 5)
    assert report.bytes == sum(3000 + n for n in range(5))


async def test_tampered_file_differs(tmp_path: Path) -> None:
    catalog = mirror(tmp_path)
    victim = tmp_path / catalog.records[2].path
    data = bytearray(victim.read_bytes())
    data[100] ^= 0xFF  # same size, different content
    victim.write_bytes(bytes(data))
    report = await verify_mirror(catalog, tmp_path)
    assert [(p.kind, p.path) for p in report.problems] == [("differs", catalog.records[2].path)]
    assert "md5" in report.problems[0].detail


async def test_truncated_file_differs_by_size(tmp_path: Path) -> None:
    catalog = mirror(tmp_path)
    (tmp_path / catalog.records[0].path).write_bytes(b"short")
    [problem] = (await verify_mirror(catalog, tmp_path)).problems
    assert problem.kind == "differs" and "size 5" in problem.detail


async def test_missing_file_is_reported(tmp_path: Path) -> None:
    catalog = mirror(tmp_path)
    (tmp_path / catalog.records[4].path).unlink()
    report = await verify_mirror(catalog, tmp_path)
    assert report.problems == [Problem("missing", catalog.records[4].path)]


async def test_extra_file_is_reported(tmp_path: Path) -> None:
    catalog = mirror(tmp_path)
    (tmp_path / "C" / "stray.dcm").write_bytes(b"x")
    report = await verify_mirror(catalog, tmp_path)
    assert report.problems == [Problem("extra", "C/stray.dcm")]


async def test_bookkeeping_directory_is_not_extra(tmp_path: Path) -> None:
    catalog = mirror(tmp_path)
    state = tmp_path / ".nbia-sync" / "staging" / "owner"
    state.mkdir(parents=True)
    (state / "partial.dcm").write_bytes(b"p")
    (tmp_path / ".nbia-sync" / "catalog.sqlite").write_bytes(b"db")
    assert (await verify_mirror(catalog, tmp_path)).ok


async def test_unreadable_file_is_an_error(tmp_path: Path) -> None:
    catalog = mirror(tmp_path)
    victim = tmp_path / catalog.records[1].path
    victim.unlink()
    victim.mkdir()  # a directory where a file should be: reading it fails with EISDIR
    report = await verify_mirror(catalog, tmp_path)
    assert [p.kind for p in report.problems] == ["error"]
    assert report.problems[0].path == catalog.records[1].path


async def test_every_problem_is_passed_to_the_callback(tmp_path: Path) -> None:
    catalog = mirror(tmp_path)
    (tmp_path / catalog.records[0].path).unlink()
    (tmp_path / "extra.bin").write_bytes(b"e")
    seen: list[Problem] = []
    report = await verify_mirror(catalog, tmp_path, on_problem=seen.append)
    assert sorted(map(str, seen)) == sorted(map(str, report.problems))
    assert len(seen) == 2


async def test_problem_text_is_rclone_style() -> None:
    assert str(Problem("missing", "a/b.dcm")) == "missing: a/b.dcm"
    assert str(Problem("differs", "a/b.dcm", "md5 x")) == "differs: a/b.dcm (md5 x)"
