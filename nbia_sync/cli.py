"""The `nbia-sync` command line: parse, load the config, run one command, map to an exit code.

Exit codes (scripts and containers rely on them):
  0    done: every wanted series is mirrored and verified (verify: no problem found)
  1    some series failed permanently or still wait for a retry (verify: problems listed)
  2    usage or configuration error, unreachable source or catalog, refused credentials
  70   unexpected internal error (a bug; run again with -v for the traceback)
  130  interrupted by SIGINT, 143 by SIGTERM (sync); placed work is kept and resumes
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import os
import re
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from nbia_sync import __version__
from nbia_sync.constants import DEFAULT_TCIA_URL as TCIA_URL
from nbia_sync.errors import CatalogError, NbiaSyncError, sole_error

# Nothing heavy at import time: `--help` and `--version` must stay fast (the settings,
# structlog, SQLAlchemy and aiohttp are imported by the commands that use them).
if TYPE_CHECKING:
    import anyio

    from nbia_sync.catalog.repository import Catalog
    from nbia_sync.config import EventLoopChoice, Settings, SourceSettings
    from nbia_sync.engine import PassReport

EXIT_OK, EXIT_FAILURES, EXIT_USAGE, EXIT_SOFTWARE = 0, 1, 2, 70
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)
DEFAULT_CONFIG = "nbia-sync.toml"
# After the first SIGINT/SIGTERM the pass gets this long to cancel its downloads and
# give its leases back before it is cancelled outright (Docker's stop timeout is 10 s).
STOP_GRACE = 8.0
GIL_SWITCH_INTERVAL = 0.001  # seconds; Python's default is 0.005 (see run())

Command = Callable[[argparse.Namespace], int]
Job = Callable[["anyio.Event"], Coroutine[Any, Any, int]]
QuickJob = Callable[[], Coroutine[Any, Any, int]]


# ---- argument parsing ----------------------------------------------------------------------


def _global_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    # Accepted before and after the command; after it, defaults must not override before.
    default: Any = None if top else argparse.SUPPRESS
    count_default: Any = 0 if top else argparse.SUPPRESS
    parser.add_argument(
        "-c",
        "--config",
        metavar="PATH",
        default=default,
        help=f"configuration file (default: $NBIA_SYNC_CONFIG, else ./{DEFAULT_CONFIG})",
    )
    parser.add_argument(
        "--log-format",
        choices=("auto", "json", "console"),
        default=default,
        help="log lines as JSON or readable text; auto: JSON unless stderr is a terminal "
        "(default: logging.format from the config)",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=count_default,
        help="more log output (repeatable); also prints tracebacks of unexpected errors",
    )
    parser.add_argument(
        "-q",
        "--quiet",
        action="count",
        default=count_default,
        help="less log output (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nbia-sync",
        description="Keep a local, verified mirror of The Cancer Imaging Archive (TCIA) in "
        "step with the archive through the NBIA REST API.",
        epilog="Exit codes: 0 ok; 1 some series failed (or verify found problems); 2 usage, "
        "configuration, unreachable source or catalog; 70 internal error; 130/143 "
        "interrupted by SIGINT/SIGTERM (placed work is kept and resumes next run).",
    )
    parser.add_argument("--version", action="version", version=f"nbia-sync {__version__}")
    _global_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, handler: Command, summary: str, details: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=summary, description=f"{summary}. {details}")
        _global_options(p, top=False)
        p.set_defaults(handler=handler)
        return p

    p = command(
        "sync",
        cmd_sync,
        "One pass: discover new and changed series, then download until the queue is empty",
        "Exit 0 when every wanted series is mirrored and verified, 1 when some failed "
        "permanently (see `status`, `retry-failed`), 2 when a source or the catalog cannot "
        "be used. Ctrl-C stops cleanly (exit 130); what was placed stays and the next run "
        "resumes.",
    )
    _pass_options(p)
    p = command(
        "fetch",
        cmd_fetch,
        "Download exactly the series of a manifest into DIR; no configuration needed",
        "MANIFEST is a TCIA portal manifest (.tcia), a file of series UIDs (one a line) or "
        "a .csv whose first column holds them. Defaults: TCIA's public v4 API, no login; a "
        "password, when --api v1/v2 needs one, comes from $NBIA_SYNC_PASSWORD only. With -c "
        "CONFIG (and --source NAME) a configured source is used. The catalog lives in "
        "DIR/.nbia-sync/; run it again to resume (or to find it done). Exit codes as sync's; "
        "1 also when the archive does not know some of the manifest's series.",
    )
    p.add_argument("manifest", metavar="MANIFEST", type=Path, help="the manifest or UID list")
    p.add_argument(
        "--dest",
        type=Path,
        metavar="DIR",
        help="where the series go (default: ./<manifest name without extension>)",
    )
    p.add_argument("--url", metavar="API_ROOT", help=f"the NBIA API root (default {TCIA_URL})")
    p.add_argument(
        "--api",
        choices=("v4", "v2", "v1"),
        help="API version (default v4, no login; v2 when --username is given)",
    )
    p.add_argument("--username", metavar="NAME", help="log in as NAME (v1/v2; default nbia_guest)")
    p.add_argument("--source", metavar="NAME", help="a source of the -c configuration file")
    command(
        "daemon",
        cmd_daemon,
        "Sync every schedule.poll_interval seconds until stopped",
        "Serves /healthz and /metrics (Prometheus) on daemon.listen_host:listen_port. "
        "SIGTERM or SIGINT stops it cleanly (downloads cancelled, leases released) with "
        "exit 0.",
    )
    p = command(
        "status",
        cmd_status,
        "Show series per state, the last run, recent failures and the fleet's processes",
        "Reads the catalog only; safe while other commands run.",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument(
        "--failures", type=int, default=20, metavar="N", help="recent failures to show (default 20)"
    )
    p = command(
        "verify",
        cmd_verify,
        "Re-hash every file in the mirror against the catalog",
        "Lists each problem as missing, differs, extra (not in the catalog) or error. "
        "Exit 0 when clean, 1 when any problem is found.",
    )
    p.add_argument(
        "--threads", type=int, default=2, metavar="N", help="files hashed at once (default 2)"
    )
    p.add_argument(
        "--repair",
        action="store_true",
        help="also queue every series with a missing or differing file again (the next "
        "sync re-downloads them); extra files are listed, never touched",
    )
    p = command(
        "add-manifest",
        cmd_add_manifest,
        "Add the series of a TCIA portal manifest (.tcia) to the catalog",
        "Each series is looked up at the archive (getSeries) and "
        "queued; the next `sync` downloads them. Exit 1 when the archive does not know some "
        "of them (each is listed).",
    )
    p.add_argument("manifest", metavar="FILE.tcia", type=Path, help="the manifest file")
    p.add_argument(
        "--source",
        metavar="NAME",
        help="the configured source to use (default: the only one, or the one "
        "whose url matches the manifest's downloadServerUrl)",
    )
    command(
        "retry-failed",
        cmd_retry_failed,
        "Put every failed series back in the queue",
        "Their attempt counters restart; run `sync` afterwards.",
    )
    p = command(
        "demo",
        cmd_demo,
        "Offline demo: start the built-in NBIA simulator and mirror it",
        "Needs no configuration and no network. The mirror and its catalog go to DIR; "
        "running it again shows that a finished mirror is left as it is.",
    )
    p.add_argument(
        "--dir",
        type=Path,
        default=Path("demo"),
        metavar="DIR",
        help="where the demo mirror goes (default ./demo)",
    )
    p = sub.add_parser(
        "simulate",
        help="Serve the built-in NBIA simulator (tests, benchmarks, demos)",
        description="Serve a generated archive over the NBIA REST API on loopback until "
        "SIGINT/SIGTERM; prints its root URL. Needs no configuration file.",
    )
    from nbia_sync.sim.cli import add_arguments as add_sim_arguments

    add_sim_arguments(p)
    p.set_defaults(handler=cmd_simulate)
    return parser


def _pass_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--full",
        action="store_true",
        help="list the archive in full now (not only what changed); finds withdrawn series",
    )
    p.add_argument(
        "--allow-mass-withdrawal",
        action="store_true",
        help="let a full listing withdraw more than mirror.max_withdrawn_share of a "
        "collection at once",
    )


# ---- shared plumbing ----------------------------------------------------------------------


def _fail(message: str, code: int = EXIT_USAGE) -> int:
    from nbia_sync.redaction import redact_text

    line = redact_text(" ".join(message.split()))  # always one line, never a live secret
    print(f"nbia-sync: error: {line}", file=sys.stderr, flush=True)
    return code


def config_path(args: argparse.Namespace, env: dict[str, str] | None = None) -> Path:
    environ = os.environ if env is None else env
    return Path(args.config or environ.get("NBIA_SYNC_CONFIG") or DEFAULT_CONFIG)


def _setup(args: argparse.Namespace) -> Settings:
    """Load the config (ConfigError on any problem) and configure logging from it + flags."""
    from nbia_sync.config import load_settings

    settings = load_settings(config_path(args))
    _configure_logging(args, settings.logging.level, settings.logging.format)
    return settings


def _prepare_tls(settings: Settings) -> None:
    """For a command that talks to the archive: the trust store loads in a thread while
    the command goes on importing (see tls)."""
    if any(source.verify_tls for source in settings.sources):
        from nbia_sync.tls import prepare

        prepare()


def _configure_logging(args: argparse.Namespace, level: str, fmt: str) -> None:
    from nbia_sync.log import configure_logging, level_from_flags

    configure_logging(level_from_flags(level, args.verbose, args.quiet), args.log_format or fmt)


def run_job(
    job: Job, *, grace: float = STOP_GRACE, loop: EventLoopChoice = "auto"
) -> tuple[int | None, int | None]:
    """Run `job(stop)` on a fresh event loop with SIGINT/SIGTERM wired to `stop`.

    Returns (the job's exit code or None if it had to be cancelled, the signal received).
    A second signal, or the grace period running out, cancels the job outright.
    """
    import anyio

    def start() -> tuple[Coroutine[Any, Any, int], Callable[[], None]]:
        stop = anyio.Event()
        return job(stop), stop.set

    return _run_signalled(start, grace, loop)


def run_quick_job(
    job: QuickJob, *, grace: float = STOP_GRACE, loop: EventLoopChoice = "auto"
) -> tuple[int | None, int | None]:
    """run_job for a job with no use for a stop event (status, verify, ...): the same
    signals, grace and result, but no anyio.Event, whose creation alone loads anyio's
    asyncio backend (~20 ms of start-up) that these commands never need otherwise."""
    return _run_signalled(lambda: (job(), lambda: None), grace, loop)


def event_loop_factory(choice: EventLoopChoice) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """What makes the command's event loop (transfer.event_loop): uvloop's for "auto"
    where it is installed, else None (asyncio's own). uvloop runs the same coroutines
    with fewer cycles per request and per thread hand-off (5,000 one-file series: CPU
    -7 %, wall -5 %)."""
    if choice == "auto":
        try:
            import uvloop
        except ImportError:  # not built for this platform: asyncio's loop
            return None
        return uvloop.new_event_loop
    return None


def _run_signalled(
    start: Callable[[], tuple[Coroutine[Any, Any, int], Callable[[], None]]],
    grace: float,
    loop_choice: EventLoopChoice,
) -> tuple[int | None, int | None]:
    """Run the coroutine start() makes, inside the loop, with SIGINT/SIGTERM wired: the
    first signal calls the stop function start() gave and cancels after `grace`."""
    import structlog

    from nbia_sync.memory import resume_gc

    log = structlog.get_logger(__name__)
    received: list[int] = []

    async def wrapper() -> int | None:
        resume_gc()  # the command is loaded: see cli.run
        loop = asyncio.get_running_loop()
        log.debug("event_loop", loop=type(loop).__module__.split(".")[0])
        coro, stop = start()
        task = asyncio.current_task()
        assert task is not None

        def on_signal(signum: int) -> None:
            if received:
                task.cancel()
                return
            received.append(signum)
            log.warning("stopping", signal=signal.Signals(signum).name)
            stop()
            loop.call_later(grace, task.cancel)

        # Only the main thread may own signals (tests call main() from a worker thread).
        wired = threading.current_thread() is threading.main_thread()
        for signum in (signal.SIGINT, signal.SIGTERM) if wired else ():
            loop.add_signal_handler(signum, on_signal, signum)
        try:
            return await coro
        except asyncio.CancelledError:
            return None
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM) if wired else ():
                loop.remove_signal_handler(signum)

    with asyncio.Runner(loop_factory=event_loop_factory(loop_choice)) as runner:
        code = runner.run(wrapper())
    return code, (received[0] if received else None)


async def _open_catalog(settings: Settings) -> Catalog:
    from nbia_sync.catalog.repository import Catalog

    return await Catalog.open(settings.catalog_url)


# ---- commands -------------------------------------------------------------------------------


def cmd_sync(args: argparse.Namespace) -> int:
    return _run_pass_command(_setup(args), args, "sync")


def _run_pass_command(
    settings: Settings,
    args: argparse.Namespace,
    command: str,
    after: Callable[[Catalog], Coroutine[Any, Any, int]] | None = None,
) -> int:
    """One pass (sync, fetch) with a progress display; the pass's exit code, or after()'s
    when the pass itself ended ok."""
    _prepare_tls(settings)
    # Imported after the config loaded: a config error must not depend on them.
    from nbia_sync.display import terminal_progress
    from nbia_sync.engine import run_pass
    from nbia_sync.outcome import Outcome
    from nbia_sync.status import human_bytes
    from nbia_sync.storage import check_writable

    check_writable(settings.mirror.root)

    async def job(stop: anyio.Event) -> int:
        catalog = await _open_catalog(settings)
        try:
            with terminal_progress() as progress:
                report = await run_pass(
                    settings,
                    catalog,
                    progress=progress,
                    stop=stop,
                    command=command,
                    full=getattr(args, "full", False),
                    allow_mass_withdrawal=getattr(args, "allow_mass_withdrawal", False),
                )
            if report.outcome is Outcome.ERROR:
                return _fail(report.error or "the pass could not run")
            print(
                f"{command} {report.outcome}: {report.done} series placed "
                f"({human_bytes(report.bytes)}), {report.failed} failed, "
                f"{report.remaining} waiting"
                + (f", {held} held as identity conflicts" if (held := _conflicts(report)) else "")
                + f"; run {report.run_id}",
                flush=True,
            )
            code = EXIT_OK if report.outcome is Outcome.OK else EXIT_FAILURES
            if after is not None and not stop.is_set():
                code = max(code, await after(catalog))
            return code
        finally:
            await catalog.close()

    code, signum = run_job(job, loop=settings.transfer.event_loop)
    if signum is not None:
        return 128 + signum
    return EXIT_FAILURES if code is None else code


def cmd_fetch(args: argparse.Namespace) -> int:
    from nbia_sync.discovery import read_series_list

    manifest = args.manifest.absolute()
    uids = read_series_list(manifest)  # a bad manifest: one error, before anything exists
    settings = _fetch_settings(
        args, manifest, (args.dest or default_fetch_dir(manifest)).absolute()
    )
    _configure_logging(args, settings.logging.level, settings.logging.format)
    source = settings.sources[0]

    async def after(catalog: Catalog) -> int:
        states = await catalog.sources.series_states(
            await catalog.sources.ensure_source(source), uids
        )
        unknown = [u for u in uids if u not in states]
        for uid in unknown:
            print(f"unknown: {uid}", flush=True)
        done = sum(1 for u in uids if states.get(u) == "done")
        print(
            f"fetch: {done} of {len(uids)} series of {args.manifest} in "
            f"{settings.mirror.root}"
            + (f", {len(unknown)} unknown to the archive" if unknown else ""),
            flush=True,
        )
        return EXIT_FAILURES if unknown else EXIT_OK

    return _run_pass_command(settings, args, "fetch", after)


def default_fetch_dir(manifest: Path) -> Path:
    """./<manifest name without its extension> (never the manifest itself)."""
    target = Path(manifest.stem)
    return target if target.absolute() != manifest else Path(manifest.name + "-series")


def _fetch_settings(args: argparse.Namespace, manifest: Path, dest: Path) -> Settings:
    """The settings of a fetch: one source limited to the manifest, the catalog in DIR."""
    from dataclasses import replace

    from nbia_sync.config import CatalogSettings, load_settings, settings_from_dict
    from nbia_sync.errors import ConfigError

    if args.config or args.source:
        if args.url or args.api or args.username:
            raise ConfigError("--url, --api and --username do not go with -c/--source")
        base = load_settings(config_path(args))
        source = replace(pick_source(base, args.source, None), manifests=[manifest])
        return replace(
            base,
            mirror=replace(base.mirror, root=dest),
            catalog=CatalogSettings(),
            sources=[source],
        )
    url = args.url or TCIA_URL
    src: dict[str, Any] = {
        "name": source_name_for(url),
        "url": url,
        # A user name means a login, which v4 does not do: v2 then, unless told.
        "api": args.api or ("v2" if args.username else "v4"),
        "manifests": [str(manifest)],
    }
    if args.username:
        src["username"] = args.username
    if os.environ.get("NBIA_SYNC_PASSWORD"):
        src["password"] = os.environ["NBIA_SYNC_PASSWORD"]
    # env={}: a fetch is self-contained (no catalog URL or source secrets from elsewhere).
    # Quiet by default: the progress line and the summary say what happens (-v for more).
    raw = {"mirror": {"root": str(dest)}, "logging": {"level": "warning"}, "sources": [src]}
    return settings_from_dict(raw, env={})


def source_name_for(url: str) -> str:
    """ "tcia" for TCIA's public API, else the URL's host (and port)."""
    if url.rstrip("/") == TCIA_URL.rstrip("/"):
        return "tcia"
    host = re.sub(r"^https?://", "", url).split("/", 1)[0]
    return re.sub(r"[^A-Za-z0-9_.-]", "_", host).lstrip("_.-") or "source"


def _conflicts(report: PassReport) -> int:
    from nbia_sync.catalog.models import SeriesState

    return report.state_counts.get(SeriesState.CONFLICT, (0, 0))[0]


def cmd_daemon(args: argparse.Namespace) -> int:
    settings = _setup(args)
    _prepare_tls(settings)
    # Imported after the config loaded: a config error must not depend on them.
    from nbia_sync.daemon import run_daemon
    from nbia_sync.storage import check_writable

    check_writable(settings.mirror.root)

    async def job(stop: anyio.Event) -> int:
        catalog = await _open_catalog(settings)
        try:
            return await run_daemon(settings, catalog, stop=stop)
        finally:
            await catalog.close()

    code, signum = run_job(job, loop=settings.transfer.event_loop)
    # A signal is how a daemon is meant to end: clean stop, exit 0.
    return EXIT_OK if signum is not None else (code if code is not None else EXIT_FAILURES)


def cmd_status(args: argparse.Namespace) -> int:
    settings = _setup(args)
    # Imported after the config loaded: a config error must not depend on them.
    from nbia_sync.status import collect_status, render_status, require_catalog

    require_catalog(settings)

    async def job() -> int:
        catalog = await _open_catalog(settings)
        try:
            status = await collect_status(settings, catalog, failures=args.failures)
        finally:
            await catalog.close()
        if args.json:
            json.dump(status, sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            render_status(status, sys.stdout)
        return EXIT_OK

    code, _ = run_quick_job(job, loop=settings.transfer.event_loop)
    return EXIT_FAILURES if code is None else code


def cmd_verify(args: argparse.Namespace) -> int:
    settings = _setup(args)
    # Imported after the config loaded: a config error must not depend on them.
    from nbia_sync.status import human_bytes
    from nbia_sync.verify import require_mirror_here, verify_mirror

    require_mirror_here(settings)

    async def job() -> int:
        catalog = await _open_catalog(settings)
        try:
            report = await verify_mirror(
                catalog,
                settings.mirror.root,
                threads=max(1, args.threads),
                on_problem=lambda p: print(p, flush=True),
            )
            if args.repair:
                damaged = report.damaged_series()
                queued = await catalog.queue.requeue_done(
                    damaged, "verify --repair: a file was missing or differed"
                )
                print(
                    f"repair: {queued} series queued again"
                    + ("; run `nbia-sync sync` to download them" if queued else ""),
                    flush=True,
                )
        finally:
            await catalog.close()
        print(
            f"verify: {report.matched} of {report.checked} files match "
            f"({human_bytes(report.bytes)}); {report.count('missing')} missing, "
            f"{report.count('differs')} differ, {report.count('extra')} extra, "
            f"{report.count('error')} errors",
            file=sys.stderr,
            flush=True,
        )
        if report.damaged_series() and not args.repair:
            print(
                "verify: to mend it, run `nbia-sync verify --repair`, then `nbia-sync sync`",
                file=sys.stderr,
                flush=True,
            )
        return EXIT_OK if report.ok else EXIT_FAILURES

    code, _ = run_quick_job(job, loop=settings.transfer.event_loop)
    return EXIT_FAILURES if code is None else code


def cmd_add_manifest(args: argparse.Namespace) -> int:
    settings = _setup(args)
    _prepare_tls(settings)
    from nbia_sync.api.client import NbiaClient
    from nbia_sync.api.manifest import parse_manifest
    from nbia_sync.discovery import add_manifest
    from nbia_sync.engine import describe_source_failure
    from nbia_sync.errors import ArchiveError, ConfigError

    try:
        text = args.manifest.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read manifest {args.manifest}: {exc.strerror}") from None
    manifest = parse_manifest(text, name=str(args.manifest))
    source = pick_source(settings, args.source, manifest.download_server_url)

    async def job() -> int:
        catalog = await _open_catalog(settings)
        try:
            source_id = await catalog.sources.ensure_source(source)
            try:
                async with NbiaClient(source, settings.transfer) as client:
                    report = await add_manifest(catalog, client, source_id, manifest.series_uids)
            except (ArchiveError, OSError, TimeoutError) as exc:
                return _fail(describe_source_failure(source, exc))
        finally:
            await catalog.close()
        print(
            f"add-manifest: {len(manifest.series_uids)} series in {args.manifest}: "
            f"{report.new} new, {report.changed} changed, {report.unchanged} already known, "
            f"{len(report.unknown)} unknown to the archive; run `nbia-sync sync`",
            flush=True,
        )
        for uid in report.unknown:
            print(f"unknown: {uid}", flush=True)
        # A manifest naming series the archive does not have is only partly satisfied.
        return EXIT_FAILURES if report.unknown else EXIT_OK

    code, _ = run_quick_job(job, loop=settings.transfer.event_loop)
    return EXIT_FAILURES if code is None else code


def pick_source(settings: Settings, name: str | None, manifest_url: str | None) -> SourceSettings:
    """--source NAME, else the source on the server the manifest names (by host name:
    the portal's downloadServerUrl is its download servlet, not an API root), else the
    only source when the manifest names no server or one we cannot tell apart."""
    from nbia_sync.api.manifest import is_tcia_server, server_of, sources_for_manifest
    from nbia_sync.errors import ConfigError

    if name:
        return settings.source(name)
    names = ", ".join(f"{s.name} ({server_of(s.url)})" for s in settings.sources)
    matches = sources_for_manifest(settings.sources, manifest_url) if manifest_url else []
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        several = ", ".join(s.name for s in matches)
        raise ConfigError(
            f"the manifest names {server_of(manifest_url or '')}, served by several "
            f"configured sources ({several}): choose one with --source"
        )
    # One source: use it (it may be a proxy or a test server), unless both are TCIA
    # servers and not the same one: an NLST manifest would be reported all "unknown".
    only = settings.sources[0] if len(settings.sources) == 1 else None
    if only and not (manifest_url and is_tcia_server(manifest_url) and is_tcia_server(only.url)):
        return only
    if manifest_url:
        raise ConfigError(
            f"the manifest names {server_of(manifest_url)} ({manifest_url}), which no "
            f"configured source serves ({names}): add a [[sources]] entry for it "
            "(see config.example.toml) or choose one with --source"
        )
    raise ConfigError(f"several sources are configured ({names}): choose one with --source")


def cmd_retry_failed(args: argparse.Namespace) -> int:
    settings = _setup(args)

    async def job() -> int:
        catalog = await _open_catalog(settings)
        try:
            count = await catalog.queue.retry_failed()
        finally:
            await catalog.close()
        print(f"retry-failed: {count} series queued again; run `nbia-sync sync`")
        return EXIT_OK

    code, _ = run_quick_job(job, loop=settings.transfer.event_loop)
    return EXIT_FAILURES if code is None else code


def cmd_simulate(args: argparse.Namespace) -> int:
    from nbia_sync.memory import resume_gc
    from nbia_sync.sim.cli import serve

    _configure_logging(args, "info", "auto")
    resume_gc()  # a server that runs for hours: see cli.run
    return asyncio.run(serve(args))


def cmd_demo(args: argparse.Namespace) -> int:
    from nbia_sync.demo import run_demo

    _configure_logging(args, "warning", "auto")
    code, signum = run_job(lambda stop: run_demo(args.dir, stop=stop, out=sys.stdout))
    if signum is not None:
        return 128 + signum
    return EXIT_FAILURES if code is None else code


# ---- entry point ----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors: argparse already printed
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    if getattr(args, "handler", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.handler(args))
    except (NbiaSyncError, CatalogError) as exc:
        # Config, catalog, credentials, unreachable source: one line, no traceback.
        return _fail(str(exc) or type(exc).__name__)
    except Exception as exc:
        cause = sole_error(exc)  # a task group's wrapper around one real error
        if isinstance(cause, NbiaSyncError):
            return _fail(str(cause) or type(cause).__name__)
        if isinstance(cause, OSError) and cause.errno in _NOT_WRITABLE:
            # The root turned read-only (or lost its permissions) under a running command.
            where = f" {cause.filename}" if cause.filename else ""
            return _fail(f"cannot write{where} ({cause.strerror}); check mirror.root")
        if args.verbose:
            traceback.print_exc()
        return _fail(
            f"unexpected {type(exc).__name__}: {exc} (run with -v for details)", EXIT_SOFTWARE
        )


def run() -> NoReturn:
    """The console entry point: main(), then leave without the interpreter's teardown.

    Freeing every module and object at exit takes ~0.1 s after a command that imported
    SQLAlchemy and aiohttp, and does nothing a finished command needs: main() has closed
    the catalog, its files and the event loop (and the thread pools with it) by then, so
    only the log handlers and stdio are left to flush, which happens here."""
    from nbia_sync.memory import limit_malloc_arenas, pause_gc

    limit_malloc_arenas()  # before any thread starts
    pause_gc()  # until the command's event loop starts (_run_signalled, cmd_simulate)
    # A worker thread done with a catalog transaction or a download hop waits up to the
    # switch interval for the GIL the event loop holds: 1 ms instead of 5 shortens every
    # group commit's hops (3,000 one-file series: wall -8 %; 0.5 ms was slower again).
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    code = main()
    logging = sys.modules.get("logging")
    if logging is not None:
        logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe (`| head`)
            stream.flush()
    os._exit(code)
