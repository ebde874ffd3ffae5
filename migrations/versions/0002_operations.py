"""Columns for withdrawals, identity conflicts, unverifiable files, skipped records and
process start times.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01

- series.withdrawn_at: when a full listing of the series' collection stopped returning it
  (state `withdrawn`).
- series.conflict: why the series is held back as an identity conflict (state `conflict`):
  the same SeriesInstanceUID under another path or another source.
- series.unverified_files: files the archive published no MD5 for (a blank hash), accepted
  on the other checks and counted so `status` can show them.
- sync_runs.skipped: malformed archive records skipped by that run's discovery.
- workers.process_start: the process's start time as the OS reports it (Linux: clock ticks
  since boot from /proc/<pid>/stat), so a PID reused by another process is not taken
  for the dead owner.
Types are spelled out, as in 0001.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("series") as batch:
        batch.add_column(sa.Column("withdrawn_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("conflict", sa.Text(), nullable=True))
        batch.add_column(
            sa.Column("unverified_files", sa.Integer(), nullable=False, server_default="0")
        )
    with op.batch_alter_table("sync_runs") as batch:
        batch.add_column(sa.Column("skipped", sa.Integer(), nullable=False, server_default="0"))
    with op.batch_alter_table("workers") as batch:
        batch.add_column(sa.Column("process_start", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.drop_column("process_start")
    with op.batch_alter_table("sync_runs") as batch:
        batch.drop_column("skipped")
    with op.batch_alter_table("series") as batch:
        batch.drop_column("unverified_files")
        batch.drop_column("conflict")
        batch.drop_column("withdrawn_at")
