"""Database.transaction: write transactions whose steps are sync functions of a Connection
(a worker thread on a SQLite file's twin engine; run_sync elsewhere)."""

from __future__ import annotations

from pathlib import Path

import pytest
from catalog_fixtures import make_source
from sqlalchemy import func, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import OperationalError

from nbia_sync.catalog import Catalog
from nbia_sync.catalog.db import Database
from nbia_sync.catalog.tables import SOURCES
from nbia_sync.clock import FakeClock
from nbia_sync.errors import CatalogError

pytestmark = pytest.mark.asyncio


def rename_source(conn: Connection, old: str, new: str) -> int:
    return conn.execute(update(SOURCES).where(SOURCES.c.name == old).values(name=new)).rowcount


def source_names(conn: Connection) -> list[str]:
    return sorted(conn.execute(select(SOURCES.c.name)).scalars())


async def names(catalog: Catalog) -> list[str]:
    async with catalog.database.read() as conn:
        return sorted((await conn.execute(select(SOURCES.c.name))).scalars())


async def test_steps_share_one_transaction_and_commit_with_the_last(catalog: Catalog) -> None:
    await catalog.sources.ensure_source(make_source("a"))
    async with catalog.database.transaction() as txn:
        assert await txn.step(rename_source, "a", "b") == 1
        assert await txn.step(source_names) == ["b"]  # the step before is seen
        assert await txn.last(rename_source, "b", "c") == 1
    assert await names(catalog) == ["c"]


async def test_an_error_in_the_block_rolls_back_every_step(catalog: Catalog) -> None:
    await catalog.sources.ensure_source(make_source("a"))
    with pytest.raises(RuntimeError):
        async with catalog.database.transaction() as txn:
            await txn.step(rename_source, "a", "b")
            raise RuntimeError("the caller's renames failed")
    assert await names(catalog) == ["a"]


async def test_an_error_in_the_last_step_rolls_back_the_ones_before(catalog: Catalog) -> None:
    await catalog.sources.ensure_source(make_source("a"))

    def fail(conn: Connection) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        async with catalog.database.transaction() as txn:
            await txn.step(rename_source, "a", "b")
            await txn.last(fail)
    assert await names(catalog) == ["a"]
    # The connection went back clean: the next transaction works.
    assert await catalog.database.run_write_sync(rename_source, "a", "z") == 1
    assert await names(catalog) == ["z"]


async def test_a_sqlite_file_runs_the_steps_on_the_stdlib_twin(tmp_path: Path) -> None:
    db = await Database.connect(f"sqlite+aiosqlite:///{tmp_path / 'c.sqlite'}")
    try:
        assert db._twin is not None and db._twin.dialect.driver == "pysqlite"
    finally:
        await db.dispose()


async def test_an_in_memory_sqlite_runs_them_on_its_own_connection() -> None:
    # A second engine would open a second, empty, in-memory database.
    catalog = await Catalog.open("sqlite+aiosqlite:///:memory:")
    try:
        assert catalog.database._twin is None
        await catalog.sources.ensure_source(make_source("a"))
        assert await catalog.database.run_write_sync(rename_source, "a", "b") == 1
        async with catalog.database.read() as conn:
            assert (await conn.execute(select(func.count()).select_from(SOURCES))).scalar() == 1
    finally:
        await catalog.close()


async def test_run_write_sync_retries_a_locked_database_then_succeeds(tmp_path: Path) -> None:
    clock = FakeClock()
    db = await Database.connect(f"sqlite+aiosqlite:///{tmp_path / 'c.sqlite'}", clock)
    failures = [OperationalError("BEGIN IMMEDIATE", {}, Exception("database is locked"))]

    def op(conn: Connection) -> int:
        if failures:
            raise failures.pop()
        return 7

    try:
        assert await db.run_write_sync(op) == 7
        with pytest.raises(CatalogError, match="no such table"):
            await db.run_write_sync(lambda conn: conn.exec_driver_sql("SELECT * FROM nowhere"))
    finally:
        await db.dispose()
    assert len(clock.sleeps) == 1
