"""Merging what discovery found into the catalog.

A series is CHANGED when the archive reports a different DateReleased, ImageCount or
FileSize (an attribute the archive omitted is "unknown", never a change), or files it
under another collection, patient or study (the series UID stays, its mirror path does
not). Changed series
go back to the queue with a new generation; unchanged ones are not written at all.
Work is done in batches, comparing only each batch's UIDs, so the cost follows the size
of the increment, not of the catalog.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from datetime import UTC, date, datetime
from typing import Any, cast

from sqlalchemy import Table, bindparam, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from nbia_sync.api.models import PatientInfo, SeriesInfo, StudyInfo
from nbia_sync.catalog.db import Database
from nbia_sync.catalog.models import Collection, Patient, Series, SeriesState, Study
from nbia_sync.catalog.records import UpsertResult

SERIES = cast(Table, Series.__table__)
COLLECTIONS = cast(Table, Collection.__table__)
PATIENTS = cast(Table, Patient.__table__)
STUDIES = cast(Table, Study.__table__)
# Rows per transaction: small enough to keep the SQLite write lock briefly, large enough
# that a 1,000,000-series first listing is not a million commits.
BATCH = 500


def as_utc(value: datetime | None) -> datetime | None:
    """The archive's dates carry no zone; they are taken as UTC."""
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _json_default(value: object) -> str:
    if isinstance(value, datetime | date):
        return value.isoformat()
    return str(value)


def _remote_json(info: SeriesInfo) -> str:
    return json.dumps(dataclasses.asdict(info), default=_json_default, sort_keys=True)


def _metadata(info: SeriesInfo, now: datetime) -> dict[str, Any]:
    return {
        "study_uid": info.study_uid,
        "collection": info.collection,
        "patient_id": info.patient_id,
        "modality": info.modality,
        "body_part": info.body_part,
        "description": info.series_description,
        "image_count": info.image_count,
        "file_size": info.file_size,
        "date_released": as_utc(info.date_released),
        "remote_json": _remote_json(info),
        "updated_at": now,
    }


def is_changed(row: Any, info: SeriesInfo) -> bool:
    released = as_utc(info.date_released)
    return (
        # Moved: same SeriesInstanceUID, another place in the tree.
        (info.collection, info.patient_id, info.study_uid)
        != (row.collection, row.patient_id, row.study_uid)
        or (released is not None and released != row.date_released)
        or (info.image_count is not None and info.image_count != row.image_count)
        or (info.file_size is not None and info.file_size != row.file_size)
    )


def _chunks(items: Sequence[SeriesInfo], size: int) -> Iterable[Sequence[SeriesInfo]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def insert_for(conn: AsyncConnection, table: Table) -> Any:
    """INSERT with the dialect's ON CONFLICT support (same syntax on SQLite and PG)."""
    return (sqlite.insert if conn.dialect.name == "sqlite" else postgresql.insert)(table)


# Updates for changed series, run as executemany; b_* names avoid clashing with columns.
_META_COLUMNS = (
    "study_uid",
    "collection",
    "patient_id",
    "modality",
    "body_part",
    "description",
    "image_count",
    "file_size",
    "date_released",
    "remote_json",
    "updated_at",
)
_META_VALUES: dict[str, Any] = {c: bindparam(f"b_{c}") for c in _META_COLUMNS}
_REQUEUE = (
    update(SERIES)
    .where(SERIES.c.id == bindparam("b_id"))
    .values(
        state=SeriesState.WANTED,
        attempts=0,
        next_try_at=None,
        last_error=None,
        lease_owner=None,
        lease_expires_at=None,
        withdrawn_at=None,
        generation=SERIES.c.generation + 1,
        **_META_VALUES,
    )
)
# In flight: keep the lease (the worker's staging area stays its own) but bump the
# generation, so its placement is refused and the series is queued again then.
_BUMP_IN_FLIGHT = (
    update(SERIES)
    .where(SERIES.c.id == bindparam("b_id"))
    .values(attempts=0, generation=SERIES.c.generation + 1, **_META_VALUES)
)


async def upsert_series(db: Database, source_id: int, series: Sequence[SeriesInfo]) -> UpsertResult:
    # Last report of a UID wins; sorted so concurrent writers lock rows in one order.
    unique = sorted({s.series_uid: s for s in series}.values(), key=lambda s: s.series_uid)
    total = UpsertResult()
    for batch in _chunks(unique, BATCH):

        async def op(conn: AsyncConnection, b: Sequence[SeriesInfo] = batch) -> UpsertResult:
            return await _upsert_batch(conn, source_id, b, db.clock.now())

        total += await db.run_write(op)
    return total


async def _upsert_batch(
    conn: AsyncConnection, source_id: int, batch: Sequence[SeriesInfo], now: datetime
) -> UpsertResult:
    existing = {
        row.series_uid: row
        for row in await conn.execute(
            select(
                SERIES.c.id,
                SERIES.c.series_uid,
                SERIES.c.state,
                SERIES.c.date_released,
                SERIES.c.image_count,
                SERIES.c.file_size,
                SERIES.c.collection,
                SERIES.c.patient_id,
                SERIES.c.study_uid,
            ).where(
                SERIES.c.source_id == source_id,
                SERIES.c.series_uid.in_([s.series_uid for s in batch]),
            )
        )
    }
    new_rows: list[dict[str, Any]] = []
    requeue: list[dict[str, Any]] = []
    bump: list[dict[str, Any]] = []
    for info in batch:
        row = existing.get(info.series_uid)
        if row is None:
            new_rows.append(
                {
                    "source_id": source_id,
                    "series_uid": info.series_uid,
                    "state": SeriesState.WANTED,
                    "attempts": 0,
                    "generation": 1,
                    "downloads": 0,
                    "discovered_at": now,
                    **_metadata(info, now),
                }
            )
        elif is_changed(row, info) or row.state == SeriesState.WITHDRAWN:
            # A withdrawn series listed again is wanted again.
            params = {"b_id": row.id, **{f"b_{k}": v for k, v in _metadata(info, now).items()}}
            (bump if row.state == SeriesState.DOWNLOADING else requeue).append(params)
    if new_rows:
        # DO NOTHING: a second discoverer racing us (fleet without the discovery lock)
        # must not abort the batch; the row it wrote is as good as ours.
        insert_new = insert_for(conn, SERIES).on_conflict_do_nothing(
            index_elements=["source_id", "series_uid"]
        )
        await conn.execute(insert_new, new_rows)
    if requeue:
        await conn.execute(_REQUEUE, requeue)
    if bump:
        await conn.execute(_BUMP_IN_FLIGHT, bump)
    changed = len(requeue) + len(bump)
    unchanged = len(batch) - len(new_rows) - changed
    return UpsertResult(new=len(new_rows), changed=changed, unchanged=unchanged)


async def record_collections(db: Database, source_id: int, names: Iterable[str]) -> None:
    now = db.clock.now()
    rows = [{"source_id": source_id, "name": n, "discovered_at": now} for n in sorted(set(names))]
    await _insert_absent(db, COLLECTIONS, rows, ["source_id", "name"])


async def record_patients(db: Database, source_id: int, patients: Iterable[PatientInfo]) -> None:
    now = db.clock.now()
    keys = sorted({(p.collection, p.patient_id) for p in patients})
    rows = [
        {"source_id": source_id, "collection": c, "patient_id": p, "discovered_at": now}
        for c, p in keys
    ]
    await _insert_absent(db, PATIENTS, rows, ["source_id", "collection", "patient_id"])


async def record_studies(db: Database, source_id: int, studies: Iterable[StudyInfo]) -> None:
    now = db.clock.now()
    by_uid = {s.study_uid: s for s in studies}
    rows = [
        {
            "source_id": source_id,
            "collection": s.collection,
            "patient_id": s.patient_id,
            "study_uid": uid,
            "study_date": s.study_date.isoformat() if s.study_date else None,
            "description": s.study_description,
            "discovered_at": now,
        }
        for uid, s in sorted(by_uid.items())
    ]
    await _insert_absent(db, STUDIES, rows, ["source_id", "study_uid"])


async def _insert_absent(
    db: Database, table: Table, rows: list[dict[str, Any]], key: list[str]
) -> None:
    for start in range(0, len(rows), BATCH):
        chunk = rows[start : start + BATCH]

        async def op(conn: AsyncConnection, chunk: list[dict[str, Any]] = chunk) -> None:
            await conn.execute(
                insert_for(conn, table).on_conflict_do_nothing(index_elements=key), chunk
            )

        await db.run_write(op)
