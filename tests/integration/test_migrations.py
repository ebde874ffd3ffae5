"""The alembic history: applies from empty on both dialects and matches the schema in
nbia_sync/catalog/tables.py."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from catalog_fixtures import fresh_pg_database
from sqlalchemy.engine import Connection

from nbia_sync.catalog import Catalog, migrate
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


def _diff(conn: Connection) -> list[Any]:
    # Types and server defaults too: a migration that forgets either must fail here.
    opts = {"compare_type": True, "compare_server_default": True}
    context = MigrationContext.configure(conn, opts=opts)
    return list(compare_metadata(context, METADATA))


async def test_upgrade_from_empty_matches_the_schema(empty_url: str) -> None:
    catalog = await Catalog.open(empty_url)
    try:
        async with catalog.database.engine.connect() as conn:
            assert await conn.run_sync(_diff) == []
            assert await conn.run_sync(current_revisions) == (head_revision(),)
    finally:
        await catalog.close()


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
