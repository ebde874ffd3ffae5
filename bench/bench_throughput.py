"""Throughput benchmark: nbia-sync vs the ideal and vs a tcia-utils-style baseline.

    python bench/bench_throughput.py            # full cases (several GB on disk, minutes)
    python bench/bench_throughput.py --quick    # scaled down (about a minute or two)
    python bench/bench_throughput.py --case small --case latency

For each case one simulator process serves one generated archive; the engine
(`python -m nbia_sync -c cfg sync`, a fresh mirror) and then the baseline
(bench/baseline_tciautils.py, a fresh folder) each download all of it, each as its own
measured subprocess. Printed per case and client:

  wall        seconds, start of the process to its exit (discovery included)
  ideal       fraction of the ideal: ideal seconds / wall, where ideal seconds =
              max(sum over series of (latency + zip bytes / per-stream cap) / streams,
                  the longest single series) -- the sim's settings, streams = 10 for both
  ref-ideal   the reference table's definition: (bytes / (streams x cap)) / wall,
              latency not allowed for (nbia-api.md, last section); streams here is
              min(10, series), since 3 series can use only 3 streams
  vs base     engine speed / baseline speed (baseline wall / engine wall)
  wr/dl       bytes the process wrote (/proc/<pid>/io write_bytes: what reached the
              block layer, catalog and journal included) per byte the sim sent it;
              wchar/dl = bytes passed to write() per byte downloaded
  RSS         peak resident set of the process (ru_maxrss via wait4)
  CPU s/GB    user+system seconds of the process per GB the sim sent it
  right       series whose files match the archive's MD5s exactly

The "faults" case repeats the fault mix of nbia-api.md's table (20 % truncated, 20 %
corrupt, 10 % reset); the engine runs with its default max_attempts (6), so ideal there
is not a speed target but "right" is the point.

The simulator's own CPU over the same interval is printed too: on a 2-core machine the
client and the simulator compete for the cores, so CPU-bound cases understate both.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    PYTHON,
    REPO,
    Measured,
    SimProcess,
    check_baseline_dir,
    check_engine_mirror,
    engine_argv,
    ideal_seconds,
    run_measured,
    series_seconds,
    write_config,
)

STREAMS = 10  # the baseline's thread count; the engine gets as many workers
MB = 1_000_000


@dataclass
class Case:
    name: str
    what: str
    archive: dict[str, Any]
    latency: float  # seconds per request
    bandwidth: int  # bytes/s per stream
    check: bool = True  # MD5 every file afterwards (slow for the huge case)
    faults: dict[str, Any] = field(default_factory=dict)


def cases(quick: bool) -> list[Case]:
    def arch(series: int, images: int, image_size: int, seed: int) -> dict[str, Any]:
        # One collection, one study per patient, one series per study: the series count
        # is what matters here.
        return {
            "seed": seed,
            "collections": ["BENCH-CT"],
            "patients": series,
            "studies": 1,
            "series": 1,
            "images": images,
            "image_size": image_size,
        }

    # The quick run scales the series counts down and the huge files' count down tenfold;
    # the settings (caps, latencies, faults) stay those of the full run.
    small, latency_series, huge_images = (100, 24, 40) if quick else (500, 96, 400)
    reference = arch(48, 8, 128_000, 2)
    return [
        Case(
            "small",
            f"{small} series x 1 file of 20 KB",
            arch(small, 1, 20_000, 1),
            latency=0.0,
            bandwidth=2 * MB,
        ),
        Case(
            "reference",
            "48 series x 8 files of 128 KB, 50 ms (nbia-api.md's setup)",
            reference,
            latency=0.05,
            bandwidth=2 * MB,
        ),
        Case(
            "latency",
            f"{latency_series} series x 4 files of 128 KB, 200 ms",
            arch(latency_series, 4, 128_000, 3),
            latency=0.2,
            bandwidth=2 * MB,
        ),
        Case(
            "faults",
            "the reference setup with 20% truncated + 20% corrupt + 10% reset",
            {**reference, "seed": 5},
            latency=0.05,
            bandwidth=2 * MB,
            faults={"truncate": 0.2, "corrupt": 0.2, "reset": 0.1, "seed": 11},
        ),
        Case(
            "huge",
            f"3 series x {huge_images} files of 5 MB ({huge_images * 5 / 1000:g} GB each)",
            arch(3, huge_images, 5 * MB, 4),
            latency=0.0,
            bandwidth=40 * MB,
            # Hashing 6 GB afterwards takes minutes; the quick run still checks it.
            check=quick,
        ),
    ]


def bytes_sent(before: dict[str, Any], after: dict[str, Any]) -> int:
    return int(after["counters"]["bytes_sent"]) - int(before["counters"]["bytes_sent"])


@dataclass
class Row:
    client: str
    m: Measured
    downloaded: int
    sim_cpu: float
    right: int | None


def run_case(case: Case, work: Path) -> tuple[list[Row], float, int, int]:
    faults = {"latency": case.latency, "bandwidth": case.bandwidth, **case.faults}
    with SimProcess(case.archive, faults, work / "sim") as sim:
        ideal = ideal_seconds(series_seconds(sim.sizes, case.latency, case.bandwidth), STREAMS)
        total = sum(sim.sizes.values())
        rows: list[Row] = []

        root = work / "mirror"
        cfg = write_config(work / "nbia-sync.toml", root=root, url=sim.url, workers=STREAMS)
        c0 = sim.counters()
        m = run_measured(engine_argv(cfg, "sync"), cwd=REPO, log_dir=work, name="engine")
        c1 = sim.counters()
        right = check_engine_mirror(root, sim.truth, sim.layout)[0] if case.check else None
        if m.returncode != 0:
            print(f"  engine exited {m.returncode}: {m.stderr[-2000:]}", file=sys.stderr)
        rows.append(Row("nbia-sync", m, bytes_sent(c0, c1), c1["cpu"] - c0["cpu"], right))
        # The fixed cost inside every engine wall time: interpreter, imports, catalog open.
        s = run_measured(
            engine_argv(cfg, "status", "--json"), cwd=REPO, log_dir=work, name="status"
        )
        print(
            f"  [{case.name}] engine start-up (`status --json` on the synced mirror): "
            f"{s.wall:.2f} s wall, {s.maxrss / 2**20:.0f} MiB RSS, exit {s.returncode}"
        )
        shutil.rmtree(root, ignore_errors=True)

        out = work / "baseline"
        m = run_measured(
            [
                PYTHON,
                str(Path(__file__).resolve().parent / "baseline_tciautils.py"),
                "--url",
                sim.url,
                "--out",
                str(out),
                "--threads",
                str(STREAMS),
            ],
            cwd=REPO,
            log_dir=work,
            name="baseline",
        )
        c2 = sim.counters()
        right = check_baseline_dir(out, sim.truth) if case.check else None
        rows.append(Row("tcia-utils-style", m, bytes_sent(c1, c2), c2["cpu"] - c1["cpu"], right))
        shutil.rmtree(out, ignore_errors=True)
    return rows, ideal, total, len(sim.sizes)


def report(case: Case, rows: list[Row], ideal: float, total: int, n: int) -> list[dict[str, Any]]:
    print(
        f"\n== {case.name}: {case.what}; {total / MB:.1f} MB in {n} series; "
        f"cap {case.bandwidth / MB:g} MB/s per stream, latency {case.latency * 1000:g} ms, "
        f"{STREAMS} streams; ideal {ideal:.2f} s"
    )
    head = (
        f"{'client':<17}{'exit':>5}{'wall s':>9}{'ideal':>7}{'ref-ideal':>10}"
        f"{'vs base':>8}{'series/s':>9}{'wr/dl':>7}{'wchar/dl':>9}{'RSS MiB':>8}"
        f"{'CPU s/GB':>10}{'sim CPU':>9}{'right':>9}"
    )
    print(head)
    base_wall = rows[-1].m.wall
    streams = min(STREAMS, n)  # fewer series than streams: only that many can run
    out: list[dict[str, Any]] = []
    for r in rows:
        dl = max(r.downloaded, 1)
        rec = {
            "case": case.name,
            "client": r.client,
            "exit": r.m.returncode,
            "wall": round(r.m.wall, 2),
            "fraction_of_ideal": round(ideal / r.m.wall, 3),
            "reference_fraction": round(total / (streams * case.bandwidth) / r.m.wall, 3),
            "vs_baseline": round(base_wall / r.m.wall, 2),
            "series_per_s": round(n / r.m.wall, 1),
            "write_per_download": round(r.m.io.get("write_bytes", 0) / dl, 3),
            "wchar_per_download": round(r.m.io.get("wchar", 0) / dl, 3),
            "rss_mib": round(r.m.maxrss / 2**20, 1),
            "cpu_s_per_gb": round(r.m.cpu / (dl / 1e9), 1),
            "sim_cpu_s": round(r.sim_cpu, 1),
            "right": f"{r.right}/{n}" if r.right is not None else "n/c",
            "downloaded": r.downloaded,
        }
        out.append(rec)
        print(
            f"{r.client:<17}{rec['exit']:>5}{rec['wall']:>9.2f}{rec['fraction_of_ideal']:>7.2f}"
            f"{rec['reference_fraction']:>10.2f}{rec['vs_baseline']:>8.2f}"
            f"{rec['series_per_s']:>9.1f}{rec['write_per_download']:>7.2f}"
            f"{rec['wchar_per_download']:>9.2f}{rec['rss_mib']:>8.1f}"
            f"{rec['cpu_s_per_gb']:>10.1f}{rec['sim_cpu_s']:>9.1f}{rec['right']:>9}"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="nbia-sync throughput vs ideal and baseline")
    ap.add_argument("--quick", action="store_true", help="scaled-down cases")
    ap.add_argument("--case", action="append", default=[], help="run only these cases")
    ap.add_argument("--workdir", type=Path, default=None, help="keep logs here")
    ap.add_argument("--json", type=Path, default=None, help="also write results here")
    args = ap.parse_args(argv)

    selected = [c for c in cases(args.quick) if not args.case or c.name in args.case]
    base = args.workdir or Path(tempfile.mkdtemp(prefix="nbia-bench-"))
    results: list[dict[str, Any]] = []
    for case in selected:
        rows, ideal, total, n = run_case(case, base / case.name)
        results.extend(report(case, rows, ideal, total, n))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if args.workdir is None:
        shutil.rmtree(base, ignore_errors=True)
    return 0 if all(r["exit"] == 0 for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
