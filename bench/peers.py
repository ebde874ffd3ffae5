"""Run a real peer client against the simulator (runs inside bench/.peers-venv).

    python bench/peers.py tcia-utils  --url SIM_URL --uids UIDS.json --out DIR [--workers N]
    python bench/peers.py nbiatoolkit --url SIM_URL --uids UIDS.json --out DIR [--workers N]

Each is pointed at the simulator the way a user points it at a mirror of the API: neither
has a base-URL setting, so the one function (tcia-utils: ``nbia.setApiUrl``) or attribute
(nbiatoolkit: ``NBIAClient.base_url`` and its OAuth2 client's ``base_url``) that holds
the public host is replaced. Everything else is the library's own download path with its
own defaults, except the worker count when ``--workers`` is given. Nothing here talks to
anything but the simulator (nbiatoolkit's logout, which has a hard-coded host, is never
called).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from types import SimpleNamespace


def tcia_utils(url: str, uids: list[str], out: Path, workers: int | None) -> int:
    from tcia_utils import nbia

    def set_api_url(endpoint: str, api_url: str = "nbia") -> str:
        version = "v1" if endpoint == "getContentsByName" else "v4"
        return f"{url}services/{version}/"

    nbia.setApiUrl = set_api_url
    kwargs = {} if workers is None else {"max_workers": workers}
    nbia.downloadSeries(uids, input_type="list", path=str(out), **kwargs)
    done = sum(1 for u in uids if (out / u).is_dir())
    print(json.dumps({"done": done}))
    return 0 if done == len(uids) else 1


def nbiatoolkit(url: str, uids: list[str], out: Path, workers: int | None) -> int:
    from nbiatoolkit import NBIAClient
    from nbiatoolkit.auth import OAuth2

    client = NBIAClient(log_level="WARNING")
    client._oauth2_client = OAuth2(base_url=url)  # its token endpoint: <url>oauth/token
    client.base_url = SimpleNamespace(value=f"{url}services/")  # an enum's .value in use
    kwargs = {} if workers is None else {"nParallel": workers}
    ok = client.downloadSeries(uids, downloadDir=str(out), **kwargs)
    print(json.dumps({"ok": bool(ok)}))
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("peer", choices=["tcia-utils", "nbiatoolkit"])
    ap.add_argument("--url", required=True)
    ap.add_argument("--uids", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--workers", type=int, default=None, help="default: the library's own")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    uids = json.loads(args.uids.read_text())
    run = tcia_utils if args.peer == "tcia-utils" else nbiatoolkit
    return run(args.url, uids, args.out, args.workers)


if __name__ == "__main__":
    raise SystemExit(main())
