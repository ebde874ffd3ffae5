"""The bare client: aiohttp fetching every series' archive and discarding it.

    python bench/bare_fetch.py --url SIM_URL --uids UIDS.json --workers N [--keep DIR] [--uvloop]

No parsing, no hashing, no disk (unless ``--keep``: then each archive is written to
DIR/<uid>.zip for the CPU-floor measurement). What the transport alone costs: the
one-file-series target is a fraction of this client's rate. ``--uvloop``: on uvloop's
event loop, as nbia-sync runs where uvloop is installed (transfer.event_loop = "auto").
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import aiohttp


async def run(url: str, uids: list[str], workers: int, keep: Path | None) -> int:
    queue: asyncio.Queue[str] = asyncio.Queue()
    for uid in uids:
        queue.put_nowait(uid)
    got = 0
    connector = aiohttp.TCPConnector(limit=workers)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:

        async def worker() -> None:
            nonlocal got
            while not queue.empty():
                uid = queue.get_nowait()
                params = {"SeriesInstanceUID": uid}
                async with session.get(f"{url}services/v4/getImage", params=params) as resp:
                    resp.raise_for_status()
                    parts = []
                    async for chunk in resp.content.iter_chunked(1 << 16):
                        if keep is not None:
                            parts.append(chunk)
                if keep is not None:
                    (keep / f"{uid}.zip").write_bytes(b"".join(parts))
                got += 1

        await asyncio.gather(*(worker() for _ in range(workers)))
    print(json.dumps({"done": got}))
    return 0 if got == len(uids) else 1


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--uids", type=Path, required=True)
    ap.add_argument("--workers", type=int, default=10)
    ap.add_argument("--keep", type=Path, default=None)
    ap.add_argument("--uvloop", action="store_true")
    args = ap.parse_args()
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
    uids = json.loads(args.uids.read_text())
    if args.uvloop:
        import uvloop

        return uvloop.run(run(args.url, uids, args.workers, args.keep))
    return asyncio.run(run(args.url, uids, args.workers, args.keep))


if __name__ == "__main__":
    raise SystemExit(main())
