"""The webhook message a job's change queues, written in the transaction of that change."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from a1111_proxy.db.tables import jobs
from a1111_proxy.deliveries import DeliveryRepository, wants
from a1111_proxy.jobs.records import JOB_COLUMNS, AnyRow, decode_events, snapshot_columns


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
