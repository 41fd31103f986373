"""tenant listing index: a tenant's jobs newest first (GET /jobs), and its submit rate

Revision ID: 5b1f3c2d9e7a
Revises: 62d8ef72f7db
Create Date: 2026-11-30 15:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "5b1f3c2d9e7a"
down_revision: str | None = "62d8ef72f7db"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_jobs_owner_seq", "jobs", ["owner", "seq"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_jobs_owner_seq", table_name="jobs")
