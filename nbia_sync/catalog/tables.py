"""The catalog's tables as SQLAlchemy Core `Table` objects, defined once, and the batch
size of the statements over them.

The models (models.py) declare the schema; every query is written in Core against these.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar, cast

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
