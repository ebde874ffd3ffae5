"""The catalog's tables. Changes here go with a migration in migrations/versions/.

Times are stored as timezone-aware UTC. Series state machine:

    wanted ──claim──► downloading ──place+commit──► done
       ▲                  │                            │ remote changed
       │            fail (retryable)                   ▼
       └──── pending ◄────┘ (next_try_at)            wanted
                          │ attempts exhausted / permanent
                          ▼
                        failed ──retry-failed──► wanted
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    DateTime,
    Dialect,
    Enum,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class SeriesState(enum.StrEnum):
    WANTED = "wanted"  # to fetch, ready now
    PENDING = "pending"  # to fetch, after next_try_at (backing off)
    DOWNLOADING = "downloading"  # claimed by lease_owner until lease_expires_at
    DONE = "done"  # placed in the mirror and verified
    FAILED = "failed"  # gave up: permanent error or attempts exhausted
    WITHDRAWN = "withdrawn"  # a full listing of its collection no longer returns it
    CONFLICT = "conflict"  # its UID is also listed under another path or source (see conflict)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every dialect.

    PostgreSQL stores timestamptz; SQLite has no zone, so values are stored as naive UTC
    (which also keeps its text comparisons in time order) and read back as aware UTC.
    Naive datetimes are refused: a silent local-time guess is how leases go wrong.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the catalog; use an aware UTC datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


UTC_DATETIME = UTCDateTime()


class Source(Base):
    __tablename__ = "sources"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    url: Mapped[str] = mapped_column(Text)
    api: Mapped[str] = mapped_column(String(8))
    # Newest DateReleased seen by a committed discovery; increments ask from here.
    watermark: Mapped[datetime | None] = mapped_column(UTC_DATETIME)
    last_full_listing_at: Mapped[datetime | None] = mapped_column(UTC_DATETIME)
    last_discovery_at: Mapped[datetime | None] = mapped_column(UTC_DATETIME)


class Collection(Base):
    __tablename__ = "collections"
    __table_args__ = (UniqueConstraint("source_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source_id: Mapped[int] = mapped_column(ForeignKey("sources.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    discovered_at: Mapped[datetime] = mapped_column(UTC_DATETIME)


class Patient(Base):
    __tablename__ = "patients"
    __table_args__ = (UniqueConstraint("source_id", "collection", "patient_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source_id: Mapped[int] = mapped_column(ForeignKey("sources.id", ondelete="CASCADE"))
    collection: Mapped[str] = mapped_column(String(200))
    patient_id: Mapped[str] = mapped_column(String(200))
    discovered_at: Mapped[datetime] = mapped_column(UTC_DATETIME)


class Study(Base):
    __tablename__ = "studies"
    __table_args__ = (UniqueConstraint("source_id", "study_uid"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source_id: Mapped[int] = mapped_column(ForeignKey("sources.id", ondelete="CASCADE"))
    collection: Mapped[str] = mapped_column(String(200))
    patient_id: Mapped[str] = mapped_column(String(200))
    study_uid: Mapped[str] = mapped_column(String(128))
    study_date: Mapped[str | None] = mapped_column(String(32))
    description: Mapped[str | None] = mapped_column(Text)
    discovered_at: Mapped[datetime] = mapped_column(UTC_DATETIME)


class Series(Base):
    __tablename__ = "series"
    __table_args__ = (
        UniqueConstraint("source_id", "series_uid"),
        # The claim query: ready work in order.
        Index("ix_series_state_next_try", "state", "next_try_at"),
        Index("ix_series_lease", "lease_owner"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source_id: Mapped[int] = mapped_column(ForeignKey("sources.id", ondelete="CASCADE"))
    series_uid: Mapped[str] = mapped_column(String(128))
    study_uid: Mapped[str] = mapped_column(String(128))
    collection: Mapped[str] = mapped_column(String(200))
    patient_id: Mapped[str] = mapped_column(String(200))
    modality: Mapped[str | None] = mapped_column(String(32))
    body_part: Mapped[str | None] = mapped_column(String(200))
    description: Mapped[str | None] = mapped_column(Text)
    # Remote metadata that decides whether a series changed.
    image_count: Mapped[int | None] = mapped_column(Integer)
    file_size: Mapped[int | None] = mapped_column(BigInteger)
    date_released: Mapped[datetime | None] = mapped_column(UTC_DATETIME)
    remote_json: Mapped[str | None] = mapped_column(Text)  # the archive's record, as JSON

    # Local state.
    state: Mapped[SeriesState] = mapped_column(
        Enum(
            SeriesState,
            name="series_state",
            native_enum=False,
            length=16,
            values_callable=lambda e: [m.value for m in e],
        ),
        default=SeriesState.WANTED,
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_try_at: Mapped[datetime | None] = mapped_column(UTC_DATETIME)
    last_error: Mapped[str | None] = mapped_column(Text)
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTC_DATETIME)
    # Bumped each time the remote series changes; a placement is for one generation.
    generation: Mapped[int] = mapped_column(Integer, default=1)
    downloads: Mapped[int] = mapped_column(Integer, default=0)  # completed downloads
    bytes: Mapped[int | None] = mapped_column(BigInteger)  # bytes placed in the mirror
    placed_path: Mapped[str | None] = mapped_column(Text)  # relative to the mirror root
    placed_at: Mapped[datetime | None] = mapped_column(UTC_DATETIME)
    withdrawn_at: Mapped[datetime | None] = mapped_column(UTC_DATETIME)
    conflict: Mapped[str | None] = mapped_column(Text)  # why it is held back (state conflict)
    # Files the archive published no MD5 for: accepted on the other checks, counted.
    unverified_files: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    discovered_at: Mapped[datetime] = mapped_column(UTC_DATETIME)
    updated_at: Mapped[datetime] = mapped_column(UTC_DATETIME)


class Instance(Base):
    __tablename__ = "instances"

    # No surrogate key: the archive holds hundreds of millions of instances, and rows are
    # replaced on every re-download, so a counter would only grow; (series, SOP) is the key.
    series_id: Mapped[int] = mapped_column(
        ForeignKey("series.id", ondelete="CASCADE"), primary_key=True
    )
    sop_uid: Mapped[str] = mapped_column(String(128), primary_key=True)
    md5: Mapped[str] = mapped_column(String(32))
    size: Mapped[int] = mapped_column(BigInteger)
    path: Mapped[str] = mapped_column(Text)  # relative to the mirror root


class SyncRun(Base):
    __tablename__ = "sync_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(String(64), unique=True)
    owner: Mapped[str] = mapped_column(String(200))
    command: Mapped[str] = mapped_column(String(32))
    started_at: Mapped[datetime] = mapped_column(UTC_DATETIME)
    finished_at: Mapped[datetime | None] = mapped_column(UTC_DATETIME)
    outcome: Mapped[str | None] = mapped_column(String(32))  # ok | failures | error | interrupted
    discovered: Mapped[int] = mapped_column(Integer, default=0)
    queued: Mapped[int] = mapped_column(Integer, default=0)
    done: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    skipped: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # bad records


class Worker(Base):
    """A live nbia-sync process: heartbeats here; stale rows are dead processes."""

    __tablename__ = "workers"

    owner: Mapped[str] = mapped_column(String(200), primary_key=True)  # host:pid:run
    host: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int] = mapped_column(Integer)
    run_id: Mapped[str] = mapped_column(String(64))
    started_at: Mapped[datetime] = mapped_column(UTC_DATETIME)
    heartbeat_at: Mapped[datetime] = mapped_column(UTC_DATETIME)
    # The OS's start time of the process (Linux: ticks since boot), to tell a reused PID.
    process_start: Mapped[int | None] = mapped_column(BigInteger)


class Lock(Base):
    """Named leases (e.g. 'discovery'): the SQLite stand-in for advisory locks."""

    __tablename__ = "locks"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(200))
    expires_at: Mapped[datetime] = mapped_column(UTC_DATETIME)
