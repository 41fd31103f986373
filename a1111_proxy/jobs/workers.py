"""WorkerRegistry: the workers' heartbeats (the `workers` table), read by health, metrics, the
queue's estimate and wait mode's fail-fast."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import delete, insert, select, update

from a1111_proxy.db.engine import Database
from a1111_proxy.db.tables import workers
from a1111_proxy.jobs.records import WorkerRecord, worker_record
from a1111_proxy.redaction import scrub_all

FORGET_AFTER_SECONDS = 86400.0  # a worker silent this long is dropped from the table


class WorkerRegistry:
    def __init__(self, db: Database, *, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.clock = clock

    async def beat(self, worker_id: str, started_at: float, slots: list[dict[str, Any]]) -> None:
        """Record that the worker is alive, and its slots as it describes them now (backend
        names and errors without credentials)."""
        now = self.clock()
        body = json.dumps(scrub_all(slots))
        async with self.db.writing() as conn:
            done = await conn.execute(
                update(workers)
                .where(workers.c.id == worker_id)
                .values(heartbeat_at=now, slots=body)
            )
            if done.rowcount == 0:
                await conn.execute(
                    insert(workers).values(
                        id=worker_id, started_at=started_at, heartbeat_at=now, slots=body
                    )
                )
            # Forget workers that stopped long ago, so health reflects the living.
            await conn.execute(
                delete(workers).where(workers.c.heartbeat_at < now - FORGET_AFTER_SECONDS)
            )

    async def forget(self, worker_id: str) -> None:
        async with self.db.writing() as conn:
            await conn.execute(delete(workers).where(workers.c.id == worker_id))

    async def live(self, stale_after: float) -> list[WorkerRecord]:
        """Workers with a heartbeat in the last `stale_after` seconds, by id."""
        query = select(workers).where(workers.c.heartbeat_at >= self.clock() - stale_after)
        async with self.db.reading() as conn:
            rows = (await conn.execute(query.order_by(workers.c.id))).all()
        return [worker_record(row) for row in rows]
