"""preview watch: until when someone looks at a job's live preview

A worker fetches a running job's live preview from its A1111 (and stores it) only while
someone looks at it: an event stream of the job, or A1111's /sdapi/v1/progress with its image.

Revision ID: 5b8e2f71c3d9
Revises: 4e1b7c9d2a60
Create Date: 2026-12-04 06:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "5b8e2f71c3d9"
down_revision: str | None = "4e1b7c9d2a60"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("preview_wanted_until", sa.Double(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("preview_wanted_until")
