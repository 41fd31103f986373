"""progress watch: until when someone looks at a job's progress

A worker reads a running job's progress from its A1111 (and stores it) every PROGRESS_SECONDS
only while someone looks at the job: a read of the job (GET /sdapi/v1/jobs/{id}), its event
stream, or A1111's /sdapi/v1/progress; otherwise every few seconds (worker/execute.py).

Revision ID: 8a3c6d1f9b27
Revises: 5b8e2f71c3d9
Create Date: 2026-12-05 06:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "8a3c6d1f9b27"
down_revision: str | None = "5b8e2f71c3d9"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("progress_wanted_until", sa.Double(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("progress_wanted_until")
