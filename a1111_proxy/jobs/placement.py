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
    several workers at once: each takes a transaction-scoped advisory lock per backend that
    looks idle (`_lock_idle`), then looks again under the locks, so two claims never both see
    a backend idle.
    """
    names = sorted({name for name, _ in slots})
    if not db.is_sqlite:
        names = await _lock_idle(conn, owner, names)
        if not names:
            return []
    free = set(names) - await _busy(conn, owner, names)
    taken: set[str] = set()
    indexes = []
    for index, (name, _) in enumerate(slots):
        if name in free and name not in taken:  # a URL listed twice is still one backend
            taken.add(name)
            indexes.append(index)
    return indexes


# The backends of `names` that run no job of another worker, each locked (in the order of the
# lock keys, so that two claims never deadlock) until the transaction ends. A backend busy at
# the statement's start is left alone: workers sharing many backends then lock only the few
# that are idle, instead of queueing behind each other's locks on all of them; the worker whose
# job ends there NOTIFYs when it has stored it, and the claims that follow see it idle.
_LOCK_IDLE = text(
    "SELECT name, pg_advisory_xact_lock(:space, key) FROM ("
    "SELECT DISTINCT name, hashtext(name) AS key FROM unnest(CAST(:names AS text[])) AS name "
    "WHERE NOT EXISTS (SELECT 1 FROM jobs WHERE jobs.status = 'processing' "
    "AND jobs.backend = name AND jobs.lease_owner <> :owner)) AS idle "
    "ORDER BY key"
)


async def _lock_idle(conn: AsyncConnection, owner: str, names: list[str]) -> list[str]:
    """PostgreSQL: lock the backends among `names` that look idle; their names."""
    params = {"names": names, "owner": owner, "space": ADVISORY_SPACE}
    return sorted(set((await conn.execute(_LOCK_IDLE, params)).scalars()))


async def _busy(conn: AsyncConnection, owner: str, names: list[str]) -> set[str]:
    """Which of `names` run a job of another worker (a fresh look: after the locks are held,
    it sees every claim that held one of them before)."""
    return set((await conn.execute(_BUSY, {"b_names": names, "b_owner": owner})).scalars())


def place(rows: list[AnyRow], slots: Slots) -> list[tuple[int, AnyRow]]:
    """Give each claimed job (in queue order) a slot, preferring one that has its checkpoint."""
    free = list(range(len(slots)))
    placed = []
    for row in rows:
        match = next((i for i in free if row.checkpoint and slots[i][1] == row.checkpoint), free[0])
        free.remove(match)
        placed.append((match, row))
    return placed
