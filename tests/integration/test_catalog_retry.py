"""The catalog's own retries of transient database errors: the one backoff, on its clock."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection

from nbia_sync.catalog.db import RETRY_ATTEMPTS, Database
from nbia_sync.clock import FakeClock
from nbia_sync.errors import CatalogError

pytestmark = pytest.mark.asyncio


def locked() -> OperationalError:
    return OperationalError("BEGIN IMMEDIATE", {}, Exception("database is locked"))


async def test_a_transient_error_is_retried_after_a_backoff_on_the_catalog_clock(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    db = await Database.connect(f"sqlite+aiosqlite:///{tmp_path / 'c.sqlite'}", clock)
    failures = [locked(), locked()]

    async def op(conn: AsyncConnection) -> int:
        if failures:
            raise failures.pop()
        return 7

    try:
        assert await db.run_write(op) == 7
    finally:
        await db.dispose()
    # Full jitter under the RetryPolicy(0.02, 2.0) ceilings: 0.02 s, then 0.04 s.
    assert len(clock.sleeps) == 2
    assert 0 <= clock.sleeps[0] <= 0.02 and 0 <= clock.sleeps[1] <= 0.04


async def test_retries_give_up_as_a_catalog_error_after_the_attempts(tmp_path: Path) -> None:
    clock = FakeClock()
    db = await Database.connect(f"sqlite+aiosqlite:///{tmp_path / 'c.sqlite'}", clock)

    async def op(conn: AsyncConnection) -> None:
        raise locked()

    try:
        with pytest.raises(CatalogError, match="database is locked"):
            await db.run_write(op)
    finally:
        await db.dispose()
    assert len(clock.sleeps) == RETRY_ATTEMPTS - 1
