"""Chores that keep the database in shape: deadlines (Cancel-After / timeout) and retention.

Both run beside the jobs in tasks of their own (worker/loop.py `Chore`), in short transactions,
so they never hold up a claim for long. Every worker process runs them; the statements are
idempotent, so several workers doing so at once is harmless.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from a1111_proxy.jobs import JobRepository

log = logging.getLogger("a1111_proxy.worker")

PURGE_BATCH = 100  # jobs per transaction
PURGE_BATCHES_PER_TICK = 50  # at most 5000 jobs a tick; the rest next time


class Deadlines:
    """Queued jobs past their deadline end canceled ("deadline"); running ones are interrupted
    (they end canceled, "deadline", through the same path as a cancel)."""

    def __init__(self, repo: JobRepository, interval: float) -> None:
        self.repo = repo
        self.interval = interval

    async def tick(self) -> None:
        if not await self.repo.has_expired_deadline():
            return
        canceled, interrupted = await self.repo.expire_deadlines()
        for job_id in canceled:
            log.info("job %s: canceled, its deadline passed before it started", job_id)
        for job_id in interrupted:
            log.info("job %s: interrupting, its deadline passed while it ran", job_id)

    async def aclose(self) -> None:
        return None


class Retention:
    """Deletes finished jobs older than `seconds` (with their images, payloads, previews and
    webhook deliveries), `PURGE_BATCH` per transaction, then lets SQLite give the space back."""

    def __init__(
        self,
        repo: JobRepository,
        seconds: float,
        interval: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.repo = repo
        self.seconds = seconds
        self.interval = interval
        self.clock = clock

    async def tick(self) -> None:
        await self.purge()

    async def purge(self) -> int:
        """One round: returns how many jobs were deleted."""
        if self.seconds <= 0:
            return 0  # RETENTION_SECONDS=0: keep forever
        cutoff = self.clock() - self.seconds
        deleted = 0
        for _ in range(PURGE_BATCHES_PER_TICK):
            batch = await self.repo.purge_finished(cutoff, PURGE_BATCH)
            deleted += batch
            if batch < PURGE_BATCH:
                break
            await asyncio.sleep(0)  # let a waiting claim have the writer between batches
        if deleted:
            free = await self.repo.reclaim_space()
            log.info(
                "retention: deleted %d finished job(s) older than %.0f s%s",
                deleted,
                self.seconds,
                f"; {free} free page(s) left" if self.repo.db.is_sqlite else "",
            )
        return deleted

    async def aclose(self) -> None:
        return None
