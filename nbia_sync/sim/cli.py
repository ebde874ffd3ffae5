"""`nbia-sync simulate` / `python -m nbia_sync.sim`: serve a generated archive until a signal."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from typing import TYPE_CHECKING

# Light: `nbia-sync` builds its parser with add_arguments on every start. SimFaults (a
# fault flag left out keeps its default there), the archive generator and the server
# (pydicom, aiohttp.web) are imported when the simulator is asked for only.
if TYPE_CHECKING:
    from nbia_sync.sim.faults import SimFaults

# Fault knobs exposed as flags: (flag name, SimFaults field, type, help)
_FAULT_FLAGS: tuple[tuple[str, type, str], ...] = (
    ("error_5xx", float, "rate of 5xx answers with an HTML body (any endpoint)"),
    ("rate_429", float, "rate of 429 answers (any endpoint)"),
    ("retry_after", float, "seconds in the 429 Retry-After header"),
    ("reset", float, "rate of downloads whose connection is aborted half way"),
    ("truncate", float, "rate of downloads closed early without md5hashes.csv"),
    ("corrupt", float, "rate of downloads with one file's bytes altered"),
    ("stall", float, "rate of downloads that stop sending half way"),
    ("stall_seconds", float, "how long a stalled download hangs before it is reset"),
    ("hostile", float, "rate of downloads with an entry named ../../evil.dcm or /etc/..."),
    ("html_instead_of_zip", float, "rate of downloads answered 200 text/html"),
    ("bomb", float, "rate of downloads whose first file is a deflate bomb (claims 1 KB)"),
    ("bomb_bytes", int, "what the deflate bomb inflates to (default 1 GiB)"),
    ("md5_blank", float, "share of files whose md5hashes.csv value is blank"),
    ("latency", float, "seconds added to every response"),
    ("bandwidth", int, "bytes/s cap per download stream"),
    ("trickle", int, "every response body sent at this many bytes/s"),
    ("retry_after_header", str, "the 429 Retry-After header verbatim (e.g. inf, an HTTP date)"),
    ("echo_token_status", int, "answer every service request with this status, echoing the token"),
    ("gzip_bomb", int, "gzip query answers padded with this many bytes of whitespace"),
    ("token_ttl", float, "access token lifetime, seconds"),
    ("refresh_ttl", float, "refresh token lifetime, seconds"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The simulator's flags, for `nbia-sync simulate` and `python -m nbia_sync.sim`."""
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)"
    )
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the generated archive (UIDs, bytes)"
    )
    parser.add_argument(
        "--collections", default="SIM-CT,SIM-MR", help="comma-separated collection names"
    )
    parser.add_argument("--patients", type=int, default=2, help="per collection")
    parser.add_argument("--studies", type=int, default=1, help="per patient")
    parser.add_argument("--series", type=int, default=2, help="per study")
    parser.add_argument("--images", type=int, default=3, help="per series")
    parser.add_argument("--image-size", type=int, default=4096, help="bytes per image")
    parser.add_argument(
        "--compression", choices=("stored", "deflate"), default="stored", help="ZIP entry mode"
    )
    parser.add_argument(
        "--user",
        action="append",
        default=[],
        metavar="NAME:PASSWORD",
        help="an account allowed to log in (repeatable; default nbia_guest with no password)",
    )
    parser.add_argument(
        "--auth",
        choices=("keycloak", "spring"),
        default="keycloak",
        help="keycloak (default): the real server (a dead token on a v2 query answers "
        "200 empty, logout is POST, refresh client id 'nbia'); spring: older deployments "
        "(401 invalid_token, logout by GET)",
    )
    faults = parser.add_argument_group("faults")
    faults.add_argument("--fault-seed", type=int, default=0, help="seed of the random fault draws")
    for name, kind, text in _FAULT_FLAGS:
        faults.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, help=text)


def _faults(args: argparse.Namespace) -> SimFaults:
    from nbia_sync.sim.faults import SimFaults

    given = {n: v for n, _, _ in _FAULT_FLAGS if (v := getattr(args, n)) is not None}
    return SimFaults(seed=args.fault_seed, **given)


def _users(specs: list[str]) -> dict[str, str] | None:
    if not specs:
        return None
    return dict(spec.partition(":")[::2] for spec in specs)


async def serve(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM; prints the root URL on stdout. Returns an exit code."""
    from nbia_sync.sim.archive import SimArchive
    from nbia_sync.sim.server import SimServer

    archive = SimArchive.generate(
        seed=args.seed,
        collections=[c.strip() for c in args.collections.split(",") if c.strip()],
        patients=args.patients,
        studies=args.studies,
        series=args.series,
        images=args.images,
        image_size=args.image_size,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    server = SimServer(
        archive,
        _faults(args),
        host=args.host,
        port=args.port,
        users=_users(args.user),
        compression=args.compression,
        keycloak=args.auth == "keycloak",
    )
    async with server:
        print(server.url, flush=True)
        print(
            f"serving {len(archive.series)} series in {len(archive.collections)} collections",
            file=sys.stderr,
            flush=True,
        )
        await stop.wait()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nbia_sync.sim", description=__doc__)
    add_arguments(parser)
    # Standalone: logs to stderr so stdout carries only the URL for scripts to read.
    import structlog

    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    return asyncio.run(serve(parser.parse_args(argv)))
