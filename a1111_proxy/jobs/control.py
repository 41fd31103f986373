"""JobControl: the state changes made from outside a worker's lease.

The API's cancel (at once for a queued job; a running one is asked to stop), A1111's /interrupt
and /skip over a caller's running jobs, the API's note that someone looks at a job's progress
or live preview (watch), and the worker's two sweeps: leases that ran out (the
worker died) and deadlines that passed. With machine.py, the only code that changes a job's
status; each status change queues its webhook message in the same transaction (outbox.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from sqlalchemy import case, literal, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from a1111_proxy.db.engine import Database, unavailable, why_unavailable
from a1111_proxy.db.tables import jobs
from a1111_proxy.deliveries import DeliveryRepository
from a1111_proxy.jobs.clauses import (
    DEADLINE_ERROR,
    NO_LEASE,
    WEBHOOK_COLUMNS,
    cancel_error,
    of_owner,
    past_deadline,
)
from a1111_proxy.jobs.outbox import announce
from a1111_proxy.jobs.records import JOB_COLUMNS, TERMINAL, JobRecord, error_json, job_record
from a1111_proxy.wakeup import DUE, notify

log = logging.getLogger("a1111_proxy.jobs")

# A job's worker reads its progress often (and fetches live previews, when those were looked
# at) for this long after someone last looked; a watcher renews it when less than half is left
# (so at most one write per job every 10 s for each API process, however often it polls).
WATCH_SECONDS = 20.0


class JobControl:
    def __init__(
        self,
        db: Database,
        deliveries: DeliveryRepository,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.deliveries = deliveries
        self.clock = clock
        # (job seq, with its preview) -> the watch this process stored
        self._watched: dict[tuple[int, bool], float] = {}

    # --- cancel, interrupt, skip (the API's side) --------------------------------------------

    async def cancel(self, job_id: str) -> JobRecord | None:
        """Cancel a queued job at once; ask the worker to interrupt a running one.

        A terminal job is left as it is. Returns the job, or None if there is no such job.
        """
        now = self.clock()
        async with self.db.writing() as conn:
            await self._cancel_if_queued(
                conn, job_id, error_json("canceled", "canceled before it started"), now
            )
            await conn.execute(
                update(jobs)
                .where(
                    jobs.c.id == job_id,
                    jobs.c.status == "processing",
                    jobs.c.cancel_requested_at.is_(None),
                )
                .values(cancel_requested_at=now, updated_at=now)
            )
            row = (
                await conn.execute(select(*JOB_COLUMNS).where(jobs.c.id == job_id))
            ).one_or_none()
            await notify(self.db, conn)
        return None if row is None else job_record(row)

    async def cancel_queued(self, job_id: str, code: str, message: str) -> bool:
        """Cancel the job only if it has not started (a waiting client that went away, or no
        backend to run it). True if it was canceled."""
        now = self.clock()
        async with self.db.writing() as conn:
            done = await self._cancel_if_queued(conn, job_id, error_json(code, message), now)
            if done:
                await notify(self.db, conn)
        return done

    async def _cancel_if_queued(
        self, conn: AsyncConnection, job_id: str, error: str, now: float
    ) -> bool:
        canceled = (
            await conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.status == "queued")
                .values(status="canceled", completed_at=now, updated_at=now, error=error)
                .returning(*WEBHOOK_COLUMNS)
            )
        ).one_or_none()
        if canceled is not None:
            await announce(self.deliveries, conn, canceled, "completed", now)
        return canceled is not None

    async def interrupt_running(self, *, owner: str | None, job_id: str | None = None) -> int:
        """A1111's /interrupt over `owner`'s jobs: each of its running jobs (or the one
        `job_id` names) is asked to stop."""
        now = self.clock()
        stmt = (
            update(jobs)
            .where(
                *of_owner(owner, job_id),
                jobs.c.status == "processing",
                jobs.c.cancel_requested_at.is_(None),
            )
            .values(cancel_requested_at=now, updated_at=now)
        )
        async with self.db.writing() as conn:
            return (await conn.execute(stmt)).rowcount

    async def skip_running(self, *, owner: str | None, job_id: str | None = None) -> int:
        """A1111's /skip over `owner`'s jobs: each of its running jobs (or the one `job_id`
        names) skips its current batch."""
        now = self.clock()
        stmt = (
            update(jobs)
            .where(*of_owner(owner, job_id), jobs.c.status == "processing")
            .values(skip_requested_at=now, updated_at=now)
        )
        async with self.db.writing() as conn:
            return (await conn.execute(stmt)).rowcount

    async def watch(self, seq: int, *, preview: bool = False) -> None:
        """Someone looks at the job's progress (a read of the job), or with `preview` at its
        live preview too (its event stream, A1111's /progress with its image): for the next
        WATCH_SECONDS its worker reads its progress every PROGRESS_SECONDS, not every few
        seconds, and fetches its previews. Only then, because a progress read is a request to
        the A1111 and a write here, twice a second for every running job, and a preview costs
        the A1111 an image encode besides.

        Only a running job is marked (its worker's first progress read comes at its first tick
        anyway): on PostgreSQL the write locks the row for a moment, and a claim passes over a
        locked queued job (SKIP LOCKED), so marking queued jobs made a claim miss a job that a
        client was polling and leave it waiting for the next look at the queue."""
        now = self.clock()
        if self._watched.get((seq, preview), 0.0) - now > WATCH_SECONDS / 2:
            return
        until = now + WATCH_SECONDS
        wanted = {"progress_wanted_until": until}
        if preview:
            wanted["preview_wanted_until"] = until
        stmt = update(jobs).where(jobs.c.seq == seq, jobs.c.status == "processing").values(**wanted)
        try:
            async with self.db.writing_alone() as conn:
                marked = (await conn.execute(stmt)).rowcount
        except Exception as exc:  # best effort: the stream or the read goes on without
            if not unavailable(exc):
                raise
            log.warning("could not note that job %s is watched: %s", seq, why_unavailable(exc))
            return
        if not marked:  # not running (yet): the next look tries again
            return
        self._watched = {s: t for s, t in self._watched.items() if t > now}
        self._watched[(seq, preview)] = until
        if preview:  # it covers the progress too
            self._watched[(seq, False)] = until

    # --- sweeps: lost leases and deadlines ---------------------------------------------------

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
                error=case(
                    (canceling, cancel_error(jobs.c.error)),
                    (exhausted, literal(lost)),
                    else_=jobs.c.error,
                ),
                completed_at=case((canceling | exhausted, now), else_=None),
                run_after=now,
                progress=case((canceling | exhausted, jobs.c.progress), else_=0.0),
                updated_at=now,
                **NO_LEASE,
            )
            .returning(jobs.c.id, jobs.c.status, *WEBHOOK_COLUMNS)
        )
        async with self.db.writing() as conn:
            rows = (await conn.execute(stmt)).all()
            for row in rows:
                if row.status in TERMINAL:
                    await announce(self.deliveries, conn, row, "completed", now)
            if rows:
                await notify(self.db, conn, *DUE)
        return [(row.id, row.status) for row in rows]

    async def expire_deadlines(self) -> tuple[list[str], list[str]]:
        """Queued jobs past their deadline end `canceled` ("deadline"); running ones are asked to
        stop, as a cancel would (their worker interrupts them and they end canceled, "deadline").
        Returns (canceled ids, interrupted ids)."""
        now = self.clock()
        expired = past_deadline(now)
        async with self.db.writing() as conn:
            canceled = (
                await conn.execute(
                    update(jobs)
                    .where(expired, jobs.c.status == "queued")
                    .values(
                        status="canceled", completed_at=now, updated_at=now, error=DEADLINE_ERROR
                    )
                    .returning(jobs.c.id, *WEBHOOK_COLUMNS)
                )
            ).all()
            for row in canceled:
                await announce(self.deliveries, conn, row, "completed", now)
            interrupted = (
                await conn.execute(
                    update(jobs)
                    .where(
                        expired, jobs.c.status == "processing", jobs.c.cancel_requested_at.is_(None)
                    )
                    .values(cancel_requested_at=now, updated_at=now)  # now >= deadline_at
                    .returning(jobs.c.id)
                )
            ).all()
            if canceled or interrupted:
                await notify(self.db, conn)
        return [row.id for row in canceled], [row.id for row in interrupted]
