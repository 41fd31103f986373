"""JobIntake: storing new jobs, always `queued` (machine.py and control.py move them on).

Submits without an idempotency key are committed in groups: each request still waits for its
own commit, but concurrent requests share one transaction. A job that names no checkpoint
takes the default one (POST /options) read as it is stored (catalogue.py owns it).

On SQLite a group's tenant limits, turns, jobs and payloads are read and stored in one round
trip to the connection's thread, with statements sqlite3 keeps prepared (`_store_sqlite`); each
job's record is made from the values stored rather than read back. On PostgreSQL the defaults
are read first, then the group's turns, jobs, payloads and NOTIFY are one statement in
autocommit (`_store_postgresql`, its values bound as one array per column): two round trips for
any number of jobs, and with tenant limits on, their reads (two per tenant) before them. The
statements are compiled from the same table definitions.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

from sqlalchemy import ARRAY, Select, Text, and_, bindparam, func, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from a1111_proxy.catalogue import CatalogueStore, SubmitDefaults, submit_defaults_sqlite
from a1111_proxy.db.engine import Database
from a1111_proxy.db.sqlite_driver import Prepared, on_connection_thread, positional
from a1111_proxy.db.tables import job_payloads, jobs
from a1111_proxy.errors import IdempotencyKeyReused, TenantLimitReached
from a1111_proxy.jobs.records import GENERATIONS, JOB_COLUMNS, JobRecord, job_record, stored_record
from a1111_proxy.jobs.turns import assign_turns_sqlite, first_turns
from a1111_proxy.wakeup import DUE

BATCH = 256  # jobs committed in one transaction at most
# (type, body, checkpoint) -> the job's batch key (engine/compat.py), or None: it runs alone.
BatchKey = Callable[[str, dict[str, Any], str | None], str | None]
# A full queue has no known time at which it frees a place; a few seconds keeps clients polite.
QUEUE_FULL_RETRY_SECONDS = 5


@dataclass(frozen=True)
class NewJob:
    type: str
    request: str  # the stored body shown to users (input images and secrets removed), JSON
    payload: str  # the full body the backend receives, JSON
    priority: int = 0
    webhook_url: str | None = None
    webhook_secret: str | None = None
    webhook_events: str | None = None
    idempotency_key: str | None = None
    request_hash: str | None = None
    checkpoint: str | None = None  # override_settings.sd_model_checkpoint, if the body has one
    timeout: float | None = None  # seconds from submission until the job is canceled ("deadline")
    owner: str | None = None  # the tenant that submitted it (token name or client address)


@dataclass(frozen=True)
class TenantLimits:
    """Per-tenant limits (TENANT_MAX_QUEUED, TENANT_SUBMITS_PER_MINUTE); 0 is no limit."""

    max_queued: int = 0
    per_minute: int = 0

    @property
    def on(self) -> bool:
        return bool(self.max_queued or self.per_minute)


NO_LIMITS = TenantLimits()


@dataclass
class Usage:
    """One tenant's use of its limits, as read in the submit's transaction."""

    queued: int
    recent: list[float]  # created_at of its latest submits within the last 60 s, oldest first

    def refusal(self, limits: TenantLimits, now: float) -> TenantLimitReached | None:
        if limits.max_queued and self.queued >= limits.max_queued:
            return TenantLimitReached(
                f"This tenant already has {self.queued} queued jobs, the most "
                "A1111_PROXY_TENANT_MAX_QUEUED allows: wait for some to start, or cancel some.",
                retry_after=QUEUE_FULL_RETRY_SECONDS,
            )
        window = [at for at in self.recent if at > now - 60]
        if limits.per_minute and len(window) >= limits.per_minute:
            return TenantLimitReached(
                f"This tenant submitted {len(window)} jobs in the last minute, the most "
                "A1111_PROXY_TENANT_SUBMITS_PER_MINUTE allows: retry after Retry-After seconds.",
                retry_after=window[-limits.per_minute] + 60 - now,
            )
        return None

    def admit(self, now: float) -> None:
        self.queued += 1
        self.recent.append(now)


@dataclass(frozen=True, slots=True)
class Submitted:
    job: JobRecord
    replayed: bool


class JobIntake:
    def __init__(
        self,
        db: Database,
        catalogue: CatalogueStore,
        *,
        max_attempts: int = 3,
        limits: TenantLimits = NO_LIMITS,
        batch_key: BatchKey | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.catalogue = catalogue
        self.batch_key = batch_key
        self.max_attempts = max_attempts
        self.limits = limits
        self.clock = clock
        self._batch: list[tuple[NewJob, asyncio.Future[JobRecord]]] = []
        self._batch_task: asyncio.Task[None] | None = None

    async def submit(self, new: NewJob) -> Submitted:
        """Store a new job durably; return once it is committed."""
        if new.idempotency_key is not None:
            return await self._submit_idempotent(new)
        future: asyncio.Future[JobRecord] = asyncio.get_running_loop().create_future()
        self._batch.append((new, future))
        if self._batch_task is None or self._batch_task.done():
            self._batch_task = asyncio.create_task(self._drain_batches())
        return Submitted(await future, replayed=False)

    async def _drain_batches(self) -> None:
        while self._batch:
            batch, self._batch = self._batch[:BATCH], self._batch[BATCH:]
            try:
                outcomes = await self._insert_many([new for new, _ in batch])
            except Exception as exc:  # every waiter hears about it; none is left hanging
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), outcome in zip(batch, outcomes, strict=True):
                if future.done():
                    continue
                if isinstance(outcome, TenantLimitReached):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)

    async def _insert_many(self, batch: Sequence[NewJob]) -> list[JobRecord | TenantLimitReached]:
        """Store the jobs that their tenants' limits admit, committed together; each of the
        others gets the TenantLimitReached that refused it."""
        now = self.clock()
        if self.db.is_sqlite:
            return await self._insert_in_one_trip(batch, now)
        if not self.limits.on:
            return list(await self._insert_in_one_statement(batch, now))
        # PostgreSQL: the limits are read just before the store. This process stores one group
        # at a time, so each group's reads see the groups before it; API processes that store
        # at the same moment may each admit a tenant's last place (as in one READ COMMITTED
        # transaction: neither would see the other's uncommitted jobs).
        async with self.db.reading() as conn:
            used = {owner: await self._usage(conn, owner, now) for owner in _tenants(batch)}
        refused = self._refused(batch, used, now)
        admitted = [new for index, new in enumerate(batch) if index not in refused]
        stored = iter(await self._insert_in_one_statement(admitted, now) if admitted else [])
        return [refused[index] if index in refused else next(stored) for index in range(len(batch))]

    async def _insert_in_one_trip(
        self, batch: Sequence[NewJob], now: float
    ) -> list[JobRecord | TenantLimitReached]:
        """SQLite: BEGIN IMMEDIATE, the tenants' use of their limits, the defaults read, the
        turns, the inserts and COMMIT in one round trip to the connection's thread."""
        refused: dict[int, TenantLimitReached] = {}
        rows: list[dict[str, Any]] = []

        def store(connection: sqlite3.Connection) -> None:
            if self.limits.on:
                used = {o: self._usage_sqlite(connection, o, now) for o in _tenants(batch)}
                refused.update(self._refused(batch, used, now))
            admitted = [new for index, new in enumerate(batch) if index not in refused]
            rows.extend(self._job_values(new, now) for new in admitted)
            payloads = [new.payload for new in admitted]
            if not rows:
                return
            defaults = None
            if any(row["type"] in GENERATIONS for row in rows):
                defaults = submit_defaults_sqlite(connection, _owners(rows))
            self._complete(rows, payloads, defaults)
            _store_sqlite(rows, payloads, connection)

        async with self.db.writing() as conn:
            await on_connection_thread(conn, store, commit=True)
        stored = iter([stored_record(row) for row in rows])
        return [refused[index] if index in refused else next(stored) for index in range(len(batch))]

    async def _insert_in_one_statement(
        self, batch: Sequence[NewJob], now: float
    ) -> list[JobRecord]:
        """PostgreSQL: the defaults read, then the turns, the inserts and the NOTIFY in one
        statement in autocommit (_store_postgresql): two round trips, where a transaction
        took seven."""
        rows = [self._job_values(new, now) for new in batch]
        payloads = [new.payload for new in batch]
        defaults = None
        if any(row["type"] in GENERATIONS for row in rows):
            async with self.db.reading() as conn:
                defaults = await self.catalogue.submit_defaults_in(conn, _owners(rows))
        self._complete(rows, payloads, defaults)
        columns = tuple(rows[0])
        values = {f"c_{name}": [row[name] for row in rows] for name in columns}
        values["c_payload"] = payloads
        async with self.db.writing_alone() as conn:
            stored = (await conn.execute(_store_postgresql(columns), values)).all()
        by_id = {row.id: row for row in stored}
        return [job_record(by_id[row["id"]]) for row in rows]

    def _refused(
        self, batch: Sequence[NewJob], used: dict[str | None, Usage], now: float
    ) -> dict[int, TenantLimitReached]:
        """Which of `batch` their tenant's limits refuse (by index), counting the jobs stored
        (`used`: each tenant's use, read in the transaction) and those admitted before them in
        the batch."""
        refused: dict[int, TenantLimitReached] = {}
        for index, new in enumerate(batch):
            usage = used[new.owner]
            reason = usage.refusal(self.limits, now)
            if reason is not None:
                refused[index] = reason
            else:
                usage.admit(now)
        return refused

    async def _usage(self, conn: AsyncConnection, owner: str | None, now: float) -> Usage:
        """The tenant's queued jobs (up to the limit) and the times of its latest submits (up
        to the rate): reads bounded by the limits, on the (owner, status) and (owner, seq)
        indexes."""
        queued = 0
        if self.limits.max_queued:
            query = _usage_query("queued", owner, self.limits.max_queued)
            queued = len((await conn.execute(query)).all())
        recent: list[float] = []
        if self.limits.per_minute:
            found = await conn.execute(_usage_query("recent", owner, self.limits.per_minute))
            recent = sorted(at for at in found.scalars() if at > now - 60)
        return Usage(queued, recent)

    def _usage_sqlite(self, connection: sqlite3.Connection, owner: str | None, now: float) -> Usage:
        """_usage with sqlite3 itself, on the connection's thread, in its transaction."""
        queued = 0
        if self.limits.max_queued:
            prepared = _usage_prepared("queued", owner is None, self.limits.max_queued)
            queued = len(connection.execute(prepared.sql, prepared.args(owner=owner)).fetchall())
        recent: list[float] = []
        if self.limits.per_minute:
            prepared = _usage_prepared("recent", owner is None, self.limits.per_minute)
            found = connection.execute(prepared.sql, prepared.args(owner=owner)).fetchall()
            recent = sorted(at for (at,) in found if at > now - 60)
        return Usage(queued, recent)

    async def _submit_idempotent(self, new: NewJob) -> Submitted:
        try:
            [row] = await self._insert_many([new])
            if isinstance(row, TenantLimitReached):
                raise row
            return Submitted(row, replayed=False)
        except (IntegrityError, sqlite3.IntegrityError):
            pass  # the key exists: replay the job it made, if the body is the same
        async with self.db.reading() as conn:
            existing = (
                await conn.execute(
                    select(*JOB_COLUMNS, jobs.c.request_hash).where(
                        jobs.c.idempotency_key == _tenant_key(new)
                    )
                )
            ).one_or_none()
        if existing is None:  # deleted between our insert and read: try once more
            [row] = await self._insert_many([new])
            if isinstance(row, TenantLimitReached):
                raise row
            return Submitted(row, replayed=False)
        if existing.request_hash != new.request_hash:
            raise IdempotencyKeyReused()
        return Submitted(job_record(existing), replayed=True)

    def _complete(
        self, rows: list[dict[str, Any]], payloads: list[str], defaults: SubmitDefaults | None
    ) -> None:
        """Give the generations among `rows` the defaults POST /options set (in `payloads`, in
        place) and their batch keys."""
        if defaults is not None:
            for index, row in enumerate(rows):
                payloads[index] = _with_defaults(row, payloads[index], defaults)
        if self.batch_key is not None:
            for row, payload in zip(rows, payloads, strict=True):
                if row["type"] in GENERATIONS:
                    row["batch_key"] = self.batch_key(
                        row["type"], json.loads(payload), row["checkpoint"]
                    )

    def _job_values(self, new: NewJob, now: float) -> dict[str, Any]:
        return {
            "id": str(uuid.uuid4()),
            "type": new.type,
            "status": "queued",
            "priority": new.priority,
            "request": new.request,
            "progress": 0.0,
            "attempts": 0,
            "image_count": 0,
            "max_attempts": self.max_attempts,
            "run_after": now,
            "idempotency_key": _tenant_key(new),
            "request_hash": new.request_hash,
            "webhook_url": new.webhook_url,
            "webhook_secret": new.webhook_secret,
            "webhook_events": new.webhook_events,
            "checkpoint": new.checkpoint,
            "created_at": now,
            "updated_at": now,
            "deadline_at": None if new.timeout is None else now + new.timeout,
            "owner": new.owner,
            "batch_key": None,
        }


def _store_sqlite(rows: list[dict[str, Any]], payloads: list[str], db: sqlite3.Connection) -> None:
    """On the connection's thread, in the open transaction: give the rows their turns, insert
    them and their payloads, and set each row's `seq`."""
    assign_turns_sqlite(db, rows)
    job, payload_of = _sqlite_inserts(tuple(rows[0]))
    cursor = db.cursor()
    for row, payload in zip(rows, payloads, strict=True):
        [(row["seq"],)] = cursor.execute(job.sql, [row[name] for name in job.names]).fetchall()
        cursor.execute(payload_of.sql, (row["seq"], payload))
    cursor.close()


@cache
def _sqlite_inserts(columns: tuple[str, ...]) -> tuple[Prepared, Prepared]:
    """The job INSERT setting `columns` (RETURNING its seq), and the payload INSERT."""
    payload = positional(insert(job_payloads), ("job_seq", "body"))
    assert payload.names == ("job_seq", "body")
    return positional(insert(jobs).returning(jobs.c.seq), columns), payload


@cache
def _store_postgresql(columns: tuple[str, ...]) -> Select[Any]:
    """PostgreSQL, one statement: insert jobs of `columns` (bound as one array each, c_NAME,
    in the order given; c_payload their payloads), each owner's jobs of a priority numbered on
    from that group's next turn (turns.first_turns), and their payloads; NOTIFY the channels
    of DUE. Returns the jobs' JOB_COLUMNS."""
    given = (
        func.unnest(
            *(bindparam(f"c_{name}", type_=ARRAY(jobs.c[name].type)) for name in columns),
            bindparam("c_payload", type_=ARRAY(Text)),
        )
        .table_valued(*columns, "payload", with_ordinality="n")
        .render_derived(name="given")
    )
    rows = select(given).cte("given")
    groups = select(rows.c.owner, rows.c.priority).distinct().cte("groups")
    turns = first_turns(groups)
    order = func.row_number().over(partition_by=(rows.c.owner, rows.c.priority), order_by=rows.c.n)
    group = and_(
        turns.c.owner.is_not_distinct_from(rows.c.owner), turns.c.priority == rows.c.priority
    )
    numbered = (
        select(*(rows.c[name] for name in columns), turns.c.turn + order - 1)
        .select_from(rows.join(turns, group))
        .order_by(rows.c.n)
    )
    inserted = (
        insert(jobs)
        .from_select([*columns, "turn"], numbered)
        .returning(*JOB_COLUMNS)
        .cte("inserted")
    )
    payloads = insert(job_payloads).from_select(
        ["job_seq", "body"],
        select(inserted.c.seq, rows.c.payload).select_from(
            inserted.join(rows, inserted.c.id == rows.c.id)
        ),
    )
    told = [select(func.pg_notify(channel, "")).scalar_subquery().label(channel) for channel in DUE]
    return select(*(inserted.c[c.key] for c in JOB_COLUMNS), *told).add_cte(
        payloads.cte("payloads")
    )


def _usage_query(what: str, owner: Any, limit: int) -> Select[Any]:
    """A tenant's queued jobs (`what` queued), or the times of its latest submits (recent), up
    to `limit`. `owner`: its name (or a bound parameter), None for the jobs without one."""
    mine = jobs.c.owner.is_(None) if owner is None else jobs.c.owner == owner
    if what == "queued":
        return select(jobs.c.seq).where(mine, jobs.c.status == "queued").limit(limit)
    return select(jobs.c.created_at).where(mine).order_by(jobs.c.seq.desc()).limit(limit)


@cache
def _usage_prepared(what: str, ownerless: bool, limit: int) -> Prepared:
    """_usage_query for sqlite3 (binds: owner, unless `ownerless`)."""
    return positional(_usage_query(what, None if ownerless else bindparam("owner"), limit))


def _tenants(batch: Sequence[NewJob]) -> list[str | None]:
    return list(dict.fromkeys(new.owner for new in batch))


def _owners(rows: Sequence[dict[str, Any]]) -> set[str]:
    return {row["owner"] for row in rows if row["owner"] is not None}


def _tenant_key(new: NewJob) -> str | None:
    """The Idempotency-Key as stored: one tenant's key never meets another's (each gets its
    own job for the same key), so it is stored hashed together with the tenant's name."""
    if new.idempotency_key is None:
        return None
    scoped = f"{new.owner or ''}\n{new.idempotency_key}"
    return hashlib.sha256(scoped.encode()).hexdigest()


def _with_defaults(row: dict[str, Any], payload: str, defaults: SubmitDefaults) -> str:
    """Give a generation the defaults POST /options set: the checkpoint when it names none (in
    `row`), and its tenant's options under the body's own `override_settings` (in the payload
    returned)."""
    if row["type"] not in GENERATIONS:
        return payload
    if row["checkpoint"] is None:
        row["checkpoint"] = defaults.checkpoint_for(row["owner"])
    options = defaults.options_for(row["owner"])
    if not options:
        return payload
    body = json.loads(payload)
    own = body.get("override_settings")
    body["override_settings"] = {**options, **(own if isinstance(own, dict) else {})}
    return json.dumps(body)
