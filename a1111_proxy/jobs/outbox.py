"""The webhook message a job's change queues, written in the transaction of that change."""

from __future__ import annotations

from typing import Any

from sqlalchemy import exists, func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from a1111_proxy.db.tables import jobs
from a1111_proxy.deliveries import DeliveryRepository, wants
from a1111_proxy.jobs.records import (
    JOB_COLUMNS,
    AnyRow,
    decode_events,
    snapshot_columns,
    snapshot_json,
)
from a1111_proxy.wakeup import NOTIFY_CHANNEL, OUTBOX_CHANNEL


async def announce(
    deliveries: DeliveryRepository, conn: AsyncConnection, job: AnyRow, event: str, now: float
) -> bool:
    """Queue the webhook message for `event` in this transaction, if the job asked for it.

    `job` carries clauses.WEBHOOK_COLUMNS. Progress is throttled per job. True: queued.
    """
    if not announces(job, event):
        return False
    if event == "progress" and not await deliveries.progress_due(conn, job.seq, now):
        return False
    snapshot = (await conn.execute(select(*JOB_COLUMNS).where(jobs.c.seq == job.seq))).one()
    await deliveries.add(conn, snapshot_columns(snapshot), event, now)
    return True


def announces(job: AnyRow, event: str) -> bool:
    """Did the job (a row with clauses.WEBHOOK_COLUMNS) ask for `event`'s webhook message?"""
    return bool(job.webhook_url) and wants(decode_events(job.webhook_events), event)


def announcing(written: Any, event: str, now: Any) -> tuple[list[Any], list[Any]]:
    """PostgreSQL: announce() within one statement that changes jobs (`written`: a CTE of the
    changed rows, with the columns of JOB_COLUMNS), so that a statement in autocommit keeps
    the outbox's promise: the message is queued if and only if the change commits. Returns
    the CTEs to add to the statement, and columns for its SELECT that NOTIFY the channels
    announce() NOTIFYs when a message was queued."""
    superseded, queued = DeliveryRepository.adding(written, snapshot_json(written), event, now)
    any_queued = exists(select(queued.c.seq))
    told = [
        select(func.pg_notify(channel, "")).where(any_queued).scalar_subquery().label(channel)
        for channel in (OUTBOX_CHANNEL, NOTIFY_CHANNEL)
    ]
    return [superseded, queued], told
