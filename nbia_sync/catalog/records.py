"""Plain records the catalog hands out: no SQLAlchemy objects escape the catalog."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from nbia_sync.catalog.models import SeriesState


@dataclass(frozen=True, slots=True)
class DiscoveryStart:
    """What a discovery pass starts from: the source's row and its known collections."""

    watermark: datetime | None  # the newest release date a committed pass saw
    last_full_listing_at: datetime | None
    collections: list[str]  # sorted


@dataclass(frozen=True, slots=True)
class UpsertResult:
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    skipped: int = 0  # records that could not be stored (SeriesInfo.problem)
    conflicts: int = 0  # series held as identity conflicts (state conflict)

    def __add__(self, other: UpsertResult) -> UpsertResult:
        return UpsertResult(
            self.new + other.new,
            self.changed + other.changed,
            self.unchanged + other.unchanged,
            self.skipped + other.skipped,
            self.conflicts + other.conflicts,
        )


@dataclass(frozen=True, slots=True)
class Claim:
    """A series leased to one worker; `generation` pins the remote version it fetches."""

    series_id: int
    source_id: int
    source_name: str
    series_uid: str
    study_uid: str
    collection: str
    patient_id: str
    modality: str | None
    image_count: int | None
    file_size: int | None
    generation: int
    attempts: int
    placed_path: str | None


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    sop_uid: str
    md5: str
    size: int
    path: str  # relative to the mirror root


@dataclass(frozen=True, slots=True)
class FailureInfo:
    series_uid: str
    source_name: str
    collection: str
    state: SeriesState
    attempts: int
    last_error: str | None
    next_try_at: datetime | None


@dataclass(frozen=True, slots=True)
class RunInfo:
    run_id: str
    owner: str
    command: str
    started_at: datetime
    finished_at: datetime | None
    outcome: str | None
    discovered: int
    queued: int
    done: int
    failed: int
    bytes: int
    skipped: int = 0  # bad records skipped by discovery


@dataclass(frozen=True, slots=True)
class RunCounts:
    discovered: int = 0
    queued: int = 0
    done: int = 0
    failed: int = 0
    bytes: int = 0
    skipped: int = 0


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    owner: str
    host: str
    pid: int
    run_id: str
    started_at: datetime
    heartbeat_at: datetime
    heartbeat_age: float  # seconds since the last heartbeat
    in_flight: int  # series this worker holds a lease on

    def is_live(self, stale_after: float) -> bool:
        """Heartbeated within `stale_after` seconds (config.stale_after): past that the
        process is gone and its leases have run out."""
        return self.heartbeat_age < stale_after


@dataclass(frozen=True, slots=True)
class WithdrawnInfo:
    series_uid: str
    source_name: str
    collection: str
    withdrawn_at: datetime | None
    files_deleted: bool  # its files left the mirror (on_withdrawn = "delete")


@dataclass(frozen=True, slots=True)
class PlacedWithdrawn:
    series_id: int
    series_uid: str
    placed_path: str
