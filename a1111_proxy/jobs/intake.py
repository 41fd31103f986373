"""JobIntake: storing new jobs, always `queued` (machine.py and control.py move them on).

Submits without an idempotency key are committed in groups: each request still waits for its
own commit, but concurrent requests share one transaction. A job that names no checkpoint
takes the default one (POST /options) read in the same transaction (catalogue.py owns it).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError

from a1111_proxy.catalogue import CatalogueStore
from a1111_proxy.db.engine import Database
from a1111_proxy.db.tables import job_payloads, jobs
from a1111_proxy.errors import IdempotencyKeyReused
from a1111_proxy.jobs.records import GENERATIONS, JOB_COLUMNS, AnyRow, JobRecord, job_record
from a1111_proxy.jobs.turns import assign_turns
from a1111_proxy.wakeup import notify

BATCH = 256  # jobs committed in one transaction at most


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
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.catalogue = catalogue
        self.max_attempts = max_attempts
        self.clock = clock
        self._batch: list[tuple[NewJob, asyncio.Future[AnyRow]]] = []
        self._batch_task: asyncio.Task[None] | None = None

    async def submit(self, new: NewJob) -> Submitted:
        """Store a new job durably; return once it is committed."""
        if new.idempotency_key is not None:
            return await self._submit_idempotent(new)
        future: asyncio.Future[AnyRow] = asyncio.get_running_loop().create_future()
        self._batch.append((new, future))
        if self._batch_task is None or self._batch_task.done():
            self._batch_task = asyncio.create_task(self._drain_batches())
        return Submitted(job_record(await future), replayed=False)

    async def _drain_batches(self) -> None:
        while self._batch:
            batch, self._batch = self._batch[:BATCH], self._batch[BATCH:]
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

    async def _insert_many(self, batch: Sequence[NewJob]) -> list[AnyRow]:
        now = self.clock()
        rows = [self._job_values(new, now) for new in batch]
        async with self.db.writing() as conn:
            if any(row["checkpoint"] is None and row["type"] in GENERATIONS for row in rows):
                # Read in the same transaction: a job takes the default set before it was stored.
                default = await self.catalogue.default_checkpoint_in(conn)
                for row in rows:
                    if row["checkpoint"] is None and row["type"] in GENERATIONS:
                        row["checkpoint"] = default
            await assign_turns(conn, rows)
            inserted = (await conn.execute(insert(jobs).returning(*JOB_COLUMNS), rows)).all()
            by_id = {row.id: row for row in inserted}
            await conn.execute(
                insert(job_payloads),
                [
                    {"job_seq": by_id[r["id"]].seq, "body": n.payload}
                    for r, n in zip(rows, batch, strict=True)
                ],
            )
            await notify(self.db, conn)
        return [by_id[r["id"]] for r in rows]

    async def _submit_idempotent(self, new: NewJob) -> Submitted:
        try:
            [row] = await self._insert_many([new])
            return Submitted(job_record(row), replayed=False)
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
            return Submitted(job_record(row), replayed=False)
        if existing.request_hash != new.request_hash:
            raise IdempotencyKeyReused()
        return Submitted(job_record(existing), replayed=True)

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
