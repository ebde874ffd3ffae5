"""What a pass asks of the catalog before and after its discovery: reads where nothing
changes, so a pass on an unchanged mirror takes the SQLite write lock only for its own
rows (run, worker, discovery lock, watermark)."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from catalog_fixtures import make_series, make_source

from nbia_sync.catalog import Catalog, Listing
from nbia_sync.catalog.db import Database
from nbia_sync.catalog.records import DiscoveryStart

pytestmark = pytest.mark.asyncio

# Far below the busy timeout (30 s) a write would wait for while another holds the lock.
PROMPTLY = 2.0


@contextlib.contextmanager
def write_lock_held(path: Path) -> Iterator[None]:
    """Another process's write transaction on the SQLite file, open for the block."""
    con = sqlite3.connect(path, isolation_level=None)
    try:
        con.execute("BEGIN IMMEDIATE")
        yield
        con.execute("ROLLBACK")
    finally:
        con.close()


async def test_ensuring_a_source_already_as_configured_takes_no_write_lock(
    tmp_path: Path,
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/catalog.sqlite"
    async with await Catalog.open(url) as first:
        created = await first.sources.ensure_source(make_source())
    async with await Catalog.open(url) as later:  # a later pass: nothing remembered
        with write_lock_held(tmp_path / "catalog.sqlite"):
            found = await asyncio.wait_for(later.sources.ensure_source(make_source()), PROMPTLY)
    assert found == created


async def test_a_source_whose_url_changed_gets_its_row_updated(catalog: Catalog) -> None:
    sid = await catalog.sources.ensure_source(make_source())
    moved = replace(make_source(), url="http://127.0.0.1:2/nbia-api/")
    assert await catalog.sources.ensure_source(moved) == sid
    async with catalog.database.read() as conn:
        stored = await conn.exec_driver_sql("SELECT url FROM sources")
        assert stored.scalars().all() == ["http://127.0.0.1:2/nbia-api/"]


async def test_a_source_ensured_once_is_not_asked_for_again(
    catalog: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    sid = await catalog.sources.ensure_source(make_source())

    async def asked(*_: object) -> None:
        raise AssertionError("the catalog was asked again")

    monkeypatch.setattr(Database, "run_read", asked)
    monkeypatch.setattr(Database, "run_write", asked)
    assert await catalog.sources.ensure_source(make_source()) == sid


async def test_finishing_an_increment_with_nothing_to_judge_takes_no_write_lock(
    tmp_path: Path,
) -> None:
    async with await Catalog.open(f"sqlite+aiosqlite:///{tmp_path}/catalog.sqlite") as catalog:
        sid = await catalog.sources.ensure_source(make_source())
        await catalog.sources.upsert_series(sid, [make_series("1")])
        with write_lock_held(tmp_path / "catalog.sqlite"):
            finished = catalog.sources.finish_listing(sid, Listing())
            result = await asyncio.wait_for(finished, PROMPTLY)
    assert (result.changed, result.conflicts) == (0, 0)


async def test_the_discovery_start_is_the_watermark_last_full_listing_and_collections(
    catalog: Catalog,
) -> None:
    sid = await catalog.sources.ensure_source(make_source())
    assert await catalog.sources.discovery_start(sid) == DiscoveryStart(None, None, [])
    mark = datetime(2024, 5, 6, tzinfo=UTC)
    await catalog.sources.set_watermark(sid, mark, full_listing=True)
    await catalog.sources.record_collections(sid, ["B", "A"])
    start = await catalog.sources.discovery_start(sid)
    assert (start.watermark, start.collections) == (mark, ["A", "B"])
    assert start.last_full_listing_at is not None


async def test_the_discovery_start_of_an_unknown_source_is_empty(catalog: Catalog) -> None:
    assert await catalog.sources.discovery_start(12345) == DiscoveryStart(None, None, [])
