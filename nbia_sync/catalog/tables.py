"""The catalog's schema as SQLAlchemy Core `Table`s, which every query is written against,
and the batch size of the statements over them. Changes here go with a migration in
migrations/versions/ (tests/integration/test_migrations.py checks that they agree).

Core, not ORM declarative classes: nothing queries through the ORM, and importing
`sqlalchemy.orm` would cost every start-up ~80 ms.

Times are stored as timezone-aware UTC. The series states are `models.SeriesState`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Dialect,
    Enum,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
)

from nbia_sync.catalog.models import SeriesState


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

# No naming convention: constraint names are the database's own, as the migrations made them.
METADATA = MetaData()


def _source_id() -> Column[int]:
    return Column(
        "source_id", Integer, ForeignKey("sources.id", ondelete="CASCADE"), nullable=False
    )


SOURCES = Table(
    "sources",
    METADATA,
    Column("id", Integer, primary_key=True),
    Column("name", String(200), nullable=False, unique=True),
    Column("url", Text, nullable=False),
    Column("api", String(8), nullable=False),
    # Newest DateReleased seen by a committed discovery; increments ask from here.
    Column("watermark", UTC_DATETIME),
    Column("last_full_listing_at", UTC_DATETIME),
    Column("last_discovery_at", UTC_DATETIME),
)

COLLECTIONS = Table(
    "collections",
    METADATA,
    Column("id", Integer, primary_key=True),
    _source_id(),
    Column("name", String(200), nullable=False),
    Column("discovered_at", UTC_DATETIME, nullable=False),
    UniqueConstraint("source_id", "name"),
)

PATIENTS = Table(
    "patients",
    METADATA,
    Column("id", Integer, primary_key=True),
    _source_id(),
    Column("collection", String(200), nullable=False),
    Column("patient_id", String(200), nullable=False),
    Column("discovered_at", UTC_DATETIME, nullable=False),
    UniqueConstraint("source_id", "collection", "patient_id"),
)

STUDIES = Table(
    "studies",
    METADATA,
    Column("id", Integer, primary_key=True),
    _source_id(),
    Column("collection", String(200), nullable=False),
    Column("patient_id", String(200), nullable=False),
    Column("study_uid", String(128), nullable=False),
    Column("study_date", String(32)),
    Column("description", Text),
    Column("discovered_at", UTC_DATETIME, nullable=False),
    UniqueConstraint("source_id", "study_uid"),
)

SERIES = Table(
    "series",
    METADATA,
    Column("id", Integer, primary_key=True),
    _source_id(),
    Column("series_uid", String(128), nullable=False),
    Column("study_uid", String(128), nullable=False),
    Column("collection", String(200), nullable=False),
    Column("patient_id", String(200), nullable=False),
    Column("modality", String(32)),
    Column("body_part", String(200)),
    Column("description", Text),
    # Remote metadata that decides whether a series changed.
    Column("image_count", Integer),
    Column("file_size", BigInteger),
    Column("date_released", UTC_DATETIME),
    Column("remote_json", Text),  # the archive's record, as JSON
    # Local state.
    Column(
        "state",
        Enum(
            SeriesState,
            name="series_state",
            native_enum=False,
            length=16,
            values_callable=lambda e: [m.value for m in e],
        ),
        nullable=False,
        default=SeriesState.WANTED,
    ),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_try_at", UTC_DATETIME),
    Column("last_error", Text),
    Column("lease_owner", String(200)),
    Column("lease_expires_at", UTC_DATETIME),
    # Bumped each time the remote series changes; a placement is for one generation.
    Column("generation", Integer, nullable=False, default=1),
    Column("downloads", Integer, nullable=False, default=0),  # completed downloads
    Column("bytes", BigInteger),  # bytes placed in the mirror
    Column("placed_path", Text),  # relative to the mirror root
    Column("placed_at", UTC_DATETIME),
    Column("withdrawn_at", UTC_DATETIME),
    Column("conflict", Text),  # why it is held back (state conflict)
    # Files the archive published no MD5 for: accepted on the other checks, counted.
    Column("unverified_files", Integer, nullable=False, default=0, server_default="0"),
    Column("discovered_at", UTC_DATETIME, nullable=False),
    Column("updated_at", UTC_DATETIME, nullable=False),
    UniqueConstraint("source_id", "series_uid"),
    # The claim query: ready work in order.
    Index("ix_series_state_next_try", "state", "next_try_at"),
    Index("ix_series_lease", "lease_owner"),
)

INSTANCES = Table(
    "instances",
    METADATA,
    # No surrogate key: the archive holds hundreds of millions of instances, and rows are
    # replaced on every re-download, so a counter would only grow; (series, SOP) is the key.
    Column("series_id", Integer, ForeignKey("series.id", ondelete="CASCADE"), primary_key=True),
    Column("sop_uid", String(128), primary_key=True),
    Column("md5", String(32), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("path", Text, nullable=False),  # relative to the mirror root
)

RUNS = Table(
    "sync_runs",
    METADATA,
    Column("id", Integer, primary_key=True),
    Column("run_id", String(64), nullable=False, unique=True),
    Column("owner", String(200), nullable=False),
    Column("command", String(32), nullable=False),
    Column("started_at", UTC_DATETIME, nullable=False),
    Column("finished_at", UTC_DATETIME),
    Column("outcome", String(32)),  # ok | failures | error | interrupted
    Column("discovered", Integer, nullable=False, default=0),
    Column("queued", Integer, nullable=False, default=0),
    Column("done", Integer, nullable=False, default=0),
    Column("failed", Integer, nullable=False, default=0),
    Column("bytes", BigInteger, nullable=False, default=0),
    Column("skipped", Integer, nullable=False, default=0, server_default="0"),  # bad records
)

# A live nbia-sync process: heartbeats here; stale rows are dead processes.
WORKERS = Table(
    "workers",
    METADATA,
    Column("owner", String(200), primary_key=True),  # host:pid:run
    Column("host", String(200), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("run_id", String(64), nullable=False),
    Column("started_at", UTC_DATETIME, nullable=False),
    Column("heartbeat_at", UTC_DATETIME, nullable=False),
    # The OS's start time of the process (Linux: ticks since boot), to tell a reused PID.
    Column("process_start", BigInteger),
)

# Named leases (e.g. 'discovery'): the SQLite stand-in for advisory locks.
LOCKS = Table(
    "locks",
    METADATA,
    Column("name", String(64), primary_key=True),
    Column("owner", String(200), nullable=False),
    Column("expires_at", UTC_DATETIME, nullable=False),
)

# Rows or UIDs per statement: far below every dialect's bound-parameter limit and short
# enough to hold the SQLite write lock briefly, large enough that a 1,000,000-series
# first listing is not a million commits.
BATCH = 500

T = TypeVar("T")


def batches(items: Sequence[T], size: int = BATCH) -> Iterator[list[T]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def insert_for(dialect: str, table: Table) -> Any:
    """INSERT with the dialect's ON CONFLICT support (the same syntax on SQLite and
    PostgreSQL). The dialect module is imported here, when first used, so a SQLite
    catalog never loads the PostgreSQL dialect (~25 ms of every start)."""
    if dialect == "sqlite":
        from sqlalchemy.dialects import sqlite

        return sqlite.insert(table)
    from sqlalchemy.dialects import postgresql

    return postgresql.insert(table)
