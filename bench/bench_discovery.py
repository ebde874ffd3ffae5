"""Discovery and claim cost on a large SQLite catalog.

    python bench/bench_discovery.py [--series 1000000] [--db PATH]

Builds a catalog of N done series (bulk insert straight into SQLite after the real
migration), then times, through the real Catalog API:
  (a) an incremental upsert of 2,000 changed + 1,000 new series (a typical busy day);
  (b) claiming work: a batch of 8 from that queue, and a claim that finds nothing;
  (c) next_ready_at and state_counts (status reporting).
Peak RSS is the process high-water mark after each step (getrusage).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sqlite3
import sys
import tempfile
import time
from collections.abc import Awaitable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nbia_sync.api.models import SeriesInfo
from nbia_sync.catalog import Catalog
from nbia_sync.config import SourceSettings

RELEASED = datetime(2023, 1, 1, tzinfo=UTC)
# SQLAlchemy's SQLite DATETIME text format (naive UTC, as the catalog stores it).
_TS = "%Y-%m-%d %H:%M:%S.%f"
T = TypeVar("T")


def _uid(i: int) -> str:
    return f"1.3.6.1.4.1.14519.5.2.1.{i:09d}"


def _rows(n: int, source_id: int) -> Iterator[tuple[object, ...]]:
    released = RELEASED.replace(tzinfo=None).strftime(_TS)
    for i in range(n):
        yield (
            source_id,
            _uid(i),
            f"1.2.{i // 4}",
            f"COLL-{i % 50}",
            f"P{i // 20}",
            "CT",
            100,
            100 * 520_000,
            released,
            "done",
            0,
            1,
            1,
            100 * 520_000,
            f"m/{i}",
            released,
            released,
            released,
        )


def build(path: Path, n: int, source_id: int) -> None:
    """Bulk insert n done series (one transaction; minutes would be spent otherwise)."""
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA synchronous = OFF")
    con.execute("BEGIN")
    con.executemany(
        "INSERT INTO series (source_id, series_uid, study_uid, collection, patient_id, "
        "modality, image_count, file_size, date_released, state, attempts, generation, "
        "downloads, bytes, placed_path, placed_at, discovered_at, updated_at) "
        "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        _rows(n, source_id),
    )
    con.execute("COMMIT")
    con.close()


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def timed(label: str, results: list[tuple[str, float, float]], step: Awaitable[T]) -> T:
    start = time.perf_counter()
    value = await step
    results.append((label, time.perf_counter() - start, peak_mib()))
    return value


async def run(n: int, path: Path) -> None:
    url = f"sqlite+aiosqlite:///{path}"
    source = SourceSettings(name="bench", url="http://127.0.0.1:1/nbia-api/")
    catalog = await Catalog.open(url)
    source_id = await catalog.sources.ensure_source(source)
    await catalog.close()

    start = time.perf_counter()
    build(path, n, source_id)
    build_s = time.perf_counter() - start

    results: list[tuple[str, float, float]] = [("build (bulk insert)", build_s, peak_mib())]
    catalog = await Catalog.open(url)
    try:
        later = RELEASED + timedelta(days=30)
        step = max(1, n // 2000)
        changed = [
            SeriesInfo(
                series_uid=_uid(i),
                study_uid=f"1.2.{i // 4}",
                collection=f"COLL-{i % 50}",
                patient_id=f"P{i // 20}",
                modality="CT",
                image_count=100,
                file_size=100 * 520_000,
                date_released=later,
            )
            for i in range(0, step * 2000, step)
        ]
        new = [
            SeriesInfo(
                series_uid=_uid(n + i),
                study_uid=f"9.{i}",
                collection="COLL-NEW",
                patient_id=f"N{i}",
                modality="MR",
                image_count=10,
                file_size=5_000_000,
                date_released=later,
            )
            for i in range(1000)
        ]
        result = await timed(
            "upsert 2,000 changed + 1,000 new",
            results,
            catalog.sources.upsert_series(source_id, changed + new),
        )
        await timed(
            "upsert same 3,000 again (no change)",
            results,
            catalog.sources.upsert_series(source_id, changed + new),
        )
        await timed(
            "claim 8 (3,000 queued)",
            results,
            catalog.queue.claim("bench", limit=8, lease_seconds=60),
        )
        while await catalog.queue.claim("drain", limit=500, lease_seconds=600):
            pass
        await timed(
            "claim 8 (nothing ready)",
            results,
            catalog.queue.claim("bench", limit=8, lease_seconds=60),
        )
        await timed("next_ready_at", results, catalog.queue.next_ready_at())
        await timed("state_counts", results, catalog.state_counts())
    finally:
        await catalog.close()

    print(f"\nSQLite catalog of {n:,} series at {path}; upsert result: {result}")
    print(f"{'step':<40}{'seconds':>10}{'peak RSS MiB':>15}")
    for label, seconds, rss in results:
        print(f"{label:<40}{seconds:>10.3f}{rss:>15.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=1_000_000)
    parser.add_argument("--db", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.db or Path(tmp) / "catalog.sqlite"
        if path.exists():
            parser.error(f"{path} exists; give a new path")
        asyncio.run(run(args.series, path))


if __name__ == "__main__":
    main()
