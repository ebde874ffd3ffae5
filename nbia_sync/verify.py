"""`nbia-sync verify`: re-hash the mirror against the catalog, rclone-check style.

Each problem is one of: missing (the catalog has it, the disk does not), differs (MD5 or
size), extra (a file in the mirror tree the catalog does not know), error (unreadable).
Hashing runs in worker threads so the event loop stays free and both cores are used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import AsyncIterable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import anyio
import structlog

from nbia_sync.catalog.records import InstanceRecord
from nbia_sync.config import Settings
from nbia_sync.status import require_catalog
from nbia_sync.storage import require_mirror

log = structlog.get_logger(__name__)

ProblemKind = Literal["missing", "differs", "extra", "error"]
STATE_DIR = ".nbia-sync"
_READ_SIZE = 1 << 20


class InstanceSource(Protocol):
    """What verify needs of the catalog: each done series' UID with its instances."""

    def iter_done_instances(self) -> AsyncIterable[tuple[str, list[InstanceRecord]]]: ...


@dataclass(frozen=True, slots=True)
class Problem:
    kind: ProblemKind
    path: str  # relative to the mirror root, '/'-separated
    detail: str = ""
    # The series the file belongs to (none for an extra file); not part of the problem's
    # identity: the same file is the same problem.
    series_uid: str = field(default="", compare=False)

    def __str__(self) -> str:
        return f"{self.kind}: {self.path}" + (f" ({self.detail})" if self.detail else "")


@dataclass(slots=True)
class VerifyReport:
    checked: int = 0  # files the catalog lists
    matched: int = 0
    bytes: int = 0  # bytes hashed
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def count(self, kind: ProblemKind) -> int:
        return sum(1 for p in self.problems if p.kind == kind)

    def damaged_series(self) -> list[str]:
        """Series with a missing or differing file: what `verify --repair` queues again."""
        kinds = ("missing", "differs")
        return sorted({p.series_uid for p in self.problems if p.kind in kinds and p.series_uid})


def require_mirror_here(settings: Settings) -> None:
    """MirrorRootError (exit 2) unless mirror.root holds a mirror and its catalog."""
    require_mirror(settings.mirror.root)
    require_catalog(settings)


def _hash_file(path: Path) -> tuple[str, int]:
    digest = hashlib.md5(usedforsecurity=False)
    size = 0
    with path.open("rb") as fh:
        while chunk := fh.read(_READ_SIZE):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _check(root: Path, record: InstanceRecord) -> Problem | int:
    """The problem with one file, or its size when it matches."""
    path = root / record.path
    try:
        md5, size = _hash_file(path)
    except FileNotFoundError:
        return Problem("missing", record.path)
    except OSError as exc:
        return Problem("error", record.path, exc.strerror or type(exc).__name__)
    if size != record.size:
        return Problem("differs", record.path, f"size {size}, catalog says {record.size}")
    if md5 != record.md5:
        return Problem("differs", record.path, f"md5 {md5}, catalog says {record.md5}")
    return size


def _walk(root: Path) -> list[str]:
    """Every file under the mirror root, relative, bookkeeping directory excluded."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        if dirpath == str(root) and STATE_DIR in dirnames:
            dirnames.remove(STATE_DIR)
        base = Path(dirpath)
        found.extend((base / name).relative_to(root).as_posix() for name in filenames)
    return found


async def verify_mirror(
    catalog: InstanceSource,
    root: Path,
    *,
    threads: int = 2,
    on_problem: Callable[[Problem], None] | None = None,
) -> VerifyReport:
    """Check every placed file, then look for files the catalog does not know."""
    report = VerifyReport()
    known: set[str] = set()
    # Bounds both the threads in use and the records held in memory at once.
    slots = anyio.Semaphore(max(1, threads))

    def record(problem: Problem) -> None:
        report.problems.append(problem)
        if on_problem is not None:
            on_problem(problem)

    async def check(series_uid: str, rec: InstanceRecord) -> None:
        try:
            result = await anyio.to_thread.run_sync(_check, root, rec)
        finally:
            slots.release()
        if isinstance(result, Problem):
            record(dataclasses.replace(result, series_uid=series_uid))
        else:
            report.matched += 1
            report.bytes += result

    async with anyio.create_task_group() as tg:
        async for series_uid, instances in catalog.iter_done_instances():
            for rec in instances:
                report.checked += 1
                known.add(rec.path)
                await slots.acquire()
                tg.start_soon(check, series_uid, rec)

    for rel in sorted(await anyio.to_thread.run_sync(_walk, root)):
        if rel not in known:
            record(Problem("extra", rel))
    log.info(
        "verify_finished",
        checked=report.checked,
        matched=report.matched,
        missing=report.count("missing"),
        differs=report.count("differs"),
        extra=report.count("extra"),
        errors=report.count("error"),
    )
    return report
