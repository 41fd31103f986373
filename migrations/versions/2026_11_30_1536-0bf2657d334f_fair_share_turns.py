"""fair share turns: claims rotate across owners within a priority (a1111_proxy/jobs/turns.py)

Each job gets a `turn`; claims go by priority, then turn, then age, through a new ix_jobs_queue
(status, priority DESC, turn, seq; queued jobs only) that serves the claim's order from its first
rows. The old one, (priority, seq), could not serve "priority DESC, seq": SQLite read every queued
job through ix_jobs_status_seq and sorted them, for each claim. ix_jobs_owner_status grows into
ix_jobs_owner_turns (owner, status, priority, turn), which also finds an owner's last turn at
submit.

Queued and running jobs are numbered per owner and priority in the order they came (jobs with no
owner, from before 62d8ef72f7db, count as one owner): the queue rotates across owners at once.

Revision ID: 0bf2657d334f
Revises: 5b1f3c2d9e7a
Create Date: 2026-11-30 14:36:11.050179
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0bf2657d334f"
down_revision: str | None = "5b1f3c2d9e7a"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

QUEUED = sa.text("status = 'queued'")

# UPDATE ... FROM: SQLite 3.33 or newer (the proxy needs 3.35) and PostgreSQL.
BACKFILL = """
UPDATE jobs SET turn = ranked.turn
FROM (
    SELECT seq, row_number() OVER (PARTITION BY priority, owner ORDER BY seq) - 1 AS turn
    FROM jobs WHERE status IN ('queued', 'processing')
) AS ranked
WHERE jobs.seq = ranked.seq
"""


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("turn", sa.BigInteger(), server_default=sa.text("0"), nullable=False)
        )
    op.execute(BACKFILL)
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_owner_status")
        batch_op.drop_index("ix_jobs_queue", postgresql_where=QUEUED, sqlite_where=QUEUED)
        batch_op.create_index(
            "ix_jobs_queue",
            ["status", sa.literal_column("priority DESC"), "turn", "seq"],
            unique=False,
            postgresql_where=QUEUED,
            sqlite_where=QUEUED,
        )
        batch_op.create_index(
            "ix_jobs_owner_turns", ["owner", "status", "priority", "turn"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_owner_turns")
        batch_op.drop_index("ix_jobs_queue", postgresql_where=QUEUED, sqlite_where=QUEUED)
        batch_op.create_index(
            "ix_jobs_queue",
            ["priority", "seq"],
            unique=False,
            postgresql_where=QUEUED,
            sqlite_where=QUEUED,
        )
        batch_op.create_index("ix_jobs_owner_status", ["owner", "status"], unique=False)
        batch_op.drop_column("turn")
