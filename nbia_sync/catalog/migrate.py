"""Alembic, driven from code: upgrade the catalog to head when it is opened.

Alembic has no async API, so the upgrade runs on an async connection through
`run_sync`, the connection handed to env.py in `config.attributes`. The whole upgrade
is one transaction that first takes a cross-process lock (PostgreSQL advisory xact
lock; SQLite BEGIN IMMEDIATE), so several processes opening one catalog at once
migrate it exactly once.

A database holding none of the catalog's tables is created from the schema in
`tables.py` and stamped at HEAD_REVISION, alembic's "create from scratch" recipe:
importing alembic would cost a first sync ~0.3 s. Only existing catalogs are migrated;
tests/integration/test_migrations.py checks both paths give the same schema.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Column, MetaData, PrimaryKeyConstraint, String, Table, inspect, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from nbia_sync.catalog.db import Database
from nbia_sync.catalog.tables import METADATA
from nbia_sync.errors import CatalogError

if TYPE_CHECKING:
    from alembic.config import Config

# Arbitrary constant: the advisory lock key that serialises migrations of one database.
_PG_MIGRATION_LOCK = 0x4E424941  # "NBIA"
# The newest revision in migrations/versions, known without importing alembic (~0.1 s of
# start-up): a catalog already there is opened with one plain query. A test keeps this
# equal to alembic's head; update it with every new migration.
HEAD_REVISION = "0002"

# alembic's own bookkeeping table, as alembic creates it, for stamping a new catalog.
_VERSION_TABLE = Table(
    "alembic_version",
    MetaData(),
    Column("version_num", String(32), nullable=False),
    PrimaryKeyConstraint("version_num", name="alembic_version_pkc"),
)


def script_location() -> str:
    """Where the alembic scripts are: the installed package, or the source tree."""
    try:
        return str(files("nbia_sync.migrations"))
    except ModuleNotFoundError:
        # Running from a checkout without installing: pyproject maps migrations/ to
        # nbia_sync.migrations only in a built/installed package.
        tree = Path(__file__).resolve().parents[2] / "migrations"
        if (tree / "env.py").is_file():
            return str(tree)
        raise CatalogError("the catalog migrations are missing from this installation") from None


def alembic_config(connection: Connection | None = None) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", script_location())
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    """The head as alembic computes it from the scripts (see HEAD_REVISION)."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revisions(connection: Connection) -> tuple[str, ...]:
    from alembic.runtime.migration import MigrationContext

    return tuple(MigrationContext.configure(connection).get_current_heads())


def _upgrade_sync(connection: Connection) -> None:
    from alembic import command
    from alembic.script import ScriptDirectory

    cfg = alembic_config(connection)
    script = ScriptDirectory.from_config(cfg)
    known = {rev.revision for rev in script.walk_revisions()}
    unknown = [rev for rev in current_revisions(connection) if rev not in known]
    if unknown:
        raise CatalogError(
            f"the catalog is at schema revision {', '.join(unknown)}, which this version of "
            "nbia-sync does not know (written by a newer nbia-sync?); upgrade nbia-sync"
        )
    command.upgrade(cfg, "head")


def is_empty(connection: Connection) -> bool:
    """True if the database holds neither catalog tables nor alembic's version table
    (other applications' tables in a shared PostgreSQL database do not count)."""
    existing = set(inspect(connection).get_table_names())
    return existing.isdisjoint(METADATA.tables) and _VERSION_TABLE.name not in existing


def create_at_head(connection: Connection) -> None:
    """Create the catalog's schema on an empty database and stamp it at head."""
    METADATA.create_all(connection)
    _VERSION_TABLE.create(connection)
    connection.execute(_VERSION_TABLE.insert().values(version_num=HEAD_REVISION))


def _create_or_upgrade(connection: Connection) -> None:
    # Decided inside the migration lock: another opener may just have created it.
    if is_empty(connection):
        create_at_head(connection)
    else:
        _upgrade_sync(connection)


async def at_head(db: Database) -> bool:
    """True if the catalog's stored revision is exactly HEAD_REVISION (one plain read;
    False for a new or older catalog, or one that cannot be read that way)."""
    try:
        async with db.read() as conn:
            rows = (await conn.execute(text("SELECT version_num FROM alembic_version"))).all()
    except DBAPIError:  # no alembic_version table yet: a new catalog
        return False
    return [r[0] for r in rows] == [HEAD_REVISION]


async def upgrade(db: Database) -> None:
    """Bring the catalog to the newest schema; safe with concurrent openers.

    A catalog already at head (every start but the first after an upgrade) costs one
    read; neither it nor a new catalog imports alembic."""
    if await at_head(db):
        return
    async with db.write() as conn:
        if not db.is_sqlite:
            await conn.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK}
            )
        await conn.run_sync(_create_or_upgrade)
