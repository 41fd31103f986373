"""checkpoint listing index: jobs that asked for a checkpoint, newest first (GET /jobs?model=)

Revision ID: 9c4e7a2b1d05
Revises: c3a836179eef
Create Date: 2026-12-01 16:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "9c4e7a2b1d05"
down_revision: str | None = "c3a836179eef"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_jobs_checkpoint_seq", "jobs", ["checkpoint", "seq"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_jobs_checkpoint_seq", table_name="jobs")
