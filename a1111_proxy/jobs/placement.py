"""Placement, within a claim's transaction: which of a worker's slots may take a job now, and
which slot each claimed job goes to."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import bindparam, select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from a1111_proxy.db.engine import Database
from a1111_proxy.db.tables import jobs
from a1111_proxy.jobs.records import AnyRow

ADVISORY_SPACE = 7861_0001  # first key of our advisory locks (one per backend, during a claim)

Slots = Sequence[tuple[str, str | None]]  # (backend name, checkpoint it last ran)

# The backends among b_names that run a job of a worker other than b_owner (built once: see
# machine.py's statements).
_BUSY = (
    select(jobs.c.backend)
    .distinct()
    .where(
        jobs.c.status == "processing",
        jobs.c.backend.in_(bindparam("b_names", expanding=True)),
        jobs.c.lease_owner != bindparam("b_owner"),
    )
)


async def idle_slots(db: Database, conn: AsyncConnection, owner: str, slots: Slots) -> list[int]:
    """Indexes of `slots` whose backend runs no job of another worker now.

    The owner's own jobs do not count: its slots are free only when their backend has
    answered (a job still storing its result no longer occupies the backend).
    SQLite serialises write transactions, so reading is enough. PostgreSQL runs claims of
    several workers at once: each first takes a transaction-scoped advisory lock per
    backend, in the order of the lock keys (so two claims never deadlock), and so two
    claims never both see a backend idle.
    """
    names = sorted({name for name, _ in slots})
    if not db.is_sqlite:
        await conn.execute(
            text(
                "SELECT pg_advisory_xact_lock(:space, key) FROM (SELECT DISTINCT "
                "hashtext(name) AS key FROM unnest(CAST(:names AS text[])) AS name) AS k "
                "ORDER BY key"
            ),
            {"names": names, "space": ADVISORY_SPACE},
        )
    busy = set((await conn.execute(_BUSY, {"b_names": names, "b_owner": owner})).scalars())
    free = set(names) - busy
    taken: set[str] = set()
    indexes = []
    for index, (name, _) in enumerate(slots):
        if name in free and name not in taken:  # a URL listed twice is still one backend
            taken.add(name)
            indexes.append(index)
    return indexes


def place(rows: list[AnyRow], slots: Slots) -> list[tuple[int, AnyRow]]:
    """Give each claimed job (in queue order) a slot, preferring one that has its checkpoint."""
    free = list(range(len(slots)))
    placed = []
    for row in rows:
        match = next((i for i in free if row.checkpoint and slots[i][1] == row.checkpoint), free[0])
        free.remove(match)
        placed.append((match, row))
    return placed
