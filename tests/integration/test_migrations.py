"""The alembic history: applies from empty on both dialects and matches the schema in
nbia_sync/catalog/tables.py, which a new catalog is created from without alembic."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from catalog_fixtures import fresh_pg_database
from sqlalchemy import inspect
from sqlalchemy.engine import Connection

from nbia_sync.catalog import Catalog, migrate
from nbia_sync.catalog.db import Database
from nbia_sync.catalog.migrate import HEAD_REVISION, current_revisions, head_revision
from nbia_sync.catalog.tables import METADATA
from nbia_sync.errors import CatalogError

pytestmark = pytest.mark.asyncio


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path}/deep/dir/catalog.sqlite"
    else:
        with fresh_pg_database() as url:
            yield url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def two_empty_urls(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    if request.param == "sqlite":
        yield (
            f"sqlite+aiosqlite:///{tmp_path}/a.sqlite",
            f"sqlite+aiosqlite:///{tmp_path}/b.sqlite",
        )
    else:
        with fresh_pg_database() as first, fresh_pg_database() as second:
            yield first, second


async def _migrate_with_alembic(url: str) -> None:
    """The whole alembic history applied to an empty database (what an old catalog
    went through), bypassing the create-from-scratch path."""
    db = await Database.connect(url)
    try:
        async with db.write() as conn:
            await conn.run_sync(migrate._upgrade_sync)
    finally:
        await db.dispose()


def _schema(conn: Connection) -> dict[str, Any]:
    """Everything reflection sees of each table, order-insensitive where the database's
    is (SQLite's batch migrations rebuild a table with its columns in another order)."""
    insp = inspect(conn)
    schema: dict[str, Any] = {}
    for table in insp.get_table_names():
        columns = insp.get_columns(table)
        schema[table] = {
            "columns": sorted(
                (c["name"], str(c["type"]), c["nullable"], str(c.get("default"))) for c in columns
            ),
            "pk": insp.get_pk_constraint(table),
            "indexes": sorted(
                (i["name"], tuple(i["column_names"]), bool(i["unique"]))
                for i in insp.get_indexes(table)
            ),
            "unique": sorted(
                (u["name"], tuple(u["column_names"])) for u in insp.get_unique_constraints(table)
            ),
            "foreign_keys": sorted(
                (f["name"], tuple(f["constrained_columns"]), f["referred_table"])
                for f in insp.get_foreign_keys(table)
            ),
            "checks": sorted((c["name"], c["sqltext"]) for c in insp.get_check_constraints(table)),
        }
    return schema


async def _reflect(url: str) -> dict[str, Any]:
    db = await Database.connect(url)
    try:
        async with db.read() as conn:
            return await conn.run_sync(_schema)
    finally:
        await db.dispose()


def _diff(conn: Connection) -> list[Any]:
    # Types and server defaults too: a migration that forgets either must fail here.
    opts = {"compare_type": True, "compare_server_default": True}
    context = MigrationContext.configure(conn, opts=opts)
    return list(compare_metadata(context, METADATA))


async def _assert_at_head_with_the_schema(url: str) -> None:
    catalog = await Catalog.open(url)
    try:
        async with catalog.database.engine.connect() as conn:
            assert await conn.run_sync(_diff) == []
            assert await conn.run_sync(current_revisions) == (head_revision(),)
    finally:
        await catalog.close()


async def test_alembic_history_from_empty_matches_the_schema(empty_url: str) -> None:
    await _migrate_with_alembic(empty_url)
    await _assert_at_head_with_the_schema(empty_url)


async def test_new_catalog_is_created_at_head(empty_url: str) -> None:
    await _assert_at_head_with_the_schema(empty_url)


async def test_new_catalog_has_the_schema_the_migrations_build(
    two_empty_urls: tuple[str, str],
) -> None:
    created, migrated = two_empty_urls
    await (await Catalog.open(created)).close()
    await _migrate_with_alembic(migrated)
    assert await _reflect(created) == await _reflect(migrated)


async def test_new_catalog_beside_other_tables_is_created(empty_url: str) -> None:
    # A PostgreSQL database shared with another application already has tables.
    db = await Database.connect(empty_url)
    async with db.write() as conn:
        await conn.exec_driver_sql("CREATE TABLE someone_elses (id INTEGER PRIMARY KEY)")
    await db.dispose()
    catalog = await Catalog.open(empty_url)
    try:
        async with catalog.database.engine.connect() as conn:
            assert await conn.run_sync(current_revisions) == (head_revision(),)
            assert "someone_elses" in await conn.run_sync(lambda c: inspect(c).get_table_names())
    finally:
        await catalog.close()


async def test_new_catalog_does_not_import_alembic(tmp_path: Path) -> None:
    code = (
        "import asyncio, sys\n"
        "from nbia_sync.catalog import Catalog\n"
        "async def main():\n"
        f"    await (await Catalog.open('sqlite+aiosqlite:///{tmp_path}/c.sqlite')).close()\n"
        "asyncio.run(main())\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'alembic'], 'alembic imported'\n"
    )
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code)
    assert await asyncio.wait_for(proc.wait(), 60) == 0


async def test_reopen_at_head_is_a_no_op(empty_url: str) -> None:
    for _ in range(2):
        catalog = await Catalog.open(empty_url)
        await catalog.close()
    catalog = await Catalog.open(empty_url)
    try:
        async with catalog.database.engine.connect() as conn:
            assert await conn.run_sync(current_revisions) == (head_revision(),)
    finally:
        await catalog.close()


async def test_head_revision_constant_is_alembics_head() -> None:
    # The fast open path trusts HEAD_REVISION: a new migration must update it.
    assert head_revision() == HEAD_REVISION


async def test_reopen_at_head_does_not_run_alembic(
    empty_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await (await Catalog.open(empty_url)).close()

    def no_alembic(_connection: Connection) -> None:
        raise AssertionError("alembic ran for a catalog already at head")

    monkeypatch.setattr(migrate, "_upgrade_sync", no_alembic)
    await (await Catalog.open(empty_url)).close()


async def test_concurrent_openers_migrate_once(empty_url: str) -> None:
    catalogs = await asyncio.gather(*(Catalog.open(empty_url) for _ in range(4)))
    try:
        async with catalogs[0].database.engine.connect() as conn:
            assert await conn.run_sync(current_revisions) == (head_revision(),)
    finally:
        for c in catalogs:
            await c.close()


async def test_unknown_revision_is_refused_with_a_clear_error(empty_url: str) -> None:
    catalog = await Catalog.open(empty_url)
    async with catalog.database.engine.begin() as conn:
        await conn.exec_driver_sql("UPDATE alembic_version SET version_num = '9999_future'")
    await catalog.close()
    with pytest.raises(CatalogError, match=r"9999_future.*newer nbia-sync"):
        await Catalog.open(empty_url)


async def test_unreachable_database_names_host_port_but_not_password() -> None:
    # Port 1 on loopback: nothing listens, the connection is refused at once.
    url = "postgresql+asyncpg://someone:s3cr3t-pw@127.0.0.1:1/catalog"
    with pytest.raises(CatalogError) as info:
        await Catalog.open(url)
    message = str(info.value)
    assert "127.0.0.1:1" in message
    assert "s3cr3t-pw" not in message


async def test_unsupported_url_is_a_catalog_error() -> None:
    with pytest.raises(CatalogError, match="unsupported"):
        await Catalog.open("mysql+aiomysql://u@127.0.0.1/x")
