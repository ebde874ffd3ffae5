"""A faithful stand-in for tcia-utils 3.x downloads, used as the benchmark baseline.

What tcia-utils does (nbia.getSeries / nbia.downloadSeries), and so what this does:
- one guest token (password grant, user nbia_guest) for v1/v2; none for v4;
- the series list from getSeries per collection;
- a ThreadPoolExecutor of 10 threads, one series per task;
- each series fetched whole into memory (``response.content``), then
  ``zipfile.ZipFile(io.BytesIO(...)).extractall(<dir>/<SeriesUID>/)``;
- no MD5 check (md5hashes.csv is extracted like any file), no retries, no state:
  "already downloaded" means the folder exists; a failure is logged and skipped.

stdlib urllib instead of requests (not installed here); both read the body whole,
which is the behaviour being measured. Prints one JSON line with a summary.

    python bench/baseline_tciautils.py --url http://127.0.0.1:PORT/nbia-api/ --out DIR
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
import urllib.parse
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any

THREADS = 10  # tcia-utils' default for downloadSeries


def _get(url: str, headers: dict[str, str]) -> bytes:
    req = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(req, timeout=600) as resp:
        body: bytes = resp.read()
        return body


def guest_token(root: str) -> str:
    form = urllib.parse.urlencode(
        {"username": "nbia_guest", "password": "", "client_id": "NBIA", "grant_type": "password"}
    ).encode()
    req = urllib.request.Request(root + "oauth/token", data=form, method="POST")
    with urllib.request.urlopen(req, timeout=60) as resp:
        token: str = json.loads(resp.read())["access_token"]
        return token


def list_series(base: str, headers: dict[str, str], collections: list[str]) -> list[str]:
    if not collections:
        body = _get(base + "getCollectionValues", headers)
        collections = [c["Collection"] for c in json.loads(body or b"[]")]
    uids: list[str] = []
    for coll in collections:
        q = urllib.parse.urlencode({"Collection": coll})
        body = _get(f"{base}getSeries?{q}", headers)
        uids.extend(s["SeriesInstanceUID"] for s in json.loads(body or b"[]"))
    return uids


def download_one(base: str, headers: dict[str, str], uid: str, out: str) -> int:
    """Returns bytes downloaded; 0 when skipped; raises nothing (like tcia-utils)."""
    target = os.path.join(out, uid)
    if os.path.isdir(target):
        return 0
    try:
        q = urllib.parse.urlencode({"SeriesInstanceUID": uid})
        data = _get(f"{base}getImageWithMD5Hash?{q}", headers)
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            zf.extractall(path=target)
        return len(data)
    except Exception as exc:  # tcia-utils logs and moves on
        print(f"error {uid}: {exc!r}", file=sys.stderr)
        return -1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True, help="root ending in /nbia-api/")
    ap.add_argument("--api", default="v2", choices=["v1", "v2", "v4"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--collection", action="append", default=[])
    ap.add_argument("--threads", type=int, default=THREADS)
    args = ap.parse_args(argv)

    root = args.url if args.url.endswith("/") else args.url + "/"
    base = f"{root}services/{args.api}/"
    headers: dict[str, str] = {}
    if args.api != "v4":
        headers["Authorization"] = f"Bearer {guest_token(root)}"

    t0 = time.monotonic()
    uids = list_series(base, headers, args.collection)
    t_list = time.monotonic() - t0
    os.makedirs(args.out, exist_ok=True)
    with ThreadPoolExecutor(max_workers=args.threads) as pool:
        results = list(pool.map(lambda u: download_one(base, headers, u, args.out), uids))
    summary: dict[str, Any] = {
        "series": len(uids),
        "ok": sum(1 for r in results if r > 0),
        "skipped": sum(1 for r in results if r == 0),
        "failed": sum(1 for r in results if r < 0),
        "bytes": sum(r for r in results if r > 0),
        "list_seconds": round(t_list, 3),
        "seconds": round(time.monotonic() - t0, 3),
    }
    print(json.dumps(summary))
    return 0  # tcia-utils reports nothing to its caller either


if __name__ == "__main__":
    raise SystemExit(main())
