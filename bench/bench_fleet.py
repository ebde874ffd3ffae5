"""Fleet scaling: 1, 2 and 4 `nbia-sync sync` processes on one PostgreSQL catalog.

    python bench/bench_fleet.py              # 40 series of ~2 MB, 1 MB/s per stream
    python bench/bench_fleet.py --quick      # 16 series (about half a minute)
    python bench/bench_fleet.py --procs 1 --procs 3

The simulator runs as its own process (`python -m nbia_sync.sim`, a per-stream bandwidth
cap); for each fleet size N a fresh PostgreSQL database and a fresh mirror root are made,
N sync processes (each with `--workers` download workers) start together, and the fleet
is timed from the first start to the last exit. Printed per N:

  wall       seconds, first process started to last process exited
  span       seconds, first process started to the last series placed (catalog's
             placed_at): the fleet's work without the last process's wind-down
  work       seconds, first pass started (imports and catalog opening done) to the last
             series placed: the part the claim protocol is responsible for
  MB/s       series bytes / wall
  linear     fraction of linear scaling: throughput_N / (N x throughput_1), by wall
  w-lin      the same by work seconds (Python start-up of N processes on few cores and
             the wind-down excluded)
  ideal      fraction of the cap: (bytes / (N x workers x cap)) / wall
  right      series whose files carry the archive's MD5s (must be all)
  twice      series the catalog says were downloaded more than once (must be 0)
  tx/s       catalog transactions committed by the fleet per series (PostgreSQL's
             pg_stat_database.xact_commit over the run): the load the claim protocol
             puts on the shared database

The bandwidth cap makes each stream slow on purpose: a fleet is for aggregating streams
the archive limits one by one, so linear scaling is what a working claim protocol gives.
Skips (exit 0, with a message) when PostgreSQL is not reachable on 127.0.0.1:5432.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PG_HOST, PG_PORT = "127.0.0.1", 5432
PG_ADMIN = f"postgresql://postgres@{PG_HOST}:{PG_PORT}/test"
MB = 1_000_000
ENGINE = [sys.executable, "-m", "nbia_sync"]


@dataclass
class Result:
    procs: int
    wall: float
    span: float
    work: float
    bytes: int
    right: int
    series: int
    twice: int
    codes: list[int]
    commits: int

    @property
    def rate(self) -> float:
        return self.bytes / self.wall

    @property
    def work_rate(self) -> float:
        return self.bytes / self.work


def pg_reachable() -> bool:
    try:
        with socket.create_connection((PG_HOST, PG_PORT), timeout=1.0):
            return True
    except OSError:
        return False


async def _admin(sql: str) -> None:
    import asyncpg  # type: ignore[import-untyped]

    conn = await asyncpg.connect(PG_ADMIN)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _commits(database: str) -> int:
    """Transactions committed in ``database`` so far (pg_stat_database)."""
    import asyncpg  # type: ignore[import-untyped]

    conn = await asyncpg.connect(PG_ADMIN)
    try:
        value = await conn.fetchval(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = $1", database
        )
    finally:
        await conn.close()
    return int(value or 0)


def start_sim(args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen[str], str]:
    argv = [
        sys.executable,
        "-m",
        "nbia_sync.sim",
        "--seed",
        "7",
        "--collections",
        "BENCH-FLEET",
        "--patients",
        str(args.series),
        "--studies",
        "1",
        "--series",
        "1",
        "--images",
        str(args.images),
        "--image-size",
        str(args.image_size),
        "--bandwidth",
        str(args.bandwidth),
    ]
    with open(log, "wb") as err:
        proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True)
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()
    if not url.startswith("http"):
        proc.kill()
        raise SystemExit(f"the simulator did not start; see {log}")
    return proc, url


def archive_truth(args: argparse.Namespace) -> dict[Path, str]:
    """Relative mirror path -> MD5, from the same deterministic archive the sim serves."""
    from nbia_sync.sim import SimArchive

    archive = SimArchive.generate(
        seed=7,
        collections=["BENCH-FLEET"],
        patients=args.series,
        studies=1,
        series=1,
        images=args.images,
        image_size=args.image_size,
    )
    truth = archive.truth()
    return {
        Path(s.collection, s.patient_id, s.study_uid, s.uid, f"{sop}.dcm"): md5
        for s in archive.series.values()
        for sop, md5 in truth[s.uid].items()
    }


def write_config(path: Path, root: Path, url: str, catalog: str, workers: int) -> Path:
    path.write_text(f"""\
[mirror]
root = {json.dumps(str(root))}
min_free_bytes = 0

[catalog]
url = {json.dumps(catalog)}

[transfer]
workers = {workers}
heartbeat_interval = 1.0
lease_seconds = 30.0

[logging]
level = "warning"
format = "json"

[[sources]]
name = "sim"
url = {json.dumps(url)}
api = "v2"
""")
    return path


async def catalog_facts(url: str) -> tuple[datetime | None, datetime | None, int]:
    """(first pass started, last series placed, series downloaded more than once)."""
    from sqlalchemy import func, select

    from nbia_sync.catalog import Catalog
    from nbia_sync.catalog.tables import RUNS, SERIES

    catalog = await Catalog.open(url)
    try:
        async with catalog.database.read() as conn:
            first = await conn.scalar(select(func.min(RUNS.c.started_at)))
            last = await conn.scalar(select(func.max(SERIES.c.placed_at)))
            twice = await conn.scalar(
                select(func.count()).select_from(SERIES).where(SERIES.c.downloads > 1)
            )
    finally:
        await catalog.close()
    return first, last, int(twice or 0)


def check_mirror(root: Path, truth: dict[Path, str]) -> int:
    """Series whose every file is present with the right MD5."""
    bad_series = set()
    for rel, md5 in truth.items():
        path = root / rel
        if not path.is_file() or hashlib.md5(path.read_bytes()).hexdigest() != md5:
            bad_series.add(rel.parent)
    return len({rel.parent for rel in truth}) - len(bad_series)


def run_fleet(
    n: int, args: argparse.Namespace, url: str, work: Path, truth: dict[Path, str], total_bytes: int
) -> Result:
    name = f"nbia_fleet_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    catalog = f"postgresql+asyncpg://postgres@{PG_HOST}:{PG_PORT}/{name}"
    root = work / f"mirror-{n}"
    try:
        config = write_config(work / f"fleet-{n}.toml", root, url, catalog, args.workers)
        # Migrate before the clock starts: the bench measures the fleet, not alembic.
        subprocess.run(
            [*ENGINE, "-c", str(config), "status"], cwd=REPO, check=True, capture_output=True
        )
        commits_before = asyncio.run(_commits(name))
        logs = [open(work / f"fleet-{n}-{i}.err", "wb") for i in range(n)]  # noqa: SIM115
        t0 = time.time()
        procs = [
            subprocess.Popen(
                [*ENGINE, "-c", str(config), "sync"],
                cwd=REPO,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
            for log in logs
        ]
        codes = [p.wait() for p in procs]
        wall = time.time() - t0
        for log in logs:
            log.close()
        # Each backend reports its counts as it ends; give the last ones a moment.
        time.sleep(1.0)
        committed = asyncio.run(_commits(name)) - commits_before
        first, last, twice = asyncio.run(catalog_facts(catalog))
        span = (last.timestamp() - t0) if last is not None else float("nan")
        work = (last - first).total_seconds() if first and last else float("nan")
        right = check_mirror(root, truth)
    finally:
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        shutil.rmtree(root, ignore_errors=True)
    series = len({r.parent for r in truth})
    return Result(n, wall, span, work, total_bytes, right, series, twice, codes, committed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 series instead of 40")
    parser.add_argument("--procs", type=int, action="append", help="fleet sizes (1 2 4)")
    parser.add_argument("--workers", type=int, default=2, help="download workers per process")
    parser.add_argument("--bandwidth", type=int, default=MB, help="bytes/s per stream")
    parser.add_argument("--series", type=int, default=None)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=500_000)
    args = parser.parse_args(argv)
    args.series = args.series or (16 if args.quick else 40)
    sizes: list[int] = sorted(set(args.procs or [1, 2, 4]))
    if 1 not in sizes:
        sizes.insert(0, 1)  # the linear-scaling reference

    import logging

    import structlog

    # The bench reads the catalogs itself: keep the library's debug lines off the table.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    if not pg_reachable():
        print(
            f"bench_fleet: skipped: PostgreSQL is not reachable at {PG_HOST}:{PG_PORT} "
            "(a fleet needs a PostgreSQL catalog)"
        )
        return 0

    truth = archive_truth(args)
    total_bytes = args.series * args.images * args.image_size
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        work = Path(tmp)
        sim, url = start_sim(args, work / "sim.log")
        try:
            print(
                f"archive: {args.series} series x {args.images} images x "
                f"{args.image_size / MB:.2f} MB = {total_bytes / MB:.0f} MB; "
                f"{args.bandwidth / MB:g} MB/s per stream; {args.workers} workers per process",
                flush=True,
            )
            results: list[Result] = []
            for n in sizes:
                results.append(run_fleet(n, args, url, work, truth, total_bytes))
                r = results[-1]
                print(f"  {n} process(es): {r.wall:.1f} s, exit codes {r.codes}", flush=True)
        finally:
            sim.terminate()
            sim.wait(timeout=15)
    base, work_base = results[0].rate, results[0].work_rate
    print()
    print(
        f"{'procs':>5} {'wall s':>7} {'span s':>7} {'work s':>7} {'MB/s':>6} {'linear':>7} "
        f"{'w-lin':>6} {'ideal':>6} {'right':>7} {'twice':>5} {'tx/s':>5}"
    )
    for r in results:
        linear = r.rate / (r.procs * base)
        work_linear = r.work_rate / (r.procs * work_base)
        ideal = (r.bytes / (r.procs * args.workers * args.bandwidth)) / r.wall
        print(
            f"{r.procs:>5} {r.wall:>7.1f} {r.span:>7.1f} {r.work:>7.1f} {r.rate / MB:>6.2f} "
            f"{linear:>7.2f} {work_linear:>6.2f} {ideal:>6.2f} {r.right:>3}/{r.series:<3} "
            f"{r.twice:>5} {r.commits / r.series:>5.1f}"
        )
    ok = all(r.right == r.series and r.twice == 0 and set(r.codes) == {0} for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
