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

It is computed in the INSERT (scalar subqueries that read one entry of ix_jobs_owner_turns or
ix_jobs_queue, or the few running jobs): no statement more per submit. Jobs of one owner in one grouped commit
(intake.py) follow on from each other by their `turn_offset`. Two submits of one owner committed
at the same moment by two API processes on PostgreSQL can take the same turn (each reads before
the other commits): that owner then gets two jobs in one turn, once; no job is lost or held back.
Jobs without an owner (only from code that gives none; those stored before owners were recorded
were numbered by the migration) take the queue's current turn, in the order they came.
A job's priority never changes once it is queued; a change would have to give it a new turn.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Integer,
    String,
    bindparam,
    func,
    literal_column,
    select,
)

from a1111_proxy.db.tables import jobs
from a1111_proxy.jobs.clauses import in_status

# The bound values of next_turn(), in each inserted row beside its columns.
OWNER, PRIORITY, OFFSET = "turn_owner", "turn_priority", "turn_offset"


def next_turn() -> ColumnElement[int]:
    """The turn of a job being inserted (an INSERT's value for `turn`); each row binds OWNER,
    PRIORITY and OFFSET (turn_values), each once (a derived row, `arriving`, holds them)."""
    new = select(
        bindparam(OWNER, type_=String).label("owner"),
        bindparam(PRIORITY, type_=Integer).label("priority"),
        bindparam(OFFSET, type_=Integer).label("n"),
    ).subquery("arriving")
    one, zero = literal_column("1", BigInteger), literal_column("0", BigInteger)
    turn = func.coalesce(
        _turn(func.max, "queued", new.c.priority, new.c.owner) + one,
        _turn(func.min, "queued", new.c.priority),
        _turn(func.max, "processing", new.c.priority),
        zero,
        type_=BigInteger,
    )
    return select(turn + new.c.n).select_from(new).scalar_subquery()


def _turn(aggregate: Any, status: str, priority: Any, owner: Any = None) -> ColumnElement[int]:
    """One index entry: the lowest or highest turn of jobs in `status` at `priority` (of
    `owner`)."""
    terms = [in_status(status), jobs.c.priority == priority]
    if owner is not None:
        terms.append(jobs.c.owner == owner)
    return select(aggregate(jobs.c.turn)).where(*terms).scalar_subquery()


def turn_values(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """What next_turn() binds, for rows inserted in one statement, in their order: each owner's
    jobs of a priority follow on from one another (OFFSET 0, 1, 2...). Rows without an owner
    all take offset 0 (the queue's current turn, ties in the order they came)."""
    seen: Counter[tuple[str, int]] = Counter()
    values = []
    for row in rows:
        owner, priority = row["owner"], row["priority"]
        offset = 0
        if owner is not None:
            offset = seen[(owner, priority)]
            seen[(owner, priority)] += 1
        values.append({OWNER: owner, PRIORITY: priority, OFFSET: offset})
    return values
