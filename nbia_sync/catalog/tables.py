"""The catalog's tables as SQLAlchemy Core `Table` objects, defined once.

The models (models.py) declare the schema; every query is written in Core against these.
"""

from __future__ import annotations

from typing import cast

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
