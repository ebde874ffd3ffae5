"""Why the engine hops to a thread per batch instead of using aiofiles (docs/architecture.md).

    pip install aiofiles && python bench/bench_file_io.py

64 MiB arrive as 16 KiB network chunks and are MD5-hashed and written to one file, then
fsynced, three ways:

  aiofiles/chunk   aiofiles, one awaited write (one thread hop) per network chunk
  thread/batch     the engine's way: chunks gathered to 1 MiB, hashed + written in one
                   anyio.to_thread hop per batch (the engine also inflates there)
  aiofiles/batch   aiofiles with the same 1 MiB batches; hashing stays on the event loop

Printed: MiB/s (best of 3), CPU seconds of the process per GiB (less sensitive to a busy
machine than wall time), thread hops, and the worst event-loop lag seen meanwhile (a 1 ms
ticker).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio

TOTAL, NET, BATCH = 64 << 20, 16 << 10, 1 << 20
DATA = os.urandom(NET)


async def aiofiles_per_chunk(path: Path) -> str:
    import aiofiles  # type: ignore[import-untyped]

    md5 = hashlib.md5()
    async with aiofiles.open(path, "wb") as f:
        for _ in range(TOTAL // NET):
            md5.update(DATA)
            await f.write(DATA)
        await f.flush()
        await anyio.to_thread.run_sync(os.fsync, f.fileno())
    return md5.hexdigest()


async def thread_per_batch(path: Path) -> str:
    md5 = hashlib.md5()
    with path.open("wb") as f:

        def feed(buf: bytes) -> None:
            md5.update(buf)
            f.write(buf)

        pending: list[bytes] = []
        for _ in range(TOTAL // NET):
            pending.append(DATA)
            if len(pending) * NET >= BATCH:
                await anyio.to_thread.run_sync(feed, b"".join(pending))
                pending = []

        def close() -> None:
            f.flush()
            os.fsync(f.fileno())

        await anyio.to_thread.run_sync(close)
    return md5.hexdigest()


async def aiofiles_per_batch(path: Path) -> str:
    import aiofiles

    md5 = hashlib.md5()
    async with aiofiles.open(path, "wb") as f:
        pending: list[bytes] = []
        for _ in range(TOTAL // NET):
            pending.append(DATA)
            if len(pending) * NET >= BATCH:
                buf = b"".join(pending)
                md5.update(buf)
                await f.write(buf)
                pending = []
        await f.flush()
        await anyio.to_thread.run_sync(os.fsync, f.fileno())
    return md5.hexdigest()


async def _worst_lag(stop: asyncio.Event) -> float:
    worst = 0.0
    while not stop.is_set():
        t = time.perf_counter()
        await asyncio.sleep(0.001)
        worst = max(worst, time.perf_counter() - t - 0.001)
    return worst


async def main() -> None:
    cases: list[tuple[str, Callable[[Path], Awaitable[str]]]] = [
        ("aiofiles/chunk", aiofiles_per_chunk),
        ("thread/batch", thread_per_batch),
        ("aiofiles/batch", aiofiles_per_batch),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "f"
        for name, fn in cases:
            best: tuple[float, float, float] | None = None
            for _ in range(3):
                stop = asyncio.Event()
                lag = asyncio.create_task(_worst_lag(stop))
                started, cpu = time.perf_counter(), time.process_time()
                await fn(path)
                elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
                stop.set()
                worst = await lag
                if best is None or elapsed < best[0]:
                    best = (elapsed, worst, cpu)
            assert best is not None
            rate, cpu_gib = TOTAL / best[0] / 2**20, best[2] * (1 << 30) / TOTAL
            hops = TOTAL // (NET if name == "aiofiles/chunk" else BATCH)
            print(
                f"{name:16s} {rate:6.0f} MiB/s  {cpu_gib:5.2f} CPU s/GiB  {hops:5d} hops"
                f"  worst loop lag {best[1] * 1e3:5.1f} ms"
            )


if __name__ == "__main__":
    asyncio.run(main())
