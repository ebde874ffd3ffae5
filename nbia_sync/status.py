"""`nbia-sync status`: what the catalog says, as a JSON-ready dict and as text."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TextIO

from nbia_sync.catalog.models import SeriesState
from nbia_sync.catalog.records import FailureInfo
from nbia_sync.config import Settings, stale_after
from nbia_sync.errors import MirrorRootError

if TYPE_CHECKING:
    from nbia_sync.catalog.fleet import Fleet
    from nbia_sync.catalog.sources import Sources


class StatusSource(Protocol):
    @property
    def description(self) -> str: ...
    @property
    def fleet(self) -> Fleet: ...
    @property
    def sources(self) -> Sources: ...
    async def state_counts(self) -> dict[SeriesState, tuple[int, int]]: ...
    async def failures(self, limit: int = 50) -> list[FailureInfo]: ...
    async def unverified_files(self) -> tuple[int, int]: ...


def require_catalog(settings: Settings) -> None:
    """A SQLite catalog must exist already: opening it would create an empty one (and its
    directory), and report that empty mirror as fine. PostgreSQL: nothing to check here."""
    from sqlalchemy.engine import make_url  # here: the CLI imports this module at start

    url = make_url(settings.catalog_url)
    if url.get_backend_name() != "sqlite" or not url.database:
        return
    path = Path(url.database)
    if not path.is_file():
        raise MirrorRootError(
            f"no mirror at {settings.mirror.root} (no catalog {path}): "
            "check mirror.root and catalog.url, or run sync first"
        )


def _iso(value: datetime | None) -> str | None:
    # Whole seconds: microseconds say nothing to a reader and break `date -d` round trips.
    return value.replace(microsecond=0).isoformat() if value is not None else None


def when(iso: str | None, now: datetime | None = None) -> str:
    """'2026-12-01 20:33:19 UTC (3 min ago)' from an ISO time of the status document."""
    if iso is None:
        return "-"
    value = datetime.fromisoformat(iso).astimezone(UTC)
    age = ((now or datetime.now(UTC)) - value).total_seconds()
    return f"{value:%Y-%m-%d %H:%M:%S} UTC ({ago(age)})"


def ago(seconds: float) -> str:
    if seconds < 0:
        return "in the future"
    for limit, unit, size in ((120, "s", 1), (7200, "min", 60), (172800, "h", 3600)):
        if seconds < limit:
            return f"{seconds // size:.0f} {unit} ago"
    return f"{seconds // 86400:.0f} days ago"


async def collect_status(
    settings: Settings, catalog: StatusSource, *, failures: int
) -> dict[str, Any]:
    """The status as plain JSON types (the `status --json` document)."""
    counts = await catalog.state_counts()
    run = await catalog.fleet.last_run()
    unverified_series, unverified_files = await catalog.unverified_files()
    limit = stale_after(settings)
    return {
        "catalog": catalog.description,
        "mirror": str(settings.mirror.root),
        "series": {
            state.value: dict(zip(("count", "bytes"), counts.get(state, (0, 0)), strict=True))
            for state in SeriesState
        },
        # Files accepted without an MD5 (the archive's hash list had a blank for them).
        "unverified": {"series": unverified_series, "files": unverified_files},
        "last_run": None
        if run is None
        else {
            "run_id": run.run_id,
            "owner": run.owner,
            "command": run.command,
            "started_at": _iso(run.started_at),
            "finished_at": _iso(run.finished_at),
            "outcome": run.outcome,
            "discovered": run.discovered,
            "queued": run.queued,
            "done": run.done,
            "failed": run.failed,
            "bytes": run.bytes,
            "skipped": run.skipped,  # bad records left out by discovery
        },
        "failures": [
            {
                "series_uid": f.series_uid,
                "source": f.source_name,
                "collection": f.collection,
                "state": f.state.value,
                "attempts": f.attempts,
                "last_error": f.last_error,
                "next_try_at": _iso(f.next_try_at),
            }
            for f in await catalog.failures(limit=failures)
        ],
        "workers": [
            {
                "owner": w.owner,
                "host": w.host,
                "pid": w.pid,
                "run_id": w.run_id,
                "started_at": _iso(w.started_at),
                "heartbeat_at": _iso(w.heartbeat_at),
                "heartbeat_age": round(w.heartbeat_age, 1),
                "in_flight": w.in_flight,
                # Stale: no heartbeat for as long as a lease lasts: the process is gone.
                "alive": w.is_live(limit),
            }
            for w in await catalog.fleet.workers()
        ],
        "withdrawn": [
            {
                "series_uid": w.series_uid,
                "source": w.source_name,
                "collection": w.collection,
                "withdrawn_at": _iso(w.withdrawn_at),
                "files_deleted": w.files_deleted,
            }
            for w in await catalog.sources.withdrawn()
        ],
    }


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def render_status(status: dict[str, Any], out: TextIO) -> None:
    w = out.write
    w(f"catalog: {status['catalog']}\nmirror:  {status['mirror']}\n\n")
    w(f"{'state':<12}{'series':>10}{'bytes':>14}\n")
    for state, row in status["series"].items():
        w(f"{state:<12}{row['count']:>10}{human_bytes(row['bytes']):>14}\n")
    unverified = status.get("unverified") or {"files": 0}
    if unverified["files"]:
        w(
            f"\nunverified: {unverified['files']} files in {unverified['series']} series "
            "placed without an MD5 check (the archive listed no hash for them)\n"
        )
    run = status["last_run"]
    w("\nlast run: ")
    if run is None:
        w("none yet\n")
    else:
        w(
            f"{run['command']} {run['run_id']} started {when(run['started_at'])}, "
            f"{'finished ' + when(run['finished_at']) if run['finished_at'] else 'not finished'}, "
            f"outcome {run['outcome'] or 'running'}: {run['done']} placed, {run['failed']} failed, "
            f"{human_bytes(run['bytes'])}"
            + (f", {run['skipped']} bad records skipped" if run["skipped"] else "")
            + "\n"
        )
    if status["failures"]:
        w("\nrecent failures and conflicts (newest first):\n")
        for f in status["failures"]:
            w(
                f"  {f['state']:<8} {f['source']}/{f['collection']} {f['series_uid']} "
                f"(attempts {f['attempts']}): {f['last_error'] or '-'}\n"
            )
    withdrawn = status.get("withdrawn") or []
    if withdrawn:
        deleted = sum(1 for x in withdrawn if x["files_deleted"])
        w(
            f"\nwithdrawn by the archive: {len(withdrawn)} series "
            f"({len(withdrawn) - deleted} with files kept, {deleted} deleted; "
            "`status --json` lists them all)\n"
        )
        for x in withdrawn[:10]:
            w(f"  {x['source']}/{x['collection']} {x['series_uid']} {when(x['withdrawn_at'])}\n")
    w("\nprocesses:\n" if status["workers"] else "\nprocesses: none running\n")
    for wk in status["workers"]:
        state = "alive" if wk["alive"] else "STALE"
        w(
            f"  {wk['owner']}  {state}  heartbeat {wk['heartbeat_age']:.0f}s ago, "
            f"{wk['in_flight']} series in flight\n"
        )
