"""The catalog's tables as SQLAlchemy Core `Table` objects, defined once, and the batch
size of the statements over them.

The models (models.py) declare the schema; every query is written in Core against these.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, TypeVar, cast

from sqlalchemy import Table

from nbia_sync.catalog.models import (
    Collection,
    Instance,
    Lock,
    Patient,
    Series,
    Source,
    Study,
    SyncRun,
    Worker,
)

SOURCES = cast(Table, Source.__table__)
COLLECTIONS = cast(Table, Collection.__table__)
PATIENTS = cast(Table, Patient.__table__)
STUDIES = cast(Table, Study.__table__)
SERIES = cast(Table, Series.__table__)
INSTANCES = cast(Table, Instance.__table__)
RUNS = cast(Table, SyncRun.__table__)
WORKERS = cast(Table, Worker.__table__)
LOCKS = cast(Table, Lock.__table__)

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
