"""Helpers shared by the benchmarks: a simulator in its own process, measured subprocesses.

The simulator runs in a child process so its CPU is not charged to the client being
measured (on a 2-core machine they still compete for the cores: see README.md).

This file is also the simulator runner:
    python bench/_common.py serve SPEC.json
reads a spec {"archive": {...SimArchive.generate kwargs}, "faults": {...SimFaults kwargs},
"truth": "path.json"}, writes the archive's truth and layout there, prints {"url": ...}
on stdout, then answers each stdin line "counters" with one JSON line (the server's
counters and the runner's own CPU seconds); EOF stops it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
_MARK = "@@bench "  # prefix of control lines on the runner's stdout
PYTHON = sys.executable


# --------------------------------------------------------------------------- sim side


def _jsonable(obj: Any) -> Any:
    """Counters may be a dataclass, a dict, Counters or sets: make them JSON."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (int, float, str, bool)) or obj is None:
        return obj
    if hasattr(obj, "__dict__"):
        return {k: _jsonable(v) for k, v in vars(obj).items() if not k.startswith("_")}
    return repr(obj)


def archive_layout(archive: Any) -> dict[str, list[str]]:
    """{series_uid: [collection, patient_id, study_uid]} for the mirror paths."""
    return {uid: [s.collection, s.patient_id, s.study_uid] for uid, s in archive.series.items()}


def _write_truth(path: Path, archive: Any) -> None:
    # truth() computes every MD5 up front, so the server has them cached before timing.
    path.write_text(
        json.dumps(
            {
                "truth": archive.truth(),
                "layout": archive_layout(archive),
                "sizes": series_sizes(archive),
            }
        )
    )


async def _serve(spec: dict[str, Any]) -> None:
    import logging

    import structlog

    from nbia_sync.sim import SimArchive, SimFaults, SimServer

    # stdout is the control channel: the simulator's own log goes to stderr, warnings only.
    structlog.configure(
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
    )
    archive = SimArchive.generate(**spec["archive"])
    _write_truth(Path(spec["truth"]), archive)
    loop = asyncio.get_running_loop()
    async with SimServer(archive, SimFaults(**spec.get("faults", {}))) as server:
        print(_MARK + json.dumps({"url": server.url}), flush=True)
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                break
            if line.strip() == "counters":
                ru = resource.getrusage(resource.RUSAGE_SELF)
                print(
                    _MARK
                    + json.dumps(
                        {"counters": _jsonable(server.counters), "cpu": ru.ru_utime + ru.ru_stime}
                    ),
                    flush=True,
                )


def series_sizes(archive: Any) -> dict[str, int]:
    """Bytes of each series' files (the ZIP adds well under 1% for the cases here)."""
    return {uid: int(s.file_size) for uid, s in archive.series.items()}


class SimProcess:
    """The simulator in a child process; `with SimProcess(spec, workdir) as sim: sim.url`."""

    def __init__(self, archive: dict[str, Any], faults: dict[str, Any], workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self._spec_path = workdir / "sim-spec.json"
        self._truth_path = workdir / "sim-truth.json"
        self._spec_path.write_text(
            json.dumps({"archive": archive, "faults": faults, "truth": str(self._truth_path)})
        )
        self._log = open(workdir / "sim.log", "wb")  # noqa: SIM115 - closed in __exit__
        self.proc = subprocess.Popen(
            [PYTHON, str(Path(__file__).resolve()), "serve", str(self._spec_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            cwd=REPO,
            text=True,
            bufsize=1,
        )
        assert self.proc.stdout is not None
        first = self._reply()
        if first is None:
            self.close()
            raise RuntimeError(f"simulator failed to start, see {workdir / 'sim.log'}")
        self.url: str = first["url"]
        data = json.loads(self._truth_path.read_text())
        self.truth: dict[str, dict[str, str]] = data["truth"]
        self.layout: dict[str, list[str]] = data["layout"]
        self.sizes: dict[str, int] = data["sizes"]

    def counters(self) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("counters\n")
        self.proc.stdin.flush()
        reply = self._reply()
        if reply is None:
            raise RuntimeError("simulator exited")
        return reply

    def _reply(self) -> dict[str, Any] | None:
        """The next control line; anything else a library printed is skipped."""
        assert self.proc.stdout is not None
        while line := self.proc.stdout.readline():
            if line.startswith(_MARK):
                reply: dict[str, Any] = json.loads(line[len(_MARK) :])
                return reply
        return None

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def __enter__(self) -> SimProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- client side


@dataclasses.dataclass
class Measured:
    argv: list[str]
    returncode: int
    wall: float  # seconds
    cpu: float  # user + system seconds of the process
    maxrss: int  # bytes (ru_maxrss is KiB on Linux)
    io: dict[str, int]  # /proc/<pid>/io read just before reaping
    stdout: str
    stderr: str


def series_seconds(sizes: dict[str, int], latency: float, bandwidth: int | None) -> list[float]:
    """Each series' least time on one stream: the answer's wait, then its bytes at the cap
    (uncapped: the latency alone, a floor no client beats). Empty when nothing bounds it."""
    if bandwidth is None and not latency:
        return []
    return [latency + (size / bandwidth if bandwidth else 0.0) for size in sizes.values()]


def ideal_seconds(per_series: list[float], n: int) -> float:
    return max(sum(per_series) / n, max(per_series)) if per_series else 0.0


def run_measured(
    argv: list[str],
    *,
    cwd: Path,
    log_dir: Path,
    name: str,
    env: Mapping[str, str] | None = None,
    timeout: float = 3600.0,
) -> Measured:
    """Run a child, read /proc/<pid>/io after it exits but before reaping it (WNOWAIT),
    then reap it with wait4 for its own rusage (not the sum of every child so far)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    out_path, err_path = log_dir / f"{name}.out", log_dir / f"{name}.err"
    # The previous run's dirty pages are written back now, not during this one.
    os.sync()
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        t0 = time.monotonic()
        proc = subprocess.Popen(
            argv, cwd=cwd, stdout=out, stderr=err, env=dict(env) if env is not None else None
        )
        deadline = t0 + timeout
        while True:
            info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            if info is not None:
                break
            if time.monotonic() > deadline:
                proc.kill()
            time.sleep(0.01)
        wall = time.monotonic() - t0
        io: dict[str, int] = {}
        try:
            for line in Path(f"/proc/{proc.pid}/io").read_text().splitlines():
                key, _, value = line.partition(":")
                io[key.strip()] = int(value)
        except OSError:
            pass  # no /proc io accounting here: the caller falls back to counting
        _, status, ru = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return Measured(
        argv=list(argv),
        returncode=proc.returncode,
        wall=wall,
        cpu=ru.ru_utime + ru.ru_stime,
        maxrss=ru.ru_maxrss * 1024,
        io=io,
        stdout=out_path.read_text(errors="replace"),
        stderr=err_path.read_text(errors="replace"),
    )


def write_config(
    path: Path,
    *,
    root: Path,
    url: str,
    api: str = "v2",
    workers: int = 10,
    log_level: str = "warning",
    extra: str = "",
) -> Path:
    """The engine's TOML config (nbia_sync/config.py); transfer settings left at their
    defaults (max_attempts 6, retry_base_delay 0.2 s, ...) except the worker count."""
    path.write_text(f"""\
[mirror]
root = {json.dumps(str(root))}
min_free_bytes = 0

[transfer]
workers = {workers}

[logging]
level = {json.dumps(log_level)}
format = "json"

[[sources]]
name = "sim"
url = {json.dumps(url)}
api = {json.dumps(api)}
{extra}
""")
    return path


def engine_argv(config: Path, *args: str) -> list[str]:
    return [PYTHON, "-m", "nbia_sync", "-c", str(config), *args]


def machine_fingerprint(workdir: Path) -> str:
    """What the machine costs for the work nbia-sync does per series, measured now: the
    same code ran 2-3x slower on one 2-core machine than on another (bench/README.md,
    2026-12-03), so figures from two runs compare only with these beside them."""
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / ".fingerprint"
    shutil.rmtree(probe, ignore_errors=True)
    probe.mkdir()

    def per_call(fn: Callable[[int], object], n: int) -> float:
        start = time.perf_counter()
        for i in range(n):
            fn(i)
        return (time.perf_counter() - start) / n * 1e6

    loop = per_call(lambda _: sum(range(10_000)), 200)
    mkdir = per_call(lambda i: os.mkdir(probe / str(i)), 500)
    create = per_call(lambda i: (probe / str(i) / "f").write_bytes(b"x" * 2000), 500)
    rename = per_call(lambda i: os.rename(probe / str(i), probe / f"r{i}"), 500)
    from nbia_sync.storage import _sync_fs  # the engine's own group-commit sync

    syncfs = per_call(lambda _: _sync_fs(probe), 20)
    shutil.rmtree(probe, ignore_errors=True)
    imports = run_measured(
        [PYTHON, "-c", "import asyncio, aiohttp, sqlalchemy"],
        cwd=workdir,
        log_dir=workdir,
        name="fingerprint-imports",
    ).wall
    return (
        f"machine: sum(range(10000)) {loop:.0f} us; on the work directory mkdir {mkdir:.0f} "
        f"us, create + 2 KB write {create:.0f} us, rename {rename:.0f} us, syncfs "
        f"{syncfs / 1000:.2f} ms; python importing asyncio, aiohttp, sqlalchemy {imports:.2f} s"
    )


def md5_file(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def check_engine_mirror(
    root: Path, truth: Mapping[str, Mapping[str, str]], layout: Mapping[str, list[str]]
) -> tuple[int, int]:
    """(series exactly right, files outside the expected set) for the engine's layout."""
    expected: dict[Path, str] = {}
    for uid, files in truth.items():
        coll, patient, study = layout[uid]
        for sop, md5 in files.items():
            expected[root / coll / patient / study / uid / f"{sop}.dcm"] = md5
    found = {p for p in root.rglob("*") if p.is_file() and ".nbia-sync" not in p.parts}
    extra = len(found - set(expected))
    right = 0
    for uid, files in truth.items():
        coll, patient, study = layout[uid]
        d = root / coll / patient / study / uid
        if all(
            (d / f"{sop}.dcm").is_file() and md5_file(d / f"{sop}.dcm") == md5
            for sop, md5 in files.items()
        ):
            right += 1
    return right, extra


def check_baseline_dir(out: Path, truth: Mapping[str, Mapping[str, str]]) -> int:
    """Series whose extracted files carry exactly the truth's MD5s (names are counters)."""
    right = 0
    for uid, files in truth.items():
        d = out / uid
        if not d.is_dir():
            continue
        got = sorted(md5_file(p) for p in d.iterdir() if p.suffix == ".dcm")
        if got == sorted(files.values()):
            right += 1
    return right


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "serve":
        sys.path.insert(0, str(REPO))
        asyncio.run(_serve(json.loads(Path(sys.argv[2]).read_text())))
        return 0
    print("usage: python bench/_common.py serve SPEC.json", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
