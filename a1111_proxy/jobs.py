"""JobRepository: the only code that issues job SQL.

The state machine (ARCHITECTURE.md, "Job"):

    queued --claim--> processing --complete--> completed
      |  ^                |  |----fail------> error
      |  +--requeue/------+  |----canceled---> canceled   (cancel requested while running)
      |     release/reap     +--reap, attempts exhausted--> error ("worker lost")
      +--cancel, or its deadline passed--> canceled
    (a running job past its deadline is asked to stop like a cancel; it ends canceled, "deadline")

Every write after the claim is fenced by the lease token (`WHERE lease_token = :token AND status =
'processing'`), so a worker that lost its lease can no longer change the job: its write touches no
row and it learns that it must stop. Transactions are short and never span network I/O.

Webhook messages are written by the same transaction as the change that causes them (the outbox,
`deliveries.py`): the claim writes `started`, a progress update `progress` (at most 2 a second),
and every move to a terminal status `completed`, each when the job's `webhook_events` asks.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Row,
    String,
    and_,
    bindparam,
    case,
    cast,
    delete,
    exists,
    func,
    insert,
    literal,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from a1111_proxy.db.engine import Database
from a1111_proxy.db.tables import (
    STATUSES,
    controls,
    job_images,
    job_payloads,
    job_previews,
    jobs,
    webhook_deliveries,
    workers,
)
from a1111_proxy.deliveries import DeliveryRepository, wants
from a1111_proxy.errors import IdempotencyKeyReused

TERMINAL = frozenset({"completed", "error", "canceled"})
NOTIFY_CHANNEL = "a1111_proxy_jobs"
# Progress and previews: only the API's event streams listen here, so workers are not woken
# several times a second by every running job's progress.
PROGRESS_CHANNEL = "a1111_proxy_progress"
DEADLINE_ERROR = json.dumps({
    "code": "deadline",
    "message": "canceled: its deadline (Cancel-After header or timeout field) passed before it "
               "finished; submit it again with a longer timeout, or none",
})
ADVISORY_SPACE = 7861_0001  # first key of our advisory locks (one per backend, during a claim)

# Columns the API shows; never the payload, the secret or image data.
JOB_COLUMNS = tuple(
    c
    for c in jobs.c
    if c.name not in {"webhook_secret", "lease_token", "request_hash", "idempotency_key"}
)


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


GENERATIONS = frozenset({"txt2img", "img2img"})


@dataclass(frozen=True)
class Claim:
    """A job this worker holds the lease on."""

    seq: int
    id: str
    type: str
    token: str
    attempts: int
    max_attempts: int
    backend: str
    checkpoint: str | None = None
    payload: str = "{}"  # the body to send, JSON
    more_queued: bool = False  # other jobs were due when this one was claimed


@dataclass(frozen=True)
class Histogram:
    counts: list[int]  # cumulative, one per bucket bound, then +Inf
    total: float


@dataclass(frozen=True)
class JobMetrics:
    by_status: dict[str, int]
    due: int  # queued and due now
    oldest_due_age: float  # seconds the oldest due job has waited; 0 when none
    busy_backends: dict[str, int]  # backend name -> jobs running on it (0 or 1)
    claim_latency: Histogram
    durations: dict[str, Histogram]  # by end status


@dataclass(frozen=True)
class Touch:
    alive: bool  # False: the lease is lost, stop and touch nothing
    cancel_requested: bool
    skip_requested: bool = False


@dataclass(frozen=True)
class Submitted:
    job: Row[Any]
    replayed: bool


def retry_delay(attempt: int, rng: Callable[[], float] = random.random) -> float:
    """Durable backoff before attempt `attempt + 1`: about 2 s, 8 s, 32 s, capped at 60 s."""
    base = min(60.0, 2.0 * 4 ** max(0, attempt - 1))
    return base * (0.8 + 0.4 * rng())


def error_json(code: str, message: str, **extra: Any) -> str:
    return json.dumps({"code": code, "message": message, **extra})


class JobRepository:
    def __init__(
        self,
        db: Database,
        *,
        max_attempts: int = 3,
        lease_seconds: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.max_attempts = max_attempts
        self.lease_seconds = lease_seconds
        self.clock = clock
        self.deliveries = DeliveryRepository(db, clock=clock)
        self._batch: list[tuple[NewJob, asyncio.Future[Row[Any]]]] = []
        self._batch_task: asyncio.Task[None] | None = None

    # --- submit ---------------------------------------------------------------------------

    async def submit(self, new: NewJob) -> Submitted:
        """Store a new job durably; return once it is committed.

        Submits without an idempotency key are committed in groups: each request still waits for
        its own commit, but concurrent requests share one transaction.
        """
        if new.idempotency_key is not None:
            return await self._submit_idempotent(new)
        future: asyncio.Future[Row[Any]] = asyncio.get_running_loop().create_future()
        self._batch.append((new, future))
        if self._batch_task is None or self._batch_task.done():
            self._batch_task = asyncio.create_task(self._drain_batches())
        return Submitted(await future, replayed=False)

    async def _drain_batches(self) -> None:
        while self._batch:
            batch, self._batch = self._batch[:256], self._batch[256:]
            try:
                rows = await self._insert_many([new for new, _ in batch])
            except Exception as exc:  # every waiter hears about it; none is left hanging
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), row in zip(batch, rows, strict=True):
                if not future.done():
                    future.set_result(row)

    async def _insert_many(self, batch: Sequence[NewJob]) -> list[Row[Any]]:
        now = self.clock()
        rows = [self._job_values(new, now) for new in batch]
        async with self.db.writing() as conn:
            if any(row["checkpoint"] is None and row["type"] in GENERATIONS for row in rows):
                # Read in the same transaction: a job takes the default set before it was stored.
                default = await self._default_checkpoint(conn)
                for row in rows:
                    if row["checkpoint"] is None and row["type"] in GENERATIONS:
                        row["checkpoint"] = default
            inserted = (await conn.execute(insert(jobs).returning(*JOB_COLUMNS), rows)).all()
            by_id = {row.id: row for row in inserted}
            await conn.execute(
                insert(job_payloads),
                [{"job_seq": by_id[r["id"]].seq, "body": n.payload} for r, n in zip(rows, batch)],
            )
            await self._notify(conn)
        return [by_id[r["id"]] for r in rows]

    async def _submit_idempotent(self, new: NewJob) -> Submitted:
        try:
            [row] = await self._insert_many([new])
            return Submitted(row, replayed=False)
        except IntegrityError:
            pass  # the key exists: replay the job it made, if the body is the same
        async with self.db.reading() as conn:
            existing = (
                await conn.execute(
                    select(*JOB_COLUMNS, jobs.c.request_hash).where(
                        jobs.c.idempotency_key == new.idempotency_key
                    )
                )
            ).one_or_none()
        if existing is None:  # deleted between our insert and read: try once more
            [row] = await self._insert_many([new])
            return Submitted(row, replayed=False)
        if existing.request_hash != new.request_hash:
            raise IdempotencyKeyReused()
        return Submitted(existing, replayed=True)

    async def _default_checkpoint(self, conn: AsyncConnection) -> str | None:
        query = select(controls.c.value).where(controls.c.key == "default_checkpoint")
        value = (await conn.execute(query)).scalar_one_or_none()
        return json.loads(value) if value else None

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
            "idempotency_key": new.idempotency_key,
            "request_hash": new.request_hash,
            "webhook_url": new.webhook_url,
            "webhook_secret": new.webhook_secret,
            "webhook_events": new.webhook_events,
            "checkpoint": new.checkpoint,
            "created_at": now,
            "updated_at": now,
            "deadline_at": None if new.timeout is None else now + new.timeout,
            "owner": new.owner,
        }

    async def _notify(self, conn: AsyncConnection, channel: str = NOTIFY_CHANNEL) -> None:
        if not self.db.is_sqlite:
            await conn.execute(select(func.pg_notify(channel, "")))

    # --- reading --------------------------------------------------------------------------

    async def get(self, job_id: str) -> Row[Any] | None:
        async with self.db.reading() as conn:
            return (
                await conn.execute(select(*JOB_COLUMNS).where(jobs.c.id == job_id))
            ).one_or_none()

    async def list(
        self,
        *,
        status: str | None = None,
        type: str | None = None,
        before_seq: int | None = None,
        limit: int = 50,
    ) -> list[Row[Any]]:
        query = select(*JOB_COLUMNS).order_by(jobs.c.seq.desc()).limit(limit)
        if status is not None:
            query = query.where(jobs.c.status == status)
        if type is not None:
            query = query.where(jobs.c.type == type)
        if before_seq is not None:
            query = query.where(jobs.c.seq < before_seq)
        async with self.db.reading() as conn:
            return list((await conn.execute(query)).all())

    async def images(self, seq: int) -> list[bytes]:
        query = select(job_images.c.data).where(job_images.c.job_seq == seq).order_by(job_images.c.n)
        async with self.db.reading() as conn:
            return list((await conn.execute(query)).scalars())

    async def image(self, seq: int, n: int) -> bytes | None:
        query = select(job_images.c.data).where(job_images.c.job_seq == seq, job_images.c.n == n)
        async with self.db.reading() as conn:
            return (await conn.execute(query)).scalar_one_or_none()

    async def payload(self, seq: int) -> str:
        async with self.db.reading() as conn:
            query = select(job_payloads.c.body).where(job_payloads.c.job_seq == seq)
            return (await conn.execute(query)).scalar_one()

    async def webhook_secret(self, seq: int) -> str | None:
        """The job's own signing secret, for the webhook sender only; never shown."""
        query = select(jobs.c.webhook_secret).where(jobs.c.seq == seq)
        async with self.db.reading() as conn:
            return (await conn.execute(query)).scalar_one_or_none()

    async def has_due_job(self) -> bool:
        query = (
            select(jobs.c.seq)
            .where(jobs.c.status == "queued", jobs.c.run_after <= self.clock())
            .limit(1)
        )
        async with self.db.reading() as conn:
            return (await conn.execute(query)).first() is not None

    async def running(self) -> list[Row[Any]]:
        query = select(*JOB_COLUMNS).where(jobs.c.status == "processing").order_by(jobs.c.started_at)
        async with self.db.reading() as conn:
            return list((await conn.execute(query)).all())

    # --- one caller's jobs (A1111's global /progress, /interrupt, /skip, per caller) --------

    async def owned(self, owner: str, job_id: str) -> Row[Any] | None:
        """The job, if `owner` submitted it."""
        query = select(*JOB_COLUMNS).where(jobs.c.id == job_id, jobs.c.owner == owner)
        async with self.db.reading() as conn:
            return (await conn.execute(query)).one_or_none()

    async def running_of(self, owner: str, job_id: str | None = None) -> list[Row[Any]]:
        """`owner`'s running jobs, oldest start first (`job_id`: only that one)."""
        query = (select(*JOB_COLUMNS).where(*_of(owner, job_id), jobs.c.status == "processing")
                 .order_by(jobs.c.started_at))
        async with self.db.reading() as conn:
            return list((await conn.execute(query)).all())

    async def active_count_of(self, owner: str) -> int:
        """How many of `owner`'s jobs are queued or running."""
        query = (select(func.count()).select_from(jobs)
                 .where(jobs.c.owner == owner, jobs.c.status.in_(("queued", "processing"))))
        async with self.db.reading() as conn:
            return int((await conn.execute(query)).scalar_one())

    async def preview(self, seq: int) -> str | None:
        query = select(job_previews.c.image).where(job_previews.c.job_seq == seq)
        async with self.db.reading() as conn:
            return (await conn.execute(query)).scalar_one_or_none()

    async def counts(self) -> dict[str, int]:
        query = select(jobs.c.status, func.count()).group_by(jobs.c.status)
        async with self.db.reading() as conn:
            found = {status: n for status, n in (await conn.execute(query)).all()}
        return {status: found.get(status, 0) for status in ("queued", "processing")} | found

    async def metrics(
        self, window: float, claim_buckets: Sequence[float], duration_buckets: Sequence[float]
    ) -> JobMetrics:
        """What /metrics shows about jobs, read from the database so that every API replica
        reports the same numbers. Histograms cover the last `window` seconds: claim latency
        (created -> first started) of jobs started in it, duration (started -> ended) of jobs
        that ended in it, by end status. Each histogram is one aggregate query."""
        now = self.clock()
        since = now - window
        recent_end = and_(jobs.c.completed_at >= since, jobs.c.started_at.is_not(None))
        waited = jobs.c.started_at - jobs.c.created_at
        ran = jobs.c.completed_at - jobs.c.started_at
        async with self.db.reading() as conn:
            by_status = dict((await conn.execute(
                select(jobs.c.status, func.count()).group_by(jobs.c.status))).all())
            due, oldest = (await conn.execute(
                select(func.count(), func.min(jobs.c.created_at))
                .where(jobs.c.status == "queued", jobs.c.run_after <= now))).one()
            busy = dict((await conn.execute(
                select(jobs.c.backend, func.count()).where(jobs.c.status == "processing")
                .group_by(jobs.c.backend))).all())
            claims = (await conn.execute(_histogram(waited, claim_buckets).where(
                (jobs.c.status == "processing") | recent_end, jobs.c.started_at >= since,
            ))).one()
            durations = (await conn.execute(
                _histogram(ran, duration_buckets, jobs.c.status)
                .where(recent_end, jobs.c.status.in_(TERMINAL)).group_by(jobs.c.status)
            )).all()
        return JobMetrics(
            by_status={status: by_status.get(status, 0) for status in STATUSES},
            due=due, oldest_due_age=now - oldest if oldest is not None else 0.0,
            busy_backends={name: n for name, n in busy.items() if name},
            claim_latency=_buckets(claims, claim_buckets),
            durations={row.label: _buckets(row, duration_buckets) for row in durations},
        )

    # --- cancel ---------------------------------------------------------------------------

    async def cancel(self, job_id: str) -> Row[Any] | None:
        """Cancel a queued job at once; ask the worker to interrupt a running one.

        A terminal job is left as it is. Returns the job, or None if there is no such job.
        """
        now = self.clock()
        async with self.db.writing() as conn:
            await self._cancel_if_queued(
                conn, job_id, error_json("canceled", "canceled before it started"), now)
            await conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.status == "processing",
                       jobs.c.cancel_requested_at.is_(None))
                .values(cancel_requested_at=now, updated_at=now)
            )
            row = (
                await conn.execute(select(*JOB_COLUMNS).where(jobs.c.id == job_id))
            ).one_or_none()
            await self._notify(conn)
        return row

    async def cancel_queued(self, job_id: str, code: str, message: str) -> bool:
        """Cancel the job only if it has not started (a waiting client that went away, or no
        backend to run it). True if it was canceled."""
        now = self.clock()
        async with self.db.writing() as conn:
            done = await self._cancel_if_queued(conn, job_id, error_json(code, message), now)
            if done:
                await self._notify(conn)
        return done

    async def _cancel_if_queued(
        self, conn: AsyncConnection, job_id: str, error: str, now: float
    ) -> bool:
        canceled = (await conn.execute(
            update(jobs)
            .where(jobs.c.id == job_id, jobs.c.status == "queued")
            .values(status="canceled", completed_at=now, updated_at=now, error=error)
            .returning(*_WEBHOOK)
        )).one_or_none()
        if canceled is not None:
            await self._announce(conn, canceled, "completed", now)
        return canceled is not None

    async def interrupt_running(self, *, owner: str, job_id: str | None = None) -> int:
        """A1111's /interrupt over `owner`'s jobs: each of its running jobs (or the one
        `job_id` names) is asked to stop."""
        now = self.clock()
        stmt = (
            update(jobs)
            .where(*_of(owner, job_id), jobs.c.status == "processing",
                   jobs.c.cancel_requested_at.is_(None))
            .values(cancel_requested_at=now, updated_at=now)
        )
        async with self.db.writing() as conn:
            return (await conn.execute(stmt)).rowcount

    async def skip_running(self, *, owner: str, job_id: str | None = None) -> int:
        """A1111's /skip over `owner`'s jobs: each of its running jobs (or the one `job_id`
        names) skips its current batch."""
        now = self.clock()
        stmt = (
            update(jobs)
            .where(*_of(owner, job_id), jobs.c.status == "processing")
            .values(skip_requested_at=now, updated_at=now)
        )
        async with self.db.writing() as conn:
            return (await conn.execute(stmt)).rowcount

    # --- the worker's side ----------------------------------------------------------------

    async def claim_next(self, owner: str, backend: str) -> Claim | None:
        """Take the next due job for one slot (see `claim`)."""
        claimed = await self.claim(owner, [(backend, None)])
        return claimed[0][1] if claimed else None

    async def claim(
        self, owner: str, slots: Sequence[tuple[str, str | None]]
    ) -> list[tuple[int, Claim]]:
        """Lease up to one due job per free slot (highest priority, then oldest) to `owner`.

        `slots` are (backend name, checkpoint it last ran). A backend runs one job at a time
        across all workers: a slot whose backend already runs a job (for any worker) gets none,
        so several workers can share the same A1111_URLS. A job goes to a slot that last ran its
        checkpoint when there is one, else to the first free slot. One short transaction
        claims, assigns and reads the payloads. Returns (slot index, claim) pairs.
        """
        now = self.clock()
        async with self.db.writing() as conn:
            open_slots = await self._idle_backends(conn, owner, slots)
            if not open_slots:
                return []
            claimed = await self._claim_in(conn, owner, [slots[i] for i in open_slots], now)
        return [(open_slots[index], claim) for index, claim in claimed]

    async def _idle_backends(
        self, conn: AsyncConnection, owner: str, slots: Sequence[tuple[str, str | None]]
    ) -> list[int]:
        """Indexes of `slots` whose backend runs no job of another worker now.

        The owner's own jobs do not count: its slots are free only when their backend has
        answered (a job still storing its result no longer occupies the backend).
        SQLite serialises write transactions, so reading is enough. PostgreSQL runs claims of
        several workers at once: each first takes a transaction-scoped advisory lock per
        backend, in the order of the lock keys (so two claims never deadlock), and so two
        claims never both see a backend idle.
        """
        names = sorted({name for name, _ in slots})
        if not self.db.is_sqlite:
            await conn.execute(
                text("SELECT pg_advisory_xact_lock(:space, key) FROM (SELECT DISTINCT "
                     "hashtext(name) AS key FROM unnest(CAST(:names AS text[])) AS name) AS k "
                     "ORDER BY key"),
                {"names": names, "space": ADVISORY_SPACE},
            )
        busy = set((await conn.execute(
            select(jobs.c.backend).distinct()
            .where(jobs.c.status == "processing", jobs.c.backend.in_(names),
                   jobs.c.lease_owner != owner)
        )).scalars())
        free = set(names) - busy
        taken: set[str] = set()
        indexes = []
        for index, (name, _) in enumerate(slots):
            if name in free and name not in taken:  # a URL listed twice is still one backend
                taken.add(name)
                indexes.append(index)
        return indexes

    async def _claim_in(
        self,
        conn: AsyncConnection,
        owner: str,
        slots: Sequence[tuple[str, str | None]],
        now: float,
    ) -> list[tuple[int, Claim]]:
        waiting = and_(jobs.c.status == "queued", jobs.c.run_after <= now, _not_expired(now))
        due = (
            select(jobs.c.seq)
            .where(waiting)
            .order_by(*QUEUE_ORDER)
            .limit(len(slots))
            .with_for_update(skip_locked=True)
            .cte("due")
        )
        # One random prefix per claim plus the job's seq: a token no other claim ever had.
        prefix = uuid.uuid4().hex[:16] + ":"
        stmt = (
            update(jobs)
            # A CTE, so PostgreSQL evaluates the LIMITed, locked select exactly once.
            .where(jobs.c.seq == due.c.seq, jobs.c.status == "queued")
            .values(
                status="processing",
                attempts=jobs.c.attempts + 1,
                lease_owner=owner,
                lease_token=literal(prefix) + cast(jobs.c.seq, String),
                lease_expires_at=now + self.lease_seconds,
                progress=0.0,
                eta_relative=None,
                started_at=func.coalesce(jobs.c.started_at, now),
                updated_at=now,
                # One slot (the usual case: a slot freed alone) needs no placing afterwards.
                **({"backend": slots[0][0]} if len(slots) == 1 else {}),
            )
            .returning(jobs.c.id, jobs.c.type, jobs.c.attempts, jobs.c.max_attempts,
                       jobs.c.checkpoint, jobs.c.priority, jobs.c.lease_token, *_WEBHOOK,
                       _PAYLOAD)
        )
        rows = sorted((await conn.execute(stmt)).all(), key=lambda r: (-r.priority, r.seq))
        if not rows:
            return []
        placed = _place(rows, slots)
        if len(slots) > 1:
            await conn.execute(
                update(jobs).where(jobs.c.seq == bindparam("s")).values(backend=bindparam("b")),
                [{"s": row.seq, "b": slots[index][0]} for index, row in placed],
            )
        announced = [await self._announce(conn, row, "started", now) for row in rows]
        if any(announced):
            await self._notify(conn)
        # Whether more are waiting: the worker then claims a slot's next job the moment its
        # backend answers, and otherwise stores the result first (worker/loop.py).
        more = (await conn.execute(select(jobs.c.seq).where(waiting).limit(1))).first()
        return [
            (index, Claim(row.seq, row.id, row.type, row.lease_token, row.attempts,
                          row.max_attempts, slots[index][0], row.checkpoint, row.payload,
                          more_queued=more is not None))
            for index, row in placed
        ]

    def _fenced(self, claim: Claim) -> Any:
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
        or a skip was asked for."""
        now = self.clock()
        values: dict[str, Any] = {"lease_expires_at": now + self.lease_seconds, "updated_at": now}
        if progress is not None:
            values["progress"] = max(0.0, min(1.0, progress))
            values["eta_relative"] = eta
        stmt = (
            update(jobs)
            .where(self._fenced(claim))
            .values(**values)
            .returning(jobs.c.cancel_requested_at, jobs.c.skip_requested_at, *_WEBHOOK)
        )
        async with self.db.writing() as conn:
            row = (await conn.execute(stmt)).one_or_none()
            if row is not None and progress is not None:
                if await self._announce(conn, row, "progress", now):
                    await self._notify(conn)
            if row is not None and preview is not None:
                await conn.execute(delete(job_previews).where(job_previews.c.job_seq == claim.seq))
                await conn.execute(
                    insert(job_previews).values(job_seq=claim.seq, image=preview, updated_at=now)
                )
            if row is not None and (progress is not None or preview is not None):
                await self._notify(conn, PROGRESS_CHANNEL)
        return _touch(row)

    async def requests(self, claim: Claim) -> Touch:
        """A read-only look at what was asked of a running job (cancel, skip)."""
        query = select(jobs.c.cancel_requested_at, jobs.c.skip_requested_at).where(
            self._fenced(claim)
        )
        async with self.db.reading() as conn:
            return _touch((await conn.execute(query)).one_or_none())

    async def cancel_requested(self, claim: Claim) -> bool | None:
        """True/False, or None when the lease is gone."""
        touch = await self.requests(claim)
        return touch.cancel_requested if touch.alive else None

    async def clear_skip(self, claim: Claim) -> None:
        stmt = update(jobs).where(self._fenced(claim)).values(skip_requested_at=None)
        async with self.db.writing() as conn:
            await conn.execute(stmt)

    async def complete(
        self, claim: Claim, result: Any, images: list[bytes], *, status: str = "completed",
        error: str | None = None,
    ) -> bool:
        """Store the backend's answer (its images apart, in `images`) and end the job
        `completed` (or `canceled` with the partial answer A1111 gave on interrupt).
        False: nothing was written, because the lease was lost or (for `completed`) a cancel
        was asked for meanwhile; `requests()` tells which."""
        now = self.clock()
        fenced = self._fenced(claim)
        if status == "completed":
            fenced = and_(fenced, jobs.c.cancel_requested_at.is_(None))
        async with self.db.writing() as conn:
            done = (await conn.execute(
                update(jobs)
                .where(fenced)
                .values(
                    status=status,
                    result=json.dumps(result),
                    image_count=len(images),
                    progress=1.0 if status == "completed" else jobs.c.progress,
                    eta_relative=0.0,
                    error=_cancel_error(error) if status == "canceled" else error,
                    completed_at=now,
                    updated_at=now,
                    **_NO_LEASE,
                )
                .returning(*_WEBHOOK)
            )).one_or_none()
            if done is None:
                return False  # nothing was written
            await conn.execute(delete(job_images).where(job_images.c.job_seq == claim.seq))
            if images:
                await conn.execute(
                    insert(job_images),
                    [{"job_seq": claim.seq, "n": n, "data": data} for n, data in enumerate(images)],
                )
            await self._announce(conn, done, "completed", now)
            await self._notify(conn)
        return True

    async def finish(self, claim: Claim, status: str, error: str | None) -> bool:
        """End the job `error` or `canceled`. False: the lease was lost."""
        assert status in ("error", "canceled")
        now = self.clock()
        stmt = (
            update(jobs)
            .where(self._fenced(claim))
            .values(status=status, error=_cancel_error(error) if status == "canceled" else error,
                    completed_at=now, updated_at=now, **_NO_LEASE)
            .returning(*_WEBHOOK)
        )
        async with self.db.writing() as conn:
            ended = (await conn.execute(stmt)).one_or_none()
            if ended is not None:
                await self._announce(conn, ended, "completed", now)
            await self._notify(conn)
        return ended is not None

    async def requeue(self, claim: Claim, delay: float, error: str | None) -> bool:
        """Put the job back in the queue to run again after `delay` seconds (durable backoff)."""
        now = self.clock()
        stmt = (
            update(jobs)
            .where(self._fenced(claim))
            .values(status="queued", run_after=now + delay, error=error, progress=0.0,
                    eta_relative=None, updated_at=now, **_NO_LEASE)
        )
        async with self.db.writing() as conn:
            done = (await conn.execute(stmt)).rowcount == 1
            await self._notify(conn)
        return done

    async def release(self, claim: Claim) -> bool:
        """Give the job back at once without counting the attempt (graceful shutdown)."""
        now = self.clock()
        stmt = (
            update(jobs)
            .where(self._fenced(claim))
            .values(status="queued", run_after=now, attempts=jobs.c.attempts - 1, progress=0.0,
                    eta_relative=None, updated_at=now, **_NO_LEASE)
        )
        async with self.db.writing() as conn:
            done = (await conn.execute(stmt)).rowcount == 1
            await self._notify(conn)
        return done

    async def reap_expired(self) -> list[tuple[str, str]]:
        """Jobs whose lease ran out: back to the queue, or `error` once attempts are used up.

        A job whose cancel was asked for ends `canceled` instead. Returns (id, new status) pairs.
        """
        now = self.clock()
        exhausted = jobs.c.attempts >= jobs.c.max_attempts
        canceling = jobs.c.cancel_requested_at.is_not(None)
        new_status = case((canceling, "canceled"), (exhausted, "error"), else_="queued")
        lost = error_json(
            "worker_lost",
            "worker lost: the worker running this job stopped renewing its lease "
            "(it crashed or was killed) and the attempt limit is reached",
        )
        stmt = (
            update(jobs)
            .where(jobs.c.status == "processing", jobs.c.lease_expires_at < now)
            .values(
                status=new_status,
                error=case((canceling, _cancel_error(jobs.c.error)), (exhausted, literal(lost)),
                           else_=jobs.c.error),
                completed_at=case((canceling | exhausted, now), else_=None),
                run_after=now,
                progress=case((canceling | exhausted, jobs.c.progress), else_=0.0),
                updated_at=now,
                **_NO_LEASE,
            )
            .returning(jobs.c.id, jobs.c.status, *_WEBHOOK)
        )
        async with self.db.writing() as conn:
            rows = (await conn.execute(stmt)).all()
            for row in rows:
                if row.status in TERMINAL:
                    await self._announce(conn, row, "completed", now)
            if rows:
                await self._notify(conn)
        return [(row.id, row.status) for row in rows]

    # --- deadlines (Cancel-After / timeout) ----------------------------------------------

    async def has_expired_deadline(self) -> bool:
        """A cheap read, so that the sweep writes only when there is something to do."""
        query = select(jobs.c.seq).where(self._expired(self.clock())).limit(1)
        async with self.db.reading() as conn:
            return (await conn.execute(query)).first() is not None

    def _expired(self, now: float) -> Any:
        waiting = jobs.c.status == "queued"
        running = and_(jobs.c.status == "processing", jobs.c.cancel_requested_at.is_(None))
        return and_(_past_deadline(now), or_(waiting, running))

    async def expire_deadlines(self) -> tuple[list[str], list[str]]:
        """Queued jobs past their deadline end `canceled` ("deadline"); running ones are asked to
        stop, as a cancel would (their worker interrupts them and they end canceled, "deadline").
        Returns (canceled ids, interrupted ids)."""
        now = self.clock()
        expired = _past_deadline(now)
        async with self.db.writing() as conn:
            canceled = (await conn.execute(
                update(jobs)
                .where(expired, jobs.c.status == "queued")
                .values(status="canceled", completed_at=now, updated_at=now, error=DEADLINE_ERROR)
                .returning(jobs.c.id, *_WEBHOOK)
            )).all()
            for row in canceled:
                await self._announce(conn, row, "completed", now)
            interrupted = (await conn.execute(
                update(jobs)
                .where(expired, jobs.c.status == "processing", jobs.c.cancel_requested_at.is_(None))
                .values(cancel_requested_at=now, updated_at=now)  # now >= deadline_at
                .returning(jobs.c.id)
            )).all()
            if canceled or interrupted:
                await self._notify(conn)
        return [row.id for row in canceled], [row.id for row in interrupted]

    # --- the queue view -------------------------------------------------------------------

    async def queued(self, limit: int) -> tuple[list[Row[Any]], int]:
        """The first `limit` queued jobs in claim order, and how many are queued in all."""
        query = (select(*JOB_COLUMNS).where(jobs.c.status == "queued")
                 .order_by(*QUEUE_ORDER).limit(limit))
        total = select(func.count()).select_from(jobs).where(jobs.c.status == "queued")
        async with self.db.reading() as conn:
            rows = list((await conn.execute(query)).all())
            return rows, int((await conn.execute(total)).scalar_one())

    async def queue_position(self, row: Any) -> int | None:
        """1 for the job that is claimed next; None unless queued. Jobs waiting out a retry
        backoff keep their place: they are claimed in this order once due."""
        if row.status != "queued":
            return None
        ahead = or_(jobs.c.priority > row.priority,
                    and_(jobs.c.priority == row.priority, jobs.c.seq < row.seq))
        query = select(func.count()).select_from(jobs).where(jobs.c.status == "queued", ahead)
        async with self.db.reading() as conn:
            return int((await conn.execute(query)).scalar_one()) + 1

    async def recent_durations(self, limit: int = 20, within: float = 86400.0) -> list[float]:
        """How long (started to completed, seconds) the last `limit` completed jobs ran."""
        query = (
            select(jobs.c.completed_at - jobs.c.started_at)
            .where(jobs.c.status == "completed", jobs.c.started_at.is_not(None),
                   jobs.c.completed_at >= self.clock() - within)
            .order_by(jobs.c.completed_at.desc())
            .limit(limit)
        )
        async with self.db.reading() as conn:
            return [float(d) for d in (await conn.execute(query)).scalars() if d is not None]

    # --- watching jobs (event streams, wait mode) -----------------------------------------

    async def snapshots(self, ids: Sequence[str]) -> dict[str, Row[Any]]:
        """What changes while a job runs, for many jobs in one short read: status, attempts,
        progress, eta and when its live preview was last stored (never the image)."""
        query = (
            select(jobs.c.id, jobs.c.seq, jobs.c.status, jobs.c.attempts, jobs.c.progress,
                   jobs.c.eta_relative, job_previews.c.updated_at.label("preview_at"))
            .outerjoin(job_previews, job_previews.c.job_seq == jobs.c.seq)
            .where(jobs.c.id.in_(list(ids)))
        )
        async with self.db.reading() as conn:
            return {row.id: row for row in (await conn.execute(query)).all()}

    # --- retention ------------------------------------------------------------------------

    async def purge_finished(self, older_than: float, batch: int = 100) -> int:
        """Delete up to `batch` finished jobs that ended before `older_than` (unix time), with
        their payloads, images, previews and webhook deliveries (ON DELETE CASCADE). A job
        whose webhook is still pending or being sent is kept until that delivery ends.
        One short transaction; returns how many jobs went."""
        undelivered = exists().where(
            webhook_deliveries.c.job_seq == jobs.c.seq,
            webhook_deliveries.c.status.in_(("pending", "sending")),
        )
        chosen = (
            select(jobs.c.seq)
            .where(jobs.c.completed_at < older_than, jobs.c.status.in_(tuple(TERMINAL)),
                   ~undelivered)
            .order_by(jobs.c.completed_at)
            .limit(batch)
        )
        async with self.db.writing() as conn:
            seqs = list((await conn.execute(chosen)).scalars())
            if seqs:
                # Children first: correct even where foreign keys are not enforced.
                for child in (job_payloads, job_images, job_previews):
                    await conn.execute(delete(child).where(child.c.job_seq.in_(seqs)))
                await self.deliveries.delete_for_jobs(conn, seqs)
                await conn.execute(delete(jobs).where(jobs.c.seq.in_(seqs)))
        return len(seqs)

    async def reclaim_space(self, pages: int = 2000) -> int:
        """SQLite: give up to `pages` free pages back to the file system (incremental vacuum;
        the file must have auto_vacuum=INCREMENTAL, which the migrations set). Returns the
        number of free pages left. PostgreSQL: autovacuum does this; nothing to do."""
        if not self.db.is_sqlite:
            return 0
        async with self.db.write_engine.connect() as conn:
            # The pragma frees one page per step, and the driver's execute() steps once: run it
            # as a script, which steps it to the end (its own short write transaction).
            raw = (await conn.get_raw_connection()).driver_connection
            await raw.executescript(f"PRAGMA incremental_vacuum({int(pages)})")
        async with self.db.reading() as conn:
            return int((await conn.exec_driver_sql("PRAGMA freelist_count")).scalar_one())

    # --- the webhook outbox ---------------------------------------------------------------

    async def _announce(self, conn: AsyncConnection, job: Row[Any], event: str, now: float) -> bool:
        """Queue the webhook message for `event` in this transaction, if the job asked for it.

        `job` carries the columns of `_WEBHOOK`. Progress is throttled per job. True: queued.
        """
        if not job.webhook_url or not wants(job.webhook_events, event):
            return False
        if event == "progress" and not await self.deliveries.progress_due(conn, job.seq, now):
            return False
        snapshot = (await conn.execute(select(*JOB_COLUMNS).where(jobs.c.seq == job.seq))).one()
        await self.deliveries.add(conn, dict(snapshot._mapping), event, now)
        return True

    # --- workers --------------------------------------------------------------------------

    async def beat_worker(self, worker_id: str, started_at: float, slots: list[dict[str, Any]]) -> None:
        now = self.clock()
        body = json.dumps(slots)
        async with self.db.writing() as conn:
            done = await conn.execute(
                update(workers).where(workers.c.id == worker_id).values(heartbeat_at=now, slots=body)
            )
            if done.rowcount == 0:
                await conn.execute(
                    insert(workers).values(id=worker_id, started_at=started_at,
                                           heartbeat_at=now, slots=body)
                )
            # Forget workers that stopped long ago, so health reflects the living.
            await conn.execute(delete(workers).where(workers.c.heartbeat_at < now - 86400))

    async def forget_worker(self, worker_id: str) -> None:
        async with self.db.writing() as conn:
            await conn.execute(delete(workers).where(workers.c.id == worker_id))

    async def live_workers(self, stale_after: float) -> list[Row[Any]]:
        query = select(workers).where(workers.c.heartbeat_at >= self.clock() - stale_after)
        async with self.db.reading() as conn:
            return list((await conn.execute(query.order_by(workers.c.id))).all())

    async def busy_elsewhere(self, owner: str, backends: Sequence[str]) -> set[str]:
        """Which of `backends` run a job of another worker now (several workers may share an
        A1111): a control call such as unload-checkpoint must wait for it."""
        query = select(jobs.c.backend).distinct().where(
            jobs.c.status == "processing", jobs.c.backend.in_(list(backends)),
            jobs.c.lease_owner != owner,
        )
        async with self.db.reading() as conn:
            return set((await conn.execute(query)).scalars())

    async def ping(self) -> None:
        async with self.db.reading() as conn:
            await conn.execute(text("SELECT 1"))


_NO_LEASE = {"lease_owner": None, "lease_token": None, "lease_expires_at": None,
             "skip_requested_at": None}


# The job's A1111 body, read in the claim's own UPDATE ... RETURNING (one statement less).
_PAYLOAD = (
    select(job_payloads.c.body)
    .where(job_payloads.c.job_seq == jobs.c.seq)
    .correlate(jobs)
    .scalar_subquery()
    .label("payload")
)


def _place(rows: list[Any], slots: Sequence[tuple[str, str | None]]) -> list[tuple[int, Any]]:
    """Give each claimed job (in queue order) a slot, preferring one that has its checkpoint."""
    free = list(range(len(slots)))
    placed = []
    for row in rows:
        match = next((i for i in free if row.checkpoint and slots[i][1] == row.checkpoint), free[0])
        free.remove(match)
        placed.append((match, row))
    return placed


def _histogram(value: Any, bounds: Sequence[float], *label: Any) -> Any:
    """SELECT [label,] count(value <= b) for each bound, count(*), sum(value)."""
    columns = [func.sum(case((value <= bound, 1), else_=0)).label(f"le{i}")
               for i, bound in enumerate(bounds)]
    named = [column.label("label") for column in label]
    return select(*named, *columns, func.count().label("n"),
                  func.coalesce(func.sum(value), 0.0).label("total"))


def _buckets(row: Any, bounds: Sequence[float]) -> Histogram:
    counts = [int(getattr(row, f"le{i}") or 0) for i in range(len(bounds))]
    return Histogram(counts=[*counts, int(row.n)], total=float(row.total))


def _touch(row: Any) -> Touch:
    if row is None:
        return Touch(alive=False, cancel_requested=False)
    return Touch(alive=True, cancel_requested=row.cancel_requested_at is not None,
                 skip_requested=row.skip_requested_at is not None)


_WEBHOOK = (jobs.c.seq, jobs.c.webhook_url, jobs.c.webhook_events)

# The claim order: highest priority first, then oldest (the queue view shows the same order).
QUEUE_ORDER = (jobs.c.priority.desc(), jobs.c.seq)


def _of(owner: str, job_id: str | None) -> list[Any]:
    """WHERE terms: `owner`'s jobs, or only the one `job_id` names."""
    terms = [jobs.c.owner == owner]
    if job_id is not None:
        terms.append(jobs.c.id == job_id)
    return terms


def _past_deadline(now: float) -> Any:
    return and_(jobs.c.deadline_at.is_not(None), jobs.c.deadline_at <= now)


def _not_expired(now: float) -> Any:
    return or_(jobs.c.deadline_at.is_(None), jobs.c.deadline_at > now)


def _cancel_error(default: Any) -> Any:
    """A cancel the deadline sweep asked for (at or after the deadline) ends as "deadline"."""
    if not hasattr(default, "self_group"):
        default = literal(default, String)
    past_deadline = and_(jobs.c.deadline_at.is_not(None), jobs.c.cancel_requested_at.is_not(None),
                         jobs.c.cancel_requested_at >= jobs.c.deadline_at)
    return case((past_deadline, literal(DEADLINE_ERROR)), else_=default)


def encode_images(images: list[bytes]) -> list[str]:
    return [base64.b64encode(data).decode("ascii") for data in images]
