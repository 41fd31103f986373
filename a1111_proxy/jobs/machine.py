"""JobMachine: the worker's side of the state machine, the claim and every write under a lease.

The states and moves are drawn in the package docstring. Jobs are born queued (intake.py); only
this module and control.py (cancel, and the sweeps of lost leases and deadlines) change a job's
status. Every write after the claim is fenced by the
lease token (`WHERE lease_token = :token AND status = 'processing'`), so a worker that lost its
lease can no longer change the job: its write touches no row and it learns that it must stop.
Transactions are short and never span network I/O.

Webhook messages are written by the same transaction as the change that causes them (the outbox,
`outbox.py`): the claim writes `started`, a progress update `progress` (at most 2 a second), and
every move to a terminal status `completed`, each when the job's `webhook_events` asks.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import random
import sqlite3
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BindParameter,
    ColumnElement,
    Double,
    Integer,
    LargeBinary,
    Select,
    String,
    Text,
    Update,
    and_,
    any_,
    bindparam,
    cast,
    delete,
    exists,
    func,
    insert,
    literal_column,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncConnection

from a1111_proxy.db.engine import Database
from a1111_proxy.db.sqlite_driver import Prepared, named_rows, on_connection_thread, positional
from a1111_proxy.db.tables import job_images, job_payloads, job_previews, jobs
from a1111_proxy.deliveries import DeliveryRepository
from a1111_proxy.jobs.clauses import (
    NO_LEASE,
    QUEUE_ORDER,
    QUEUED,
    WEBHOOK_COLUMNS,
    cancel_error,
    not_expired,
)
from a1111_proxy.jobs.outbox import announce, announces, announcing
from a1111_proxy.jobs.placement import (
    Slots,
    idle_backends,
    idle_slots,
    idle_slots_sqlite,
    place,
)
from a1111_proxy.jobs.records import JOB_COLUMNS, AnyRow, Claim, claim_record
from a1111_proxy.redaction import backend_name
from a1111_proxy.wakeup import DUE, PROGRESS_CHANNEL, notify, notifying

# The job's A1111 body, read in the claim's own UPDATE ... RETURNING (one statement less).
_PAYLOAD = (
    select(job_payloads.c.body)
    .where(job_payloads.c.job_seq == jobs.c.seq)
    .correlate(jobs)
    .scalar_subquery()
    .label("payload")
)


# The statements of the hot path (a claim, a result stored) are built once, with their values
# bound at each run: building one and its cache key costs more than running it on SQLite.
_NOW: BindParameter[float] = bindparam("b_now", type_=Double)
_WAITING = and_(QUEUED, jobs.c.run_after <= _NOW, not_expired(_NOW))
_FENCED = and_(
    jobs.c.seq == bindparam("b_seq"),
    jobs.c.lease_token == bindparam("b_token"),
    jobs.c.status == "processing",
)
_INSERT_IMAGES = insert(job_images)
_SEQS = ARRAY(Integer)
_NAMES: BindParameter[Any] = bindparam("b_names", type_=ARRAY(Text))
_BACKEND: BindParameter[Any] = bindparam("b_backend", type_=String)


@functools.cache
def _claim_statement(slots: int) -> Update:
    """SQLite (PostgreSQL: _claim_placed_statement): lease up to `slots` due jobs in queue
    order, returning what the worker needs of them. Binds: now, owner, prefix (of the lease
    tokens), expires, and backend for one slot (one slot, the usual case: a slot freed alone,
    needs no placing afterwards)."""
    return _lease(_due(_WAITING, slots), postgres=False, backend=_BACKEND if slots == 1 else None)


@functools.cache
def _claim_prepared(slots: int) -> Prepared:
    return positional(_claim_statement(slots))


@functools.cache
def _move_prepared() -> Prepared:
    """Store a claimed job's backend (its slot chosen after the lease). Binds: s, b."""
    moved = update(jobs).where(jobs.c.seq == bindparam("s")).values(backend=bindparam("b"))
    return positional(moved, ("backend",))


@functools.cache
def _complete_prepared(status: str) -> Prepared:
    return positional(_complete_statement(status, False))


@functools.cache
def _images_prepared() -> Prepared:
    images = positional(_INSERT_IMAGES, ("job_seq", "n", "data"))
    assert images.names == ("job_seq", "n", "data")
    return images


@functools.cache
def _touch_prepared(progress: bool) -> Prepared:
    return positional(_touch_statement(progress, False))


@functools.cache
def _claim_placed_statement(alone: bool) -> Any:
    """PostgreSQL, one statement for all of a claim: lock the backends among the bound names
    that are idle (placement.idle_backends, which looks again under the locks), lease as many
    due jobs in queue order as there are, and give the k-th job the k-th of those backends in
    the order of the names (what place() does when no slot has a job's checkpoint). `alone`:
    the statement is its own transaction (autocommit), so it also queues the claimed jobs'
    `started` webhook messages (outbox.announcing). Binds: names, owner, now, prefix,
    expires."""
    idle = idle_backends(_NAMES, bindparam("b_owner", type_=Text))
    room = select(func.count()).select_from(idle).scalar_subquery()
    due = (
        select(jobs.c.seq, jobs.c.priority, jobs.c.turn)
        .where(_WAITING)
        .order_by(*QUEUE_ORDER)
        .limit(room)  # no more jobs locked than backends: none held for nothing
        .with_for_update(skip_locked=True)
        .cte("due")
    )
    rank = func.row_number().over(order_by=(due.c.priority.desc(), due.c.turn, due.c.seq))
    # Materialized: ranked once, not once for each job it gives a backend.
    ranked = select(due.c.seq, rank.label("n")).cte("ranked").prefix_with("MATERIALIZED")
    backend = (
        select(idle.c.name)
        .where(idle.c.n == ranked.c.n, ranked.c.seq == jobs.c.seq)
        .scalar_subquery()
    )
    if not alone:
        return _lease(due, postgres=True, backend=backend)
    # The snapshot's columns too, for the messages.
    claimed = _lease(due, postgres=True, backend=backend, snapshot=True).cte("claimed")
    ctes, told = announcing(claimed, "started", _NOW)
    returned = [claimed.c[c.key] for c in _CLAIMED]
    returned += [claimed.c.payload, claimed.c.more_queued]
    return select(*returned, *told).add_cte(*ctes)


@functools.cache
def _batch_claim_statement(size: int, keyed: bool, postgres: bool) -> Update:
    """Lease the first due job and up to `size - 1` more due jobs with its batch key, in queue
    order, for one slot that runs them as one batch; `keyed`: up to `size` due jobs with the
    bound batch key (a batch topped up). Binds as _claim_statement, and key when keyed."""
    if keyed:
        together = jobs.c.batch_key == bindparam("b_key", type_=String)
    else:
        head = _due(_WAITING, 1, jobs.c.batch_key, name="head")
        together = or_(
            jobs.c.seq == select(head.c.seq).scalar_subquery(),
            jobs.c.batch_key == select(head.c.batch_key).scalar_subquery(),
        )
    return _lease(_due(and_(_WAITING, together), size), postgres=postgres, backend=_BACKEND)


def _due(where: ColumnElement[bool], limit: int, *columns: Any, name: str = "due") -> Any:
    return (
        select(jobs.c.seq, *columns)
        .where(where)
        .order_by(*QUEUE_ORDER)
        # Written into the SQL (a few distinct statements): PostgreSQL's generic plan of a
        # bound LIMIT expects many rows and joins them by scanning the whole table.
        .limit(literal_column(str(limit), Integer))
        .with_for_update(skip_locked=True)
        .cte(name)
    )


# What a claim returns of each job it leased (payload and more_queued besides).
_CLAIMED = (
    jobs.c.id,
    jobs.c.type,
    jobs.c.attempts,
    jobs.c.max_attempts,
    jobs.c.checkpoint,
    jobs.c.priority,
    jobs.c.turn,
    jobs.c.lease_token,
    jobs.c.batch_key,
    jobs.c.backend,
    *WEBHOOK_COLUMNS,
)
_SNAPSHOT = tuple(c for c in JOB_COLUMNS if c.key not in {c.key for c in _CLAIMED})


def _lease(due: Any, *, postgres: bool, backend: Any, snapshot: bool = False) -> Update:
    """The UPDATE that leases `due`'s jobs; `backend`: what to store as their backend (None:
    placed afterwards); `snapshot`: return all of JOB_COLUMNS too."""
    # Whether more jobs wait than this claim takes: the worker then claims a slot's next job
    # the moment its backend answers, and otherwise stores the result first
    # (worker/loop.py). Read by the same statement (its snapshot: jobs that other claims
    # are taking at this moment count as waiting; a hint, not a promise).
    # In queue order with a limit, so the look walks the queue index and stops at the first.
    beyond = (
        select(jobs.c.seq)
        .where(_WAITING, jobs.c.seq.not_in(select(due.c.seq)))
        .order_by(*QUEUE_ORDER)
        .limit(1)
    )
    more = exists(beyond)
    taken = and_(jobs.c.seq == due.c.seq, QUEUED)
    if postgres:
        # By primary key alone, whatever the statistics say: a table whose queue grew since
        # its last ANALYZE looks nearly empty to the planner, which then walks every queued
        # row (once for each row of the CTE, with a join). The rows are queued: the CTE's FOR
        # UPDATE took them queued in their latest version, and holds them.
        taken = jobs.c.seq == any_(func.array(select(due.c.seq).scalar_subquery(), type_=_SEQS))
    return (
        update(jobs)
        # A CTE, so PostgreSQL evaluates the LIMITed, locked select exactly once.
        .where(taken)
        .values(
            status="processing",
            attempts=jobs.c.attempts + 1,
            lease_owner=bindparam("b_owner"),
            lease_token=bindparam("b_prefix", type_=String) + cast(jobs.c.seq, String),
            lease_expires_at=bindparam("b_expires", type_=Double),
            progress=0.0,
            eta_relative=None,
            started_at=func.coalesce(jobs.c.started_at, _NOW),
            updated_at=_NOW,
            **({"backend": backend} if backend is not None else {}),
        )
        .returning(
            *_CLAIMED,
            *(_SNAPSHOT if snapshot else ()),
            _PAYLOAD,
            more.label("more_queued"),
        )
    )


@functools.cache
def _complete_statement(status: str, notify: bool) -> Update:
    """End the lease holder's job `status` (completed, or canceled with a partial answer),
    storing the answer; `completed` only while no cancel was asked for; `notify`
    (PostgreSQL): NOTIFY the waiters in the same statement. Binds: seq, token, now, result,
    image_count, error."""
    fenced = _FENCED
    if status == "completed":
        fenced = and_(fenced, jobs.c.cancel_requested_at.is_(None))
    error = bindparam("b_error", type_=String)
    return (
        update(jobs)
        .where(fenced)
        .values(
            status=status,
            result=bindparam("b_result"),
            image_count=bindparam("b_image_count"),
            progress=1.0 if status == "completed" else jobs.c.progress,
            eta_relative=0.0,
            error=cancel_error(error) if status == "canceled" else error,
            completed_at=_NOW,
            updated_at=_NOW,
            **NO_LEASE,
        )
        .returning(*WEBHOOK_COLUMNS, *(notifying() if notify else ()))
    )


@functools.cache
def _complete_alone_statement(status: str) -> Select[Any]:
    """PostgreSQL: _complete_statement and the images' INSERT in one statement. Binds as
    _complete_statement, and ns and images: the images' numbers and bytes, as arrays."""
    done = _complete_statement(status, True).cte("done")
    given = (
        func.unnest(
            bindparam("b_ns", type_=ARRAY(Integer)), bindparam("b_images", type_=ARRAY(LargeBinary))
        )
        .table_valued("n", "data")
        .render_derived(name="given")
    )
    images = insert(job_images).from_select(
        ["job_seq", "n", "data"],
        # Each image beside the one row done returns (none when the fence stopped it).
        select(done.c.seq, given.c.n, given.c.data).select_from(done.join(given, true())),
    )
    return select(done.c.seq).add_cte(images.cte("images"))


# What was asked of a running job from outside its lease (Touch).
_ASKED = (
    jobs.c.cancel_requested_at,
    jobs.c.skip_requested_at,
    jobs.c.preview_wanted_until,
    jobs.c.progress_wanted_until,
)
ASK_WINDOW_SECONDS = 0.005  # the looks at running jobs' asks that one read answers
# What was asked of running jobs, by seq (binds b_seqs): each row's lease is checked against
# its claim's token by _held.
_ASKED_OF = select(jobs.c.seq, jobs.c.lease_token, *_ASKED).where(
    jobs.c.seq.in_(bindparam("b_seqs", expanding=True)), jobs.c.status == "processing"
)


def _held(row: AnyRow | None, token: str) -> AnyRow | None:
    """`row` if the lease `token` holds it (the fence of _FENCED), else None."""
    return row if row is not None and row.lease_token == token else None


@functools.cache
def _touch_statement(progress: bool, notify: bool) -> Update:
    """Renew the lease holder's lease (with `progress`: store progress and ETA), returning what
    was asked of the job; `notify` (PostgreSQL): NOTIFY PROGRESS_CHANNEL in the same statement.
    Binds: seq, token, now, expires, and progress and eta with `progress`."""
    values: dict[str, Any] = {
        "lease_expires_at": bindparam("b_expires", type_=Double),
        "updated_at": _NOW,
    }
    if progress:
        values["progress"] = bindparam("b_progress", type_=Double)
        values["eta_relative"] = bindparam("b_eta", type_=Double)
    told = notifying(PROGRESS_CHANNEL) if notify else []
    returned = (*_ASKED, *WEBHOOK_COLUMNS, *told)
    return update(jobs).where(_FENCED).values(**values).returning(*returned)


def _in_queue_order(rows: Sequence[AnyRow]) -> list[AnyRow]:
    return sorted(rows, key=lambda r: (-r.priority, r.turn, r.seq))


def _claim(row: AnyRow, backend: str) -> Claim:
    """A claimed row as the worker's claim of it on `backend`."""
    return claim_record(
        row,
        backend,
        more_queued=bool(row.more_queued),
        progress_webhook=announces(row, "progress"),
        end_webhook=announces(row, "completed"),
    )


@dataclass(frozen=True, slots=True)
class Touch:
    alive: bool  # False: the lease is lost, stop and touch nothing
    cancel_requested: bool
    skip_requested: bool = False
    preview_wanted: bool = False  # someone looks at its live preview now
    progress_wanted: bool = False  # someone looks at its progress now (or its preview)


def retry_delay(attempt: int, rng: Callable[[], float] = random.random) -> float:
    """Durable backoff before attempt `attempt + 1`: about 2 s, 8 s, 32 s, capped at 60 s."""
    base = min(60.0, 2.0 * 4.0 ** max(0, attempt - 1))
    return base * (0.8 + 0.4 * rng())


class JobMachine:
    def __init__(
        self,
        db: Database,
        deliveries: DeliveryRepository,
        *,
        lease_seconds: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.deliveries = deliveries
        self.lease_seconds = lease_seconds
        self.clock = clock
        self._asking: dict[tuple[int, str], list[asyncio.Future[Touch]]] | None = None
        self._reading: set[asyncio.Task[None]] = set()

    # --- the claim ---------------------------------------------------------------------------

    async def claim(
        self, owner: str, slots: Slots, *, batch: int = 1, key: str | None = None
    ) -> list[tuple[int, Claim]]:
        """Lease up to one due job per free slot (highest priority, then turn: owners take
        turns, then oldest) to `owner`.

        `slots` are (backend name, checkpoint it last ran). A backend runs one job at a time
        across all workers: a slot whose backend already runs a job (for any worker) gets none,
        so several workers can share the same A1111_URLS. A job goes to a slot that last ran its
        checkpoint when there is one, else to the first free slot. One short transaction
        claims, assigns and reads the payloads. Returns (slot index, claim) pairs. A backend
        is stored (and compared) by the name shown to people: its URL without credentials.

        `batch` > 1 (one slot, a backend that batches): the first due job and up to `batch - 1`
        more with its batch key, all for that slot, each with its own lease; with `key`, up to
        `batch` due jobs with that batch key (a batch topped up).
        """
        assert batch == 1 or len(slots) == 1, "a batch claim is for one slot"
        slots = [(backend_name(name), checkpoint) for name, checkpoint in slots]
        now = self.clock()
        if batch == 1:
            if self.db.is_sqlite:
                return await self._claim_in_one_trip(owner, slots, now)
            return await self._claim_placed(owner, slots, now)
        async with self.db.writing() as conn:
            open_slots = await idle_slots(self.db, conn, owner, slots)
            if not open_slots:
                return []
            claimed = await self._claim_in(
                conn, owner, [slots[i] for i in open_slots], now, batch, key
            )
        return [(open_slots[index], claim) for index, claim in claimed]

    def _lease_values(self, owner: str, now: float) -> dict[str, Any]:
        # One random prefix per claim plus the job's seq: a token no other claim ever had.
        return {
            "b_now": now,
            "b_owner": owner,
            "b_prefix": uuid.uuid4().hex[:16] + ":",
            "b_expires": now + self.lease_seconds,
        }

    async def _claim_in_one_trip(
        self, owner: str, slots: Slots, now: float
    ) -> list[tuple[int, Claim]]:
        """SQLite: BEGIN IMMEDIATE, the look at which backends are idle, the lease, the placing
        and COMMIT in one round trip to the connection's thread, with sqlite3 itself
        (SQLAlchemy's work for each of four statements cost more than the statements). Jobs
        that asked for a `started` webhook message have it queued before the commit."""
        values = self._lease_values(owner, now)

        def lease(connection: sqlite3.Connection) -> list[tuple[int, AnyRow]]:
            open_slots = idle_slots_sqlite(connection, owner, slots)
            if not open_slots:
                return []
            given = [slots[i] for i in open_slots]
            leasing = _claim_prepared(len(given))
            found = connection.execute(leasing.sql, leasing.args(**values, b_backend=given[0][0]))
            rows = _in_queue_order(named_rows(found))
            placed = [(0, row) for row in rows] if len(given) == 1 else place(rows, given)
            if len(given) > 1:  # the statement stored no backend
                moving = _move_prepared()
                moves = [moving.args(s=row.seq, b=given[i][0]) for i, row in placed]
                connection.executemany(moving.sql, moves)
            return [(open_slots[i], row) for i, row in placed]

        def unannounced(placed: list[tuple[int, AnyRow]]) -> bool:
            return not any(announces(row, "started") for _, row in placed)

        async with self.db.writing() as conn:
            placed = await on_connection_thread(conn, lease, commit=unannounced)
            if not unannounced(placed):
                for _, row in placed:
                    await announce(self.deliveries, conn, row, "started", now)
        return [(index, _claim(row, slots[index][0])) for index, row in placed]

    async def _claim_placed(self, owner: str, slots: Slots, now: float) -> list[tuple[int, Claim]]:
        """PostgreSQL: the whole claim in one statement (_claim_placed_statement). Where no
        job could go to another of the backends it finds idle (the slots last ran the same
        checkpoint, or none), that statement is its own transaction, in autocommit: one round
        trip, where BEGIN and COMMIT made three. Otherwise a second statement in the same
        transaction moves a job to a slot that last ran its checkpoint."""
        first: dict[str, int] = {}  # a URL listed twice is still one backend
        for index, (name, _) in enumerate(slots):
            first.setdefault(name, index)
        values = {**self._lease_values(owner, now), "b_names": list(first)}
        if len({checkpoint for _, checkpoint in slots}) == 1:
            async with self.db.writing_alone() as conn:
                claimed = await conn.execute(_claim_placed_statement(True), values)
                rows = _in_queue_order(claimed.all())
            return [(first[row.backend], _claim(row, row.backend)) for row in rows]
        async with self.db.writing() as conn:
            claimed = await conn.execute(_claim_placed_statement(False), values)
            rows = _in_queue_order(claimed.all())
            if not rows:
                return []
            given = [first[row.backend] for row in rows]
            placed = [(given[i], row) for i, row in place(rows, [slots[i] for i in given])]
            return await self._claimed(conn, slots, placed, now, stored=given)

    async def _claim_in(
        self,
        conn: AsyncConnection,
        owner: str,
        slots: Slots,
        now: float,
        batch: int = 1,
        key: str | None = None,
    ) -> list[tuple[int, Claim]]:
        values = {**self._lease_values(owner, now), "b_backend": slots[0][0]}
        if batch > 1:
            values["b_key"] = key
            statement = _batch_claim_statement(batch, key is not None, not self.db.is_sqlite)
        else:
            statement = _claim_statement(len(slots))
        rows = _in_queue_order((await conn.execute(statement, values)).all())
        if not rows:
            return []
        placed = [(0, row) for row in rows] if batch > 1 else place(rows, slots)
        # The statement stores the backend of a claim for one slot only.
        stored = [0 if len(slots) == 1 else None for _ in placed]
        return await self._claimed(conn, slots, placed, now, stored=stored)

    async def _claimed(
        self,
        conn: AsyncConnection,
        slots: Slots,
        placed: list[tuple[int, AnyRow]],
        now: float,
        *,
        stored: Sequence[int | None],
    ) -> list[tuple[int, Claim]]:
        """The claimed rows (`placed`: each with its slot, in queue order) as the worker's
        claims: each one's backend stored where the claim stored another or none (`stored`:
        the slot whose backend it stored for each), its `started` webhook message queued."""
        rows = [row for _, row in placed]
        moved = [
            {"s": row.seq, "b": slots[index][0]}
            for (index, row), before in zip(placed, stored, strict=True)
            if before != index
        ]
        if moved:
            await conn.execute(
                update(jobs).where(jobs.c.seq == bindparam("s")).values(backend=bindparam("b")),
                moved,
            )
        announced = [await announce(self.deliveries, conn, row, "started", now) for row in rows]
        if any(announced):
            await notify(self.db, conn)
        return [(index, _claim(row, slots[index][0])) for index, row in placed]

    # --- the lease holder's writes, each fenced by its token ---------------------------------

    def _fenced(self, claim: Claim) -> ColumnElement[bool]:
        return and_(
            jobs.c.seq == claim.seq,
            jobs.c.lease_token == claim.token,
            jobs.c.status == "processing",
        )

    async def touch(
        self,
        claim: Claim,
        *,
        progress: float | None = None,
        eta: float | None = None,
        preview: str | None = None,
    ) -> Touch:
        """Renew the lease (and store progress and the live preview); learn whether a cancel
        or a skip was asked for, and whether someone looks at the live preview. Progress
        alone, of a job without progress webhooks, is one statement (on PostgreSQL one round
        trip, its NOTIFY included)."""
        now = self.clock()
        values: dict[str, Any] = {
            "b_seq": claim.seq,
            "b_token": claim.token,
            "b_now": now,
            "b_expires": now + self.lease_seconds,
        }
        if progress is not None:
            values["b_progress"] = max(0.0, min(1.0, progress))
            values["b_eta"] = eta
        told = progress is not None or preview is not None
        statement = _touch_statement(progress is not None, told and not self.db.is_sqlite)
        if preview is None and not claim.progress_webhook:
            if self.db.is_sqlite:
                return _touch(await self._touch_in_one_trip(progress is not None, values), now)
            async with self.db.writing_alone() as conn:
                return _touch((await conn.execute(statement, values)).one_or_none(), now)
        async with self.db.writing() as conn:
            row = (await conn.execute(statement, values)).one_or_none()
            if row is not None and progress is not None:
                if await announce(self.deliveries, conn, row, "progress", now):
                    await notify(self.db, conn)
            if row is not None and preview is not None:
                await conn.execute(delete(job_previews).where(job_previews.c.job_seq == claim.seq))
                await conn.execute(
                    insert(job_previews).values(job_seq=claim.seq, image=preview, updated_at=now)
                )
        return _touch(row, now)

    async def _touch_in_one_trip(self, progress: bool, values: dict[str, Any]) -> AnyRow | None:
        """SQLite: the touch's statement and COMMIT in one round trip, with sqlite3 itself."""
        touching = _touch_prepared(progress)

        def touch(connection: sqlite3.Connection) -> AnyRow | None:
            found: list[AnyRow] = named_rows(
                connection.execute(touching.sql, touching.args(**values))
            )
            return found[0] if found else None

        async with self.db.writing() as conn:
            return await on_connection_thread(conn, touch, commit=True)

    async def requests(self, claim: Claim) -> Touch:
        """A read-only look at what was asked of a running job (cancel, skip, a watcher).

        The looks of one moment (a worker's jobs tick together) are one read: each caller
        waits for the read that the first of them starts ASK_WINDOW_SECONDS later (their
        timers, set a few microseconds apart, may fire in different turns of the loop)."""
        if self._asking is None:
            self._asking = {}
            asyncio.get_running_loop().call_later(ASK_WINDOW_SECONDS, self._start_asking)
        waiter: asyncio.Future[Touch] = asyncio.get_running_loop().create_future()
        self._asking.setdefault((claim.seq, claim.token), []).append(waiter)
        return await waiter

    def _start_asking(self) -> None:
        asking, self._asking = self._asking or {}, None
        reading = asyncio.create_task(self._answer(asking))
        self._reading.add(reading)
        reading.add_done_callback(self._reading.discard)

    async def _answer(self, asking: dict[tuple[int, str], list[asyncio.Future[Touch]]]) -> None:
        waiting = list(itertools.chain.from_iterable(asking.values()))
        try:
            touches = await self._requests_of(list(asking))
        except asyncio.CancelledError:
            for waiter in waiting:
                waiter.cancel()
            raise
        except Exception as exc:  # each caller gets the read's failure, as its own would
            for waiter in waiting:
                if not waiter.done():
                    waiter.set_exception(exc)
            return
        for lease, waiters in asking.items():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(touches[lease])

    async def _requests_of(self, leases: list[tuple[int, str]]) -> dict[tuple[int, str], Touch]:
        """What was asked of each leased job (seq, lease token), in one read; a job whose
        lease is another's (or that is no longer processing) is not alive."""
        seqs = sorted({seq for seq, _ in leases})
        async with self.db.reading() as conn:
            rows = {row.seq: row for row in await conn.execute(_ASKED_OF, {"b_seqs": seqs})}
        now = self.clock()
        return {lease: _touch(_held(rows.get(lease[0]), lease[1]), now) for lease in leases}

    async def clear_skip(self, claim: Claim) -> None:
        stmt = update(jobs).where(self._fenced(claim)).values(skip_requested_at=None)
        async with self.db.writing() as conn:
            await conn.execute(stmt)

    async def complete(
        self,
        claim: Claim,
        result: Any,
        images: list[bytes],
        *,
        status: str = "completed",
        error: str | None = None,
    ) -> bool:
        """Store the backend's answer (its images apart, in `images`) and end the job
        `completed` (or `canceled` with the partial answer A1111 gave on interrupt).
        False: nothing was written, because the lease was lost or (for `completed`) a cancel
        was asked for meanwhile; `requests()` tells which."""
        now = self.clock()
        values = {
            "b_seq": claim.seq,
            "b_token": claim.token,
            "b_now": now,
            "b_result": json.dumps(result),
            "b_image_count": len(images),
            "b_error": error,
        }
        if self.db.is_sqlite:
            return await self._complete_in_one_trip(claim, values, images, status, now)
        if not claim.end_webhook:
            # One statement, its images and NOTIFY included: one round trip, not four.
            values["b_ns"] = list(range(len(images)))
            values["b_images"] = images
            async with self.db.writing_alone() as conn:
                stored = await conn.execute(_complete_alone_statement(status), values)
                return stored.one_or_none() is not None
        async with self.db.writing() as conn:
            statement = _complete_statement(status, not self.db.is_sqlite)
            done = (await conn.execute(statement, values)).one_or_none()
            if done is None:
                return False  # nothing was written
            # A job's images are written here only, once: the fence lets one write through.
            if images:
                await conn.execute(
                    _INSERT_IMAGES,
                    [{"job_seq": claim.seq, "n": n, "data": data} for n, data in enumerate(images)],
                )
            await announce(self.deliveries, conn, done, "completed", now)
        return True

    async def _complete_in_one_trip(
        self, claim: Claim, values: dict[str, Any], images: list[bytes], status: str, now: float
    ) -> bool:
        """SQLite: complete() in one round trip to the connection's thread, its images and
        COMMIT included (the `completed` webhook message, when asked for, before the commit)."""
        ending = _complete_prepared(status)

        def store(connection: sqlite3.Connection) -> AnyRow | None:
            ended: list[AnyRow] = named_rows(connection.execute(ending.sql, ending.args(**values)))
            if not ended:
                return None  # nothing was written
            # A job's images are written here only, once: the fence lets one write through.
            rows = [(claim.seq, n, data) for n, data in enumerate(images)]
            connection.executemany(_images_prepared().sql, rows)
            return ended[0]

        def unannounced(done: AnyRow | None) -> bool:
            return done is None or not announces(done, "completed")

        async with self.db.writing() as conn:
            done = await on_connection_thread(conn, store, commit=unannounced)
            if done is not None and not unannounced(done):
                await announce(self.deliveries, conn, done, "completed", now)
        return done is not None

    async def finish(self, claim: Claim, status: str, error: str | None) -> bool:
        """End the job `error` or `canceled`. False: the lease was lost."""
        assert status in ("error", "canceled")
        now = self.clock()
        stmt = (
            update(jobs)
            .where(self._fenced(claim))
            .values(
                status=status,
                error=cancel_error(error) if status == "canceled" else error,
                completed_at=now,
                updated_at=now,
                **NO_LEASE,
            )
            .returning(*WEBHOOK_COLUMNS)
        )
        async with self.db.writing() as conn:
            ended = (await conn.execute(stmt)).one_or_none()
            if ended is not None:
                await announce(self.deliveries, conn, ended, "completed", now)
            await notify(self.db, conn)
        return ended is not None

    async def requeue(self, claim: Claim, delay: float, error: str | None) -> bool:
        """Put the job back in the queue to run again after `delay` seconds (durable backoff)."""
        now = self.clock()
        return await self._back_to_queue(claim, now, run_after=now + delay, error=error)

    async def release(self, claim: Claim) -> bool:
        """Give the job back at once without counting the attempt (graceful shutdown)."""
        now = self.clock()
        return await self._back_to_queue(claim, now, run_after=now, attempts=jobs.c.attempts - 1)

    async def _back_to_queue(self, claim: Claim, now: float, **values: Any) -> bool:
        """The claim's job queued again (fenced: only while this lease holds it)."""
        stmt = (
            update(jobs)
            .where(self._fenced(claim))
            .values(
                status="queued",
                progress=0.0,
                eta_relative=None,
                updated_at=now,
                **NO_LEASE,
                **values,
            )
        )
        async with self.db.writing() as conn:
            done = (await conn.execute(stmt)).rowcount == 1
            await notify(self.db, conn, *DUE)
        return done


def _touch(row: AnyRow | None, now: float) -> Touch:
    if row is None:
        return Touch(alive=False, cancel_requested=False)
    return Touch(
        alive=True,
        cancel_requested=row.cancel_requested_at is not None,
        skip_requested=row.skip_requested_at is not None,
        preview_wanted=(row.preview_wanted_until or 0.0) > now,
        progress_wanted=(row.progress_wanted_until or 0.0) > now,
    )
