"""DeliveryRepository: the only code that issues webhook outbox SQL.

A delivery is one message (a job's `started`, `progress` or `completed` event) to the job's
webhook URL. Its life:

    pending --claim--> sending --2xx--> delivered
       ^                  |----retry scheduled (next_attempt_at)--> pending
       |                  |----410, no retries left, intermediate event, manual--> failed
       |                  +----lease expired (sender died)--> claimed again
       +--redeliver (manual)-- delivered | failed | superseded
    pending --a newer message for the same job--> superseded   (started/progress only)
    sending, lease expired, a newer message for the same job --> superseded   (the same)

Rows are added by JobRepository inside the transaction that changes the job (`add`), so a crash
after that commit loses no message. The sender claims due rows in a short transaction, sends
outside any transaction, then records the attempt in another short one, fenced by the lease
token it got at the claim.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Row,
    Text,
    and_,
    cast,
    delete,
    exists,
    func,
    insert,
    literal_column,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import sqlite
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncConnection

from a1111_proxy.db.engine import Database
from a1111_proxy.db.tables import webhook_attempts, webhook_deliveries
from a1111_proxy.wakeup import OUTBOX_CHANNEL, Wakeup, make_wakeup, notify

INTERMEDIATE = ("started", "progress")
PROGRESS_INTERVAL_SECONDS = 0.5  # at most 2 progress messages a second per job
RESPONSE_BODY_STORED = 4096  # characters of a receiver's answer kept in the log

_d = webhook_deliveries
_NO_LEASE = {"lease_token": None, "lease_expires_at": None}

# What moves when there is something new to send (the sender's wake-up on SQLite follows it): a
# message queued, or a pending one made due sooner (a redelivery). One index entry each.
OUTBOX_MARK = str(
    select(
        select(func.max(_d.c.seq)).scalar_subquery(),
        select(func.min(_d.c.next_attempt_at)).where(_d.c.status == "pending").scalar_subquery(),
    ).compile(dialect=sqlite.dialect(), compile_kwargs={"literal_binds": True})
)


def outbox_wakeup(database_url: str, poll_seconds: float) -> Wakeup:
    """What the webhook sender sleeps on: woken when a message is queued or made due, not by
    every change of a job (PostgreSQL: the outbox's channel; SQLite: OUTBOX_MARK)."""
    return make_wakeup(database_url, poll_seconds, channels=(OUTBOX_CHANNEL,), mark=OUTBOX_MARK)


@dataclass(frozen=True)
class Delivery:
    """A delivery this sender holds the lease on."""

    seq: int
    id: str
    job_seq: int
    event: str
    url: str
    data: str
    occurred_at: float
    trigger: str
    attempt: int  # the number of the attempt about to be made, from 1
    token: str


@dataclass(frozen=True)
class Attempt:
    started_at: float
    duration_ms: int
    status_code: int | None = None
    response_body: str | None = None
    error: str | None = None
    address: str | None = None


@dataclass(frozen=True)
class Verdict:
    status: str  # delivered | pending | failed
    next_attempt_at: float | None = None


def wants(events: Sequence[str] | None, event: str) -> bool:
    """Does a job's `webhook_events` list include `event`?"""
    return event in (events or ())


def new_message_id() -> str:
    return f"msg_{uuid.uuid4().hex}"  # no '.', as Standard Webhooks requires


class DeliveryRepository:
    def __init__(self, db: Database, *, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.clock = clock

    # --- written by JobRepository, inside its transactions ------------------------------

    async def progress_due(self, conn: AsyncConnection, job_seq: int, now: float) -> bool:
        """False while the job's last progress message is younger than the throttle interval."""
        query = select(func.max(_d.c.occurred_at)).where(
            _d.c.job_seq == job_seq, _d.c.event == "progress"
        )
        last = (await conn.execute(query)).scalar()
        return last is None or now - last >= PROGRESS_INTERVAL_SECONDS

    async def add(
        self, conn: AsyncConnection, job: Mapping[str, Any], event: str, now: float
    ) -> None:
        """Queue `event` for `job` (a snapshot of its columns) on the caller's transaction.

        A newer message makes the job's older pending intermediate ones redundant: each body is a
        full snapshot, so a dead `started` never holds up `completed`.
        """
        await conn.execute(
            update(_d)
            .where(
                _d.c.job_seq == job["seq"], _d.c.status == "pending", _d.c.event.in_(INTERMEDIATE)
            )
            .values(status="superseded", next_attempt_at=None, updated_at=now)
        )
        await conn.execute(
            insert(_d).values(
                id=new_message_id(),
                job_seq=job["seq"],
                event=event,
                url=job["webhook_url"],
                data=json.dumps(dict(job)),
                occurred_at=now,
                status="pending",
                trigger="scheduled",
                attempts=0,
                next_attempt_at=now,
                created_at=now,
                updated_at=now,
            )
        )
        await notify(self.db, conn, OUTBOX_CHANNEL)

    @staticmethod
    def adding(written: Any, snapshot: Any, event: str, now: Any) -> tuple[Any, Any]:
        """PostgreSQL, for a statement that changes jobs: add() as two CTEs, for each row of
        `written` (a CTE of the changed jobs, with their seq, webhook_url and webhook_events)
        whose job asked for `event`; `snapshot`: the row's columns as JSON text (a column of
        `written`'s). Returns (superseded, queued): add the first to the statement; the second
        returns the queued messages' seq, for a NOTIFY of OUTBOX_CHANNEL when there are any."""
        asked = and_(
            written.c.webhook_url.is_not(None),
            cast(written.c.webhook_events, JSONB).has_key(literal_column(f"'{event}'")),
        )
        superseded = (
            update(_d)
            .where(
                _d.c.job_seq.in_(select(written.c.seq).where(asked)),
                _d.c.status == "pending",
                _d.c.event.in_(INTERMEDIATE),
            )
            .values(status="superseded", next_attempt_at=None, updated_at=now)
            .cte("superseded")
        )
        # The message id as new_message_id() makes it: msg_ and 32 hex digits.
        message_id = literal_column("'msg_'", Text).concat(
            func.replace(cast(func.gen_random_uuid(), Text), "-", "")
        )
        rows = select(
            message_id,
            written.c.seq,
            literal_column(f"'{event}'"),
            written.c.webhook_url,
            snapshot,
            now,
            literal_column("'pending'"),
            literal_column("'scheduled'"),
            literal_column("0"),
            now,
            now,
            now,
        ).where(asked)
        columns = ["id", "job_seq", "event", "url", "data", "occurred_at", "status", "trigger"]
        columns += ["attempts", "next_attempt_at", "created_at", "updated_at"]
        queued = insert(_d).from_select(columns, rows).returning(_d.c.seq).cte("queued")
        return superseded, queued

    def undelivered(self, job_seq: ColumnElement[int]) -> ColumnElement[bool]:
        """SQL for another table's query: the job `job_seq` (a column there) has a message
        still pending or being sent."""
        return exists().where(_d.c.job_seq == job_seq, _d.c.status.in_(("pending", "sending")))

    async def delete_for_jobs(self, conn: AsyncConnection, job_seqs: list[int]) -> None:
        """Retention: drop these jobs' deliveries and their attempt log (caller's transaction)."""
        mine = select(_d.c.seq).where(_d.c.job_seq.in_(job_seqs))
        await conn.execute(
            delete(webhook_attempts).where(webhook_attempts.c.delivery_seq.in_(mine))
        )
        await conn.execute(delete(_d).where(_d.c.job_seq.in_(job_seqs)))

    # --- the sender's side ---------------------------------------------------------------

    def _due(self, now: float) -> Any:
        pending = and_(_d.c.status == "pending", _d.c.next_attempt_at <= now)
        abandoned = and_(_d.c.status == "sending", _d.c.lease_expires_at < now)
        earlier = _d.alias("earlier")
        # Per-job order: never overtake an earlier message of the same job still being sent.
        overtaking = exists().where(
            earlier.c.job_seq == _d.c.job_seq,
            earlier.c.seq < _d.c.seq,
            earlier.c.status == "sending",
            earlier.c.lease_expires_at >= now,
        )
        return and_(or_(pending, abandoned), ~overtaking)

    async def outstanding(self) -> bool:
        """Whether any message is pending or being sent (each read on its partial index)."""
        query = select(
            or_(
                exists().where(_d.c.status == literal_column("'pending'")),
                exists().where(_d.c.status == literal_column("'sending'")),
            )
        )
        async with self.db.reading() as conn:
            return bool((await conn.execute(query)).scalar())

    async def has_due(self) -> bool:
        query = select(_d.c.seq).where(self._due(self.clock())).limit(1)
        async with self.db.reading() as conn:
            return (await conn.execute(query)).first() is not None

    async def claim(self, limit: int, lease_seconds: float) -> list[Delivery]:
        """Lease up to `limit` due deliveries, oldest due first."""
        now = self.clock()
        chosen = (
            select(_d.c.seq)
            .where(self._due(now))
            .order_by(_d.c.next_attempt_at, _d.c.seq)
            .limit(limit)
            .with_for_update(skip_locked=True, of=_d)
        )
        token = str(uuid.uuid4())
        stmt = (
            update(_d)
            .where(_d.c.seq.in_(chosen))
            .values(
                status="sending",
                attempts=_d.c.attempts + 1,
                lease_token=token,
                lease_expires_at=now + lease_seconds,
                updated_at=now,
            )
            .returning(
                _d.c.seq,
                _d.c.id,
                _d.c.job_seq,
                _d.c.event,
                _d.c.url,
                _d.c.data,
                _d.c.occurred_at,
                _d.c.trigger,
                _d.c.attempts,
            )
        )
        async with self.db.writing() as conn:
            await conn.execute(self._supersede_abandoned(now))
            rows = (await conn.execute(stmt)).all()
        return sorted(
            (
                Delivery(
                    r.seq,
                    r.id,
                    r.job_seq,
                    r.event,
                    r.url,
                    r.data,
                    r.occurred_at,
                    r.trigger,
                    r.attempts,
                    token,
                )
                for r in rows
            ),
            key=lambda d: d.seq,
        )

    def _supersede_abandoned(self, now: float) -> Any:
        """A `started` or `progress` message whose sender died sending it is not sent again once
        the job has a newer one: that carries a fresher snapshot, and the old one, sent beside
        it, could reach the receiver after it."""
        newer = _d.alias("newer")
        return (
            update(_d)
            .where(
                _d.c.status == "sending",
                _d.c.lease_expires_at < now,
                _d.c.event.in_(INTERMEDIATE),
                exists().where(newer.c.job_seq == _d.c.job_seq, newer.c.seq > _d.c.seq),
            )
            .values(status="superseded", next_attempt_at=None, updated_at=now, **_NO_LEASE)
        )

    def _fenced(self, delivery: Delivery) -> Any:
        return and_(
            _d.c.seq == delivery.seq, _d.c.lease_token == delivery.token, _d.c.status == "sending"
        )

    async def record(self, delivery: Delivery, attempt: Attempt, verdict: Verdict) -> bool:
        """Log the attempt and move the delivery on. False: our lease was lost meanwhile (the
        attempt is still logged, unless the delivery is gone)."""
        now = self.clock()
        async with self.db.writing() as conn:
            done = await conn.execute(
                update(_d)
                .where(self._fenced(delivery))
                .values(
                    status=verdict.status,
                    next_attempt_at=verdict.next_attempt_at,
                    last_status_code=attempt.status_code,
                    last_error=attempt.error,
                    delivered_at=now if verdict.status == "delivered" else _d.c.delivered_at,
                    updated_at=now,
                    **_NO_LEASE,
                )
            )
            fenced = done.rowcount == 1
            if fenced or await self._exists(conn, delivery.seq):
                await conn.execute(
                    insert(webhook_attempts).values(
                        delivery_seq=delivery.seq,
                        number=delivery.attempt,
                        trigger=delivery.trigger,
                        started_at=attempt.started_at,
                        duration_ms=attempt.duration_ms,
                        status_code=attempt.status_code,
                        response_body=_clip(attempt.response_body),
                        error=attempt.error,
                        address=attempt.address,
                    )
                )
        return fenced

    async def _exists(self, conn: AsyncConnection, seq: int) -> bool:
        return (await conn.execute(select(_d.c.seq).where(_d.c.seq == seq))).first() is not None

    async def release(self, delivery: Delivery) -> None:
        """Give back a delivery that was claimed but not sent (shutdown)."""
        now = self.clock()
        async with self.db.writing() as conn:
            await conn.execute(
                update(_d)
                .where(self._fenced(delivery))
                .values(
                    status="pending",
                    attempts=_d.c.attempts - 1,
                    next_attempt_at=now,
                    updated_at=now,
                    **_NO_LEASE,
                )
            )

    # --- the API's side -------------------------------------------------------------------

    async def counts(self) -> dict[str, dict[str, int]]:
        """Deliveries by event and status (for /metrics)."""
        query = select(_d.c.event, _d.c.status, func.count()).group_by(_d.c.event, _d.c.status)
        found: dict[str, dict[str, int]] = {}
        async with self.db.reading() as conn:
            for event, status, n in (await conn.execute(query)).all():
                found.setdefault(event, {})[status] = n
        return found

    async def for_job(self, job_seq: int) -> list[tuple[Row[Any], list[Row[Any]]]]:
        """A job's deliveries, oldest first, each with its attempts."""
        query = select(_d).where(_d.c.job_seq == job_seq).order_by(_d.c.seq)
        log = (
            select(webhook_attempts)
            .join(_d, webhook_attempts.c.delivery_seq == _d.c.seq)
            .where(_d.c.job_seq == job_seq)
            .order_by(webhook_attempts.c.seq)
        )
        async with self.db.reading() as conn:
            deliveries = (await conn.execute(query)).all()
            attempts = (await conn.execute(log)).all()
        by_delivery: dict[int, list[Row[Any]]] = {d.seq: [] for d in deliveries}
        for attempt in attempts:
            by_delivery[attempt.delivery_seq].append(attempt)
        return [(d, by_delivery[d.seq]) for d in deliveries]

    async def redeliver(self, job_seq: int, delivery_id: str | None) -> Row[Any] | None:
        """Send a delivery again now, as a manual attempt (no automatic retries after it).

        Without an id, the job's latest `completed` message. A pending one is just made due now;
        one being sent is left alone. None: no such delivery.
        """
        now = self.clock()
        async with self.db.writing() as conn:
            row = (await conn.execute(self._pick(job_seq, delivery_id))).one_or_none()
            if row is None:
                return None
            if row.status in ("delivered", "failed", "superseded"):
                await conn.execute(
                    update(_d)
                    .where(_d.c.seq == row.seq)
                    .values(status="pending", trigger="manual", next_attempt_at=now, updated_at=now)
                )
            elif row.status == "pending":
                await conn.execute(
                    update(_d)
                    .where(_d.c.seq == row.seq)
                    .values(next_attempt_at=now, updated_at=now)
                )
            await notify(self.db, conn, OUTBOX_CHANNEL)
            return (await conn.execute(select(_d).where(_d.c.seq == row.seq))).one()

    def _pick(self, job_seq: int, delivery_id: str | None) -> Any:
        query = select(_d.c.seq, _d.c.status).where(_d.c.job_seq == job_seq)
        if delivery_id is not None:
            return query.where(_d.c.id == delivery_id)
        return query.where(_d.c.event == "completed").order_by(_d.c.seq.desc()).limit(1)


def _clip(text: str | None) -> str | None:
    return None if text is None else text[:RESPONSE_BODY_STORED]
