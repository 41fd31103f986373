"""Placement, within a claim's transaction: which of a worker's slots may take a job now, and
which slot each claimed job goes to."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from functools import cache
from typing import Any

from sqlalchemy import String, Text, bindparam, func, select
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncConnection

from a1111_proxy.db.engine import Database
from a1111_proxy.db.sqlite_driver import Prepared, positional
from a1111_proxy.db.tables import jobs
from a1111_proxy.jobs.records import AnyRow

ADVISORY_SPACE = 7861_0001  # first key of our advisory locks (one per backend, during a claim)

Slots = Sequence[tuple[str, str | None]]  # (backend name, checkpoint it last ran)

# SQLite: the backends among b_names (a JSON array) that run a job of a worker other than
# b_owner (built once: see machine.py's statements; run by SQLAlchemy or by sqlite3 itself).
_NAMED = func.json_each(bindparam("b_names", type_=String)).table_valued("value").alias("n")
_BUSY = (
    select(jobs.c.backend)
    .distinct()
    .where(
        jobs.c.status == "processing",
        jobs.c.backend.in_(select(_NAMED.c.value)),
        jobs.c.lease_owner != bindparam("b_owner"),
    )
)


async def idle_slots(db: Database, conn: AsyncConnection, owner: str, slots: Slots) -> list[int]:
    """Indexes of `slots` whose backend runs no job of another worker now.

    The owner's own jobs do not count: its slots are free only when their backend has
    answered (a job still storing its result no longer occupies the backend).
    SQLite serialises write transactions, so reading is enough. PostgreSQL runs claims of
    several workers at once: one call (`_lock_idle`) takes a transaction-scoped advisory lock
    per backend that looks idle, then looks again under the locks, so two claims never both
    see a backend idle.
    """
    names = sorted({name for name, _ in slots})
    if db.is_sqlite:
        free = set(names) - await _busy(conn, owner, names)
    else:
        free = await _lock_idle(conn, owner, names)
    return _open(slots, free)


def idle_slots_sqlite(connection: sqlite3.Connection, owner: str, slots: Slots) -> list[int]:
    """idle_slots on SQLite with sqlite3 itself, on the connection's thread, in its write
    transaction (a claim's one round trip: machine.py)."""
    names = sorted({name for name, _ in slots})
    busy = _busy_prepared()
    found = connection.execute(busy.sql, busy.args(b_names=json.dumps(names), b_owner=owner))
    return _open(slots, set(names) - {name for (name,) in found})


def _open(slots: Slots, free: set[str]) -> list[int]:
    """Indexes of `slots` whose backend is `free`, each backend once (a URL listed twice is
    still one backend)."""
    taken: set[str] = set()
    indexes = []
    for index, (name, _) in enumerate(slots):
        if name in free and name not in taken:
            taken.add(name)
            indexes.append(index)
    return indexes


@cache
def _busy_prepared() -> Prepared:
    return positional(_BUSY)


# The backends of `names` that run no job of another worker, each locked until the transaction
# ends (the function is made by the migration claim_backends_function). A backend busy at the
# call's start is left alone: workers sharing many backends lock only the few that are idle. So
# is one whose lock another claim holds at this moment (a try-lock): that claim gives it a job
# if one waits, and no claim ever waits for another. After the locks, a second look (a fresh
# snapshot) sees every claim that held one of them before; the worker whose job ends on a
# backend NOTIFYs when it has stored it, and the claims that follow see it idle.
def idle_backends(names: Any, owner: Any) -> Any:
    """PostgreSQL, for a claim's statement: a CTE `idle` of the backends among `names` (a
    text[]) that run no job of a worker other than `owner`, each locked (see above),
    numbered (`n`, from 1) in the order of `names`."""
    found = func.a1111_proxy_idle_backends(names, owner, ADVISORY_SPACE).table_valued("name")
    order = func.array_position(names, found.c.name)
    return select(found.c.name, func.row_number().over(order_by=order).label("n")).cte("idle")


_IDLE = idle_backends(bindparam("b_names", type_=ARRAY(Text)), bindparam("b_owner"))
_LOCK_IDLE = select(_IDLE.c.name)  # built once (see machine.py's statements)


async def _lock_idle(conn: AsyncConnection, owner: str, names: list[str]) -> set[str]:
    """PostgreSQL: the backends among `names` that are idle, each locked."""
    return set((await conn.execute(_LOCK_IDLE, {"b_names": names, "b_owner": owner})).scalars())


async def _busy(conn: AsyncConnection, owner: str, names: list[str]) -> set[str]:
    """SQLite: which of `names` run a job of another worker (write transactions are
    serialised, so this look sees every claim before it)."""
    found = await conn.execute(_BUSY, {"b_names": json.dumps(names), "b_owner": owner})
    return set(found.scalars())


def place(rows: list[AnyRow], slots: Slots) -> list[tuple[int, AnyRow]]:
    """Give each claimed job (in queue order) a slot, preferring one that has its checkpoint."""
    free = list(range(len(slots)))
    placed = []
    for row in rows:
        match = next((i for i in free if row.checkpoint and slots[i][1] == row.checkpoint), free[0])
        free.remove(match)
        placed.append((match, row))
    return placed
