"""claim backends function: PostgreSQL locks a claim's idle backends and looks again, in one call

Revision ID: 4e1b7c9d2a60
Revises: 7d2f1e8a4b36
Create Date: 2026-12-03 06:00:00

A claim on PostgreSQL takes a transaction-scoped advisory lock per backend that looks idle,
then looks again under the locks (a fresh snapshot: it sees every claim that held one of them
before). Done by one function, that is one round trip instead of two; and with
pg_try_advisory_xact_lock, so a claim never waits for another claim: a backend locked by
another claim at this moment is left to that claim (jobs/placement.py). SQLite serialises write
transactions and needs none of this.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "4e1b7c9d2a60"
down_revision: str | None = "7d2f1e8a4b36"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# VOLATILE (the default): each query inside takes a fresh snapshot, which the second look needs.
_FUNCTION = """
CREATE OR REPLACE FUNCTION a1111_proxy_idle_backends(names text[], claimer text, space integer)
RETURNS SETOF text LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    candidate text;
    locked text[] := '{}';
BEGIN
    FOR candidate IN
        SELECT DISTINCT n FROM unnest(names) AS n
        WHERE NOT EXISTS (
            SELECT 1 FROM jobs
            WHERE jobs.status = 'processing' AND jobs.backend = n AND jobs.lease_owner <> claimer
        )
    LOOP
        IF pg_try_advisory_xact_lock(space, hashtext(candidate)) THEN
            locked := locked || candidate;
        END IF;
    END LOOP;
    RETURN QUERY
        SELECT n FROM unnest(locked) AS n
        WHERE NOT EXISTS (
            SELECT 1 FROM jobs
            WHERE jobs.status = 'processing' AND jobs.backend = n AND jobs.lease_owner <> claimer
        );
END
$$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_FUNCTION)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS a1111_proxy_idle_backends(text[], text, integer)")
