"""Alembic environment for the nbia-sync catalog.

Runs only online, on the connection nbia_sync.catalog.migrate passes in
`config.attributes["connection"]` (inside its transaction and migration lock).
"""

from __future__ import annotations

from alembic import context

from nbia_sync.catalog.tables import METADATA

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError(
        "nbia-sync migrations run through nbia_sync.catalog.migrate (Catalog.open), "
        "which supplies the database connection"
    )

context.configure(
    connection=connection,
    target_metadata=METADATA,
    # SQLite cannot ALTER most things: alembic rebuilds tables in batch mode instead.
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
