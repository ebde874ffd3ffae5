"""Catalog fixtures: a fresh catalog per test on SQLite and on PostgreSQL.

PostgreSQL tests get one throw-away database per session (created here, dropped at the
end) and are skipped, saying why, when nothing listens on 127.0.0.1:5432.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import pytest
import pytest_asyncio

from nbia_sync.api.models import SeriesInfo
from nbia_sync.catalog import Catalog
from nbia_sync.clock import SYSTEM_CLOCK, Clock
from nbia_sync.config import SourceSettings

PG_HOST, PG_PORT = "127.0.0.1", 5432
PG_ADMIN_DSN = f"postgresql://postgres@{PG_HOST}:{PG_PORT}/test"
_TABLES = "instances, series, studies, patients, collections, sources, locks, sync_runs, workers"


def pg_reachable() -> bool:
    try:
        with socket.create_connection((PG_HOST, PG_PORT), timeout=0.5):
            return True
    except OSError:
        return False


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@contextlib.contextmanager
def fresh_pg_database() -> Iterator[str]:
    """A new, empty PostgreSQL database for the block; its async URL."""
    if not pg_reachable():
        pytest.skip(f"PostgreSQL is not reachable at {PG_HOST}:{PG_PORT}")
    name = f"nbia_test_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    try:
        yield f"postgresql+asyncpg://postgres@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def pg_catalog_url() -> Iterator[str]:
    with fresh_pg_database() as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def catalog_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path}/state/catalog.sqlite"
    url: str = request.getfixturevalue("pg_catalog_url")
    return url


@pytest.fixture
def clock() -> Clock:
    """The catalog's clock: the system clock, unless a test module overrides this fixture
    (with a FakeClock, for leases and backoff that expire without waiting)."""
    return SYSTEM_CLOCK


@pytest_asyncio.fixture
async def catalog(catalog_url: str, clock: Clock) -> AsyncIterator[Catalog]:
    cat = await Catalog.open(catalog_url, clock=clock)
    if not cat.database.is_sqlite:
        # The PostgreSQL database is shared by the session: start each test empty.
        async with cat.database.engine.begin() as conn:
            await conn.exec_driver_sql(f"TRUNCATE {_TABLES} RESTART IDENTITY CASCADE")
    try:
        yield cat
    finally:
        await cat.close()


def make_source(name: str = "main", **kw: Any) -> SourceSettings:
    return SourceSettings(name=name, url="http://127.0.0.1:1/nbia-api/", **kw)


def make_series(
    uid: str,
    *,
    collection: str = "COLL",
    patient_id: str = "P1",
    study_uid: str = "1.2.3",
    image_count: int = 10,
    file_size: int = 1000,
    released: datetime | None = None,
    modality: str = "CT",
) -> SeriesInfo:
    return SeriesInfo(
        series_uid=uid,
        study_uid=study_uid,
        collection=collection,
        patient_id=patient_id,
        modality=modality,
        image_count=image_count,
        file_size=file_size,
        date_released=released or datetime(2024, 1, 1, tzinfo=UTC),
    )
