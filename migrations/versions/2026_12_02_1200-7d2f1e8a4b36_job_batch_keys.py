"""job batch keys: what a job must share with others to run in one engine batch

Revision ID: 7d2f1e8a4b36
Revises: 9c4e7a2b1d05
Create Date: 2026-12-02 12:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "7d2f1e8a4b36"
down_revision: str | None = "9c4e7a2b1d05"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_QUEUED_WITH_KEY = "status = 'queued' AND batch_key IS NOT NULL"


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("batch_key", sa.String(length=64), nullable=True))
    op.create_index(
        "ix_jobs_batch_key",
        "jobs",
        ["batch_key", "priority", "turn", "seq"],
        unique=False,
        postgresql_where=sa.text(_QUEUED_WITH_KEY),
        sqlite_where=sa.text(_QUEUED_WITH_KEY),
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_batch_key", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("batch_key")
