"""Fair share: the turn a new job takes, so that claims rotate across owners within a priority.

Claims go by priority, then turn, then age (clauses.QUEUE_ORDER). An owner (the tenant: a token's
name, or the client's address with tokens off) numbers its queued jobs of a priority one after
the other, starting from the queue's current turn (the lowest among that priority's queued jobs):

    turn = (the owner's highest turn among its queued jobs of this priority) + 1,
           or, when it has none, the lowest turn queued at this priority,
           or, when none is queued, the highest turn running at this priority, or 0

So an owner's 1,000th job waits behind every other owner's first: a job submitted behind a
1,000-job batch is claimed after at most one more of that batch per slot, and owners with jobs
waiting alternate. Ties go to the older job. A job put back in the queue (a retry, a release, a
lost lease) keeps its turn, and so its place; the running jobs' turns carry the count across a
moment when the queue is empty, so that a retried job is not put behind newcomers numbered from
0 again. The queue view (reads.py) shows this same order.

Jobs stored together (a grouped commit, intake.py) read the next turn of each owner and priority
among them in one small statement before their INSERT (on PostgreSQL, a CTE of that INSERT:
`first_turns`); each owner's jobs then follow on from each other. The groups travel as one array
(PostgreSQL's unnest, SQLite's json_each), so the statement is the same whatever their number:
prepared and planned once. Each group reads one index entry (ix_jobs_owner_turns, ix_jobs_queue; the
running jobs only when nothing is queued at its priority). Written as subqueries in the INSERT (per
row), or as one column per group, it cost PostgreSQL about a millisecond of planning per row or
group of each new shape. Two submits of one owner committed at the same moment by two API processes
on PostgreSQL can take the same turn (each reads before the other commits): that owner then gets two
jobs in one turn, once; no job is lost or held back. Jobs without an owner (stored by code that
gives none, or before owners were recorded: the migration numbered those) count as one owner.
A job's priority never changes once it is queued; a change would have to give it a new turn.
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from collections.abc import Sequence
from functools import cache
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Select,
    String,
    and_,
    bindparam,
    func,
    select,
)

from a1111_proxy.db.sqlite_driver import Prepared, positional
from a1111_proxy.db.tables import jobs
from a1111_proxy.jobs.clauses import in_status

Group = tuple[str | None, int]  # (owner, priority)


def assign_turns_sqlite(connection: sqlite3.Connection, rows: Sequence[dict[str, Any]]) -> None:
    """Give each row its `turn` (rows about to be inserted together, in their order), with
    sqlite3 itself, on the connection's thread, in its transaction (the submit path's one round
    trip: intake.py)."""
    groups = _groups(rows)
    prepared = _sqlite_prepared()
    found = connection.execute(prepared.sql, prepared.args(groups=json.dumps(groups))).fetchall()
    _give_turns(rows, groups, [turn for (turn,) in found])


def _groups(rows: Sequence[dict[str, Any]]) -> list[Group]:
    return list(dict.fromkeys((row["owner"], row["priority"]) for row in rows))


def _give_turns(rows: Sequence[dict[str, Any]], groups: list[Group], firsts: list[int]) -> None:
    first = dict(zip(groups, firsts, strict=True))
    taken: Counter[Group] = Counter()
    for row in rows:
        group = (row["owner"], row["priority"])
        row["turn"] = first[group] + taken[group]
        taken[group] += 1


def first_turns(groups: Any) -> Any:
    """PostgreSQL, for a statement that stores jobs: a CTE `turns` of the next turn (`turn`)
    of each group of `groups` (a relation of distinct owner, priority)."""
    turn = _next_turn(groups.c.owner, groups.c.priority)
    return select(groups.c.owner, groups.c.priority, turn.label("turn")).cte("turns")


def _next_turns(owner: Any, priority: Any, n: Any) -> Select[Any]:
    """The next turn of each group (owner, priority; n its order) of a table-valued function."""
    return select(_next_turn(owner, priority)).order_by(n)


def _next_turn(owner: Any, priority: Any) -> ColumnElement[int]:
    named = _turn(func.max, "queued", priority, jobs.c.owner == owner)
    ownerless = _turn(func.max, "queued", priority, and_(owner.is_(None), jobs.c.owner.is_(None)))
    return func.coalesce(
        func.coalesce(named, ownerless) + 1,
        _turn(func.min, "queued", priority),
        _turn(func.max, "processing", priority),
        0,
    )


def _turn(aggregate: Any, status: str, priority: Any, *terms: Any) -> ColumnElement[int]:
    """One index entry: the lowest or highest turn of jobs in `status` at `priority`."""
    query = select(aggregate(jobs.c.turn)).where(in_status(status), jobs.c.priority == priority)
    return query.where(*terms).scalar_subquery()


def _sqlite() -> Select[Any]:
    groups = func.json_each(bindparam("groups", type_=String)).table_valued("key", "value")
    group = groups.alias("g")
    owner, priority = (func.json_extract(group.c.value, f"$[{i}]") for i in (0, 1))
    return _next_turns(owner, priority, group.c.key).select_from(group)


_SQLITE = _sqlite()


@cache
def _sqlite_prepared() -> Prepared:
    return positional(_SQLITE)
