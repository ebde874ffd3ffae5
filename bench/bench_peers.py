"""nbia-sync beside the real peers (tcia-utils 3.3.5, nbiatoolkit 1.3.1), one run, ratios.

    python bench/bench_peers.py                 # every case (~5 min on 2 busy cores)
    python bench/bench_peers.py --case series40 --case onefile
    python bench/bench_peers.py --quick         # fewer one-file series
    python bench/bench_peers.py --no-peers      # skip the real peers (no venv needed)
    python bench/bench_peers.py --repeat 3      # every client 3 times in turn: medians

The peers are installed on first use into bench/.peers-venv (git-ignored; they are not
project dependencies) with pip: ``tcia_utils==3.3.5 nbiatoolkit==1.3.1``. Each client is a
measured subprocess against one simulator process per case (bench/_common.py), on a fresh
folder, in the same run:

  nbia-sync            ``python -m nbia_sync sync`` (discovery included), api v4, N workers
  tcia-utils 3.3.5     ``nbia.downloadSeries`` (its default max_workers = 10, and nbia-sync's N)
  nbiatoolkit 1.3.1    ``NBIAClient.downloadSeries`` (its default nParallel = 1, and N)
  in-house baseline    bench/baseline_tciautils.py (stdlib stand-in for tcia-utils' loop)
  bare aiohttp         bench/bare_fetch.py: fetch every archive and keep it (asyncio's
                       event loop; the kept archives give the CPU floor), then fetch and
                       discard (issue 15's bare client) on uvloop's, which nbia-sync uses
                       by default; and with no series at all (a client process's start-up)

Printed per client: wall, fraction of ideal, speed relative to nbia-sync, peak RSS, CPU
per GB. Then the case's ratios against the targets (issue 15), and the floors they are
bounded by, measured in the same run:
  - rounds: a stream carries one whole series at a time (an archive is one answer), so
    48 series on 10 streams take five rounds where the ideal counts 4.8;
  - a client process: the bare client's start-up, then those rounds;
  - CPU: MD5 + inflate of the same archives with hashlib and zlib in this process, and
    receiving the bytes alone (the discarding bare client's CPU less its start-up).
Each client runs after an os.sync(): the one before it leaves no writeback behind.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    PYTHON,
    REPO,
    Measured,
    SimProcess,
    check_engine_mirror,
    engine_argv,
    ideal_seconds,
    machine_fingerprint,
    run_measured,
    series_seconds,
    write_config,
)

BENCH = Path(__file__).resolve().parent
PEERS_VENV = BENCH / ".peers-venv"
PEERS = ("tcia_utils==3.3.5", "nbiatoolkit==1.3.1")
MB = 1_000_000
# Up to this many series, nbia-sync logs at info level and its drain window is reported.
DRAIN_LOG_MAX_SERIES = 100


def drain_window(stderr: str) -> float | None:
    """Seconds from the first series' start to the last one placed, from nbia-sync's
    JSON log (``series_done``: its timestamp and the series' own seconds)."""
    from datetime import datetime

    spans = []
    for line in stderr.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") == "series_done":
            end = datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00"))
            spans.append((end.timestamp() - float(event["seconds"]), end.timestamp()))
    if not spans:
        return None
    return max(e for _, e in spans) - min(s for s, _ in spans)


STARTUP_RUNS = 5
# Every client's output is deleted only after the last case: after tens of thousands of
# files are deleted, ext4 allocates inodes slowly for minutes (its `recently_deleted`
# check took ~20 % of a one-file nbia-sync run's samples, `perf record`), which would
# charge the next client for the previous one's clean-up.
LEFTOVERS: list[Path] = []


@dataclass
class Case:
    name: str
    what: str
    archive: dict[str, Any]
    latency: float
    bandwidth: int | None
    streams: int
    peers: bool = True  # run the real peers (one-file: bare client only)


def arch(series: int, images: int, image_size: int, seed: int) -> dict[str, Any]:
    return {
        "seed": seed,
        "collections": ["BENCH-CT"],
        "patients": series,
        "studies": 1,
        "series": 1,
        "images": images,
        "image_size": image_size,
    }


def cases(quick: bool) -> list[Case]:
    return [
        Case(
            "series40",
            "48 series x 40 files of 25 KB (~1 MB ZIP), 2 MB/s per stream, 50 ms",
            arch(48, 40, 25_000, 21),
            latency=0.05,
            bandwidth=2 * MB,
            streams=10,
        ),
        Case(
            "onefile",
            f"{1000 if quick else 5000} one-file series of 2 KB, 2 ms, uncapped",
            arch(1000 if quick else 5000, 1, 2_000, 22),
            latency=0.002,
            bandwidth=None,
            streams=8,
            peers=False,
        ),
        Case(
            # The same kind of series at a real archive's distance: latency, not CPU,
            # sets every client's pace.
            "onefile-wan",
            f"{500 if quick else 2000} one-file series of 2 KB, 50 ms, uncapped",
            arch(500 if quick else 2000, 1, 2_000, 25),
            latency=0.05,
            bandwidth=None,
            streams=8,
            peers=False,
        ),
        Case(
            "medium",
            "32 series x 4 files of 500 KB (2 MB), 1 MB/s per stream, 8 streams",
            arch(32, 4, 500_000, 23),
            latency=0.0,
            bandwidth=1 * MB,
            streams=8,
            peers=False,
        ),
        Case(
            "large",
            "3 series x 50 files of 2 MB (100 MB each), 20 MB/s per stream",
            arch(3, 50, 2 * MB, 24),
            latency=0.0,
            bandwidth=20 * MB,
            streams=10,
            peers=False,
        ),
    ]


def ensure_peers() -> Path:
    python = PEERS_VENV / "bin" / "python"
    if not python.exists():
        print(f"installing {', '.join(PEERS)} into {PEERS_VENV} (benchmark only)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(PEERS_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *PEERS], check=True)
    return python


def rounds_floor(per_series: list[float], n: int) -> float:
    """The ideal's bound when a stream carries one whole series at a time, as every client
    here does (an archive is one answer: it cannot be split across streams): the longest
    series first, each onto the stream free soonest. Above the ideal when the series do
    not divide evenly among the streams (48 onto 10: the fifth round has 8)."""
    free = [0.0] * n
    for t in sorted(per_series, reverse=True):
        heapq.heapreplace(free, free[0] + t)
    return max(free)


def cpu_floor(zips: Path) -> tuple[float, int]:
    """CPU seconds to inflate and MD5 every member of the kept archives; bytes read."""
    t0 = time.process_time()
    total = 0
    for path in sorted(zips.iterdir()):
        # Streamed, never read whole: a child forked after this process grew would report
        # this process's peak as its own (Linux carries the high-water mark across exec).
        total += path.stat().st_size
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                h = hashlib.md5(usedforsecurity=False)
                with zf.open(info) as member:  # zlib inflate + CRC, as the engine does
                    while chunk := member.read(1 << 20):
                        h.update(chunk)
    return time.process_time() - t0, total


@dataclass
class Row:
    client: str
    m: Measured
    downloaded: int
    right: str = ""
    walls: list[float] = field(default_factory=list)  # every run's, with --repeat


def median_row(rows: list[Row]) -> Row:
    """The run of median wall (the lower one of two), carrying every run's wall; a run
    that failed or left a series wrong instead, so that no median hides it."""
    bad = [r for r in rows if r.m.returncode != 0 or _wrong(r.right)]
    row = bad[0] if bad else sorted(rows, key=lambda r: r.m.wall)[(len(rows) - 1) // 2]
    row.walls = [r.m.wall for r in rows]
    return row


def _wrong(right: str) -> bool:
    """A "right" of "k/n" with k < n."""
    done, _, total = right.partition("/")
    return bool(total) and done != total


def sent(sim: SimProcess) -> int:
    return int(sim.counters()["counters"]["bytes_sent"])


def run_case(case: Case, work: Path, peers: Path | None, repeat: int = 1) -> list[dict[str, Any]]:
    faults: dict[str, Any] = {"latency": case.latency, "bandwidth": case.bandwidth}
    runs: dict[str, list[Row]] = {}  # per client, in the order they run
    floor: tuple[float, int] | None = None
    startup: dict[str, float] = {}
    with SimProcess(case.archive, faults, work / "sim") as sim:
        uids_path = work / "uids.json"
        uids_path.write_text(json.dumps(sorted(sim.sizes)))
        n, streams = len(sim.sizes), case.streams
        per_series = series_seconds(sim.sizes, case.latency, case.bandwidth)
        ideal = ideal_seconds(per_series, streams)
        rounds = rounds_floor(per_series, streams)

        def measure(name: str, argv: list[str], check: Any = None) -> None:
            before = sent(sim)
            m = run_measured(argv, cwd=REPO, log_dir=work, name=name.replace(" ", "_"))
            row = Row(name, m, sent(sim) - before)
            if m.returncode != 0:
                print(f"  {name} exited {m.returncode}: {m.stderr[-1500:]}", file=sys.stderr)
            if check is not None:
                row.right = check()
            runs.setdefault(name, []).append(row)

        # Info logs (a line per series placed) where they are few: the drain's window.
        level = "info" if n <= DRAIN_LOG_MAX_SERIES else "warning"
        bare = [PYTHON, str(BENCH / "bare_fetch.py"), "--url", sim.url]
        bare += ["--uids", str(uids_path), "--workers", str(streams)]
        # Every client once per round, in the same order; each round on fresh folders.
        for round_ in range(repeat):
            tag = f"-{round_}" if round_ else ""
            # nbia-sync
            root = work / f"mirror{tag}"
            cfg = write_config(
                work / f"nbia-sync{tag}.toml",
                root=root,
                url=sim.url,
                workers=streams,
                log_level=level,
            )
            cfg.write_text(cfg.read_text().replace('api = "v2"', 'api = "v4"'))
            measure(
                "nbia-sync",
                engine_argv(cfg, "sync"),
                lambda root=root: f"{check_engine_mirror(root, sim.truth, sim.layout)[0]}/{n}",
            )
            LEFTOVERS.append(root)
            if not round_:
                startup = measure_startup(case, cfg, work)

            # the bare client (kept archives give the CPU floor)
            keep = work / f"zips{tag}"
            measure("bare aiohttp", [*bare, "--keep", str(keep)])
            if floor is None:
                floor = cpu_floor(keep)
            LEFTOVERS.append(keep)
            # As issue 15 defines the bare client: fetch and discard, here on the event
            # loop nbia-sync runs on where uvloop is installed (the default). Its CPU is
            # what receiving the bytes alone costs.
            discard = [*bare, "--uvloop"]
            measure("bare aiohttp, uvloop, discard", discard)
            if not round_:
                # What a client process costs before its first request: that client with
                # no series (Python, asyncio, aiohttp, a session), medians as above.
                nothing = work / "no-uids.json"
                nothing.write_text("[]")
                discard[discard.index(str(uids_path))] = str(nothing)
                empty = [
                    run_measured(discard, cwd=REPO, log_dir=work, name="bare-startup")
                    for _ in range(STARTUP_RUNS)
                ]
                startup["bare"] = statistics.median(m.wall for m in empty)
                startup["bare_cpu"] = statistics.median(m.cpu for m in empty)

            if case.peers:
                out = work / f"baseline{tag}"
                measure(
                    "in-house baseline",
                    [
                        PYTHON,
                        str(BENCH / "baseline_tciautils.py"),
                        *("--url", sim.url, "--out", str(out), "--threads", str(streams)),
                    ],
                )
                LEFTOVERS.append(out)
            if case.peers and peers is not None:
                for peer, default in (("tcia-utils", 10), ("nbiatoolkit", 1)):
                    for workers in sorted({default, streams}):
                        out = work / f"{peer}-{workers}{tag}"
                        argv = [str(peers), str(BENCH / "peers.py"), peer, "--url", sim.url]
                        argv += ["--uids", str(uids_path), "--out", str(out)]
                        if workers != default:
                            argv += ["--workers", str(workers)]
                        label = f"{peer} x{workers}"
                        measure(label + (" (default)" if workers == default else ""), argv)
                        LEFTOVERS.append(out)
    rows = [median_row(rs) for rs in runs.values()]
    return report(case, rows, (ideal, rounds), n, floor, startup)


def measure_startup(case: Case, cfg: Path, work: Path) -> dict[str, float]:
    """`sync` and `status` on the complete mirror: alternating runs, medians (single
    ~0.5 s runs are at the mercy of whatever else the machine does)."""
    starts: dict[str, list[Measured]] = {"sync": [], "status": []}
    for _ in range(STARTUP_RUNS):
        for command, runs in starts.items():
            argv = engine_argv(cfg, command)
            runs.append(run_measured(argv, cwd=REPO, log_dir=work, name="startup"))
    wall = {c: statistics.median(m.wall for m in runs) for c, runs in starts.items()}
    idle_cpu = statistics.median(m.cpu for m in starts["sync"])
    print(
        f"  [{case.name}] start-up on the complete mirror, median of {STARTUP_RUNS}: "
        f"sync {wall['sync']:.2f} s ({idle_cpu:.2f} s CPU), status {wall['status']:.2f} s"
    )
    return {"sync": wall["sync"], "status": wall["status"], "sync_cpu": idle_cpu}


def report(
    case: Case,
    rows: list[Row],
    ideals: tuple[float, float],
    n: int,
    floor: tuple[float, int] | None,
    startup: dict[str, float],
) -> list[dict[str, Any]]:
    ideal, rounds = ideals
    print(f"\n== {case.name}: {case.what}; {n} series, {case.streams} streams", end="")
    print(f"; ideal {ideal:.2f} s" if ideal else "")
    print(
        f"{'client':<28}{'exit':>5}{'wall s':>8}{'ideal':>7}{'speed vs':>9}{'series/s':>9}"
        f"{'RSS MiB':>8}{'CPU s/GB':>9}{'right':>11}"
    )
    engine = rows[0]
    out = []
    for r in rows:
        gb = max(r.downloaded, 1) / 1e9
        rec = {
            "case": case.name,
            "client": r.client,
            "exit": r.m.returncode,
            "wall": round(r.m.wall, 2),
            "fraction_of_ideal": round(ideal / r.m.wall, 3) if ideal else None,
            "nbia_sync_speed_ratio": round(r.m.wall / engine.m.wall, 2),
            "series_per_s": round(n / r.m.wall, 1),
            "rss_mib": round(r.m.maxrss / 2**20, 1),
            "cpu_s_per_gb": round(r.m.cpu / gb, 1),
            "right": r.right,
        }
        if len(r.walls) > 1:
            rec["walls"] = [round(w, 2) for w in r.walls]
        out.append(rec)
        frac = f"{rec['fraction_of_ideal']:.2f}" if ideal else "-"
        print(
            f"{r.client:<28}{rec['exit']:>5}{rec['wall']:>8.2f}{frac:>7}"
            f"{rec['nbia_sync_speed_ratio']:>9.2f}{rec['series_per_s']:>9.1f}"
            f"{rec['rss_mib']:>8.1f}{rec['cpu_s_per_gb']:>9.1f}{r.right:>11}"
        )
    by = {r.client: r for r in rows}
    if len(engine.walls) > 1:
        print(f"  (each row: the run of median wall of {len(engine.walls)}; every run's wall:)")
        for r in rows:
            print(f"  {r.client:<28}" + " ".join(f"{w:6.2f}" for w in r.walls))
    lines = [f"peak RSS nbia-sync {engine.m.maxrss / 2**20:.0f} MiB (target <= 96)"]
    if ideal:
        lines.append(f"nbia-sync fraction of ideal {ideal / engine.m.wall:.2f}")
        drain = drain_window(engine.m.stderr)
        if drain:
            lines.append(
                f"nbia-sync's drain (first series started -> last placed, from its log) "
                f"{drain:.2f} s = {ideal / drain:.2f} of ideal; the other "
                f"{engine.m.wall - drain:.2f} s of its wall: start-up, discovery, exit"
            )
            out.append({"case": case.name, "client": "nbia-sync drain", "wall": round(drain, 2)})
            if rounds > ideal * 1.005:
                lines.append(
                    f"whole series per stream: at best {rounds:.2f} s of transfer "
                    f"({ideal / rounds:.2f} of ideal); nbia-sync's drain is "
                    f"{rounds / drain:.2f} of that"
                )
        # The best wall any client process can reach here: its start-up, then the rounds.
        best = rounds + startup["bare"]
        lines.append(
            f"floor for a client process: {startup['bare']:.2f} s to start (the bare client, "
            f"no series) + {rounds:.2f} s of rounds = {best:.2f} s = {ideal / best:.2f} of "
            f"ideal; nbia-sync's wall is {best / engine.m.wall:.2f} of that floor"
        )
    tu = by.get("tcia-utils x10 (default)")
    if tu is not None:
        line = f"nbia-sync speed / tcia-utils' {tu.m.wall / engine.m.wall:.2f}x (>= 1.5"
        if ideal:
            line += f": a wall of {tu.m.wall / 1.5:.2f} s, {ideal * 1.5 / tu.m.wall:.2f} of ideal"
        lines.append(line + ")")
    bare = by.get("bare aiohttp")
    if bare is not None:
        lines.append(f"nbia-sync rate / bare aiohttp's {bare.m.wall / engine.m.wall:.2f}")
    bare_uv = by.get("bare aiohttp, uvloop, discard")
    if bare_uv is not None:
        lines.append(
            f"nbia-sync rate / bare aiohttp's on uvloop, discarding "
            f"{bare_uv.m.wall / engine.m.wall:.2f} (one-file: >= 0.7)"
        )
    if floor is not None and floor[1]:
        floor_gb = floor[0] / (floor[1] / 1e9)
        engine_gb = engine.m.cpu / (max(engine.downloaded, 1) / 1e9)
        lines.append(
            f"CPU/GB nbia-sync {engine_gb:.1f} s, floor (MD5 + inflate) {floor_gb:.1f} s: "
            f"{engine_gb / floor_gb:.2f}x the floor (<= 1.5; nbia-sync's includes HTTP, "
            "discovery, catalog and start-up)"
        )
        # The same without the fixed cost of a process (the no-op sync's CPU).
        moving_gb = (engine.m.cpu - startup["sync_cpu"]) / (max(engine.downloaded, 1) / 1e9)
        lines.append(
            f"CPU/GB nbia-sync less its start-up CPU {moving_gb:.1f} s: "
            f"{moving_gb / floor_gb:.2f}x the floor"
        )
        if bare_uv is not None:
            # Receiving the bytes, which nbia-sync has to do as well and the floor leaves
            # out (so do writing the files and syncing them).
            gb = max(bare_uv.downloaded, 1) / 1e9
            recv_gb = (bare_uv.m.cpu - startup["bare_cpu"]) / gb
            lines.append(
                f"CPU/GB receiving alone (the discarding bare client less its start-up) "
                f"{recv_gb:.1f} s; with the floor {recv_gb + floor_gb:.1f} s: nbia-sync less "
                f"its start-up is {moving_gb / (recv_gb + floor_gb):.2f}x that"
            )
        out.append({"case": case.name, "client": "cpu-floor", "cpu_s_per_gb": round(floor_gb, 1)})
    lines.append(
        f"start-up on the complete mirror: sync {startup['sync']:.2f} s, "
        f"status {startup['status']:.2f} s (target: well under 0.5)"
    )
    out.append({"case": case.name, "client": "start-up", **startup})
    print("  " + "\n  ".join(lines))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="nbia-sync beside the real peers, one run")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--case", action="append", default=[])
    ap.add_argument("--no-peers", action="store_true", help="skip tcia-utils and nbiatoolkit")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run every client N times in turn, fresh folders each time; report medians",
    )
    args = ap.parse_args(argv)
    peers = None if args.no_peers else ensure_peers()
    # Bytecode, as an installed nbia-sync has (pip compiles it; the peers' venv has it
    # too): with PYTHONDONTWRITEBYTECODE set, a source tree would compile at every start.
    subprocess.run(
        [PYTHON, "-m", "compileall", "-q", str(REPO / "nbia_sync"), str(REPO / "migrations")],
        check=True,
    )
    load = os.getloadavg()
    print(f"load average before the run: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    base = args.workdir or Path(tempfile.mkdtemp(prefix="nbia-peers-"))
    print(machine_fingerprint(base))
    results: list[dict[str, Any]] = []
    for case in cases(args.quick):
        if args.case and case.name not in args.case:
            continue
        results.extend(run_case(case, base / case.name, peers, args.repeat))
    load = os.getloadavg()
    print(f"\nload average after the run: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    for leftover in LEFTOVERS:
        shutil.rmtree(leftover, ignore_errors=True)
    if args.workdir is None:
        shutil.rmtree(base, ignore_errors=True)
    return 0 if all(r.get("exit", 0) == 0 for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
