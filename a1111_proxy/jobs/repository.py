"""JobRepository: one object for the API and the worker, composed of the parts that own the
job tables. Each method hands over to its owner (see the package docstring), whose docstring
tells what it does."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from a1111_proxy.catalogue import CatalogueStore
from a1111_proxy.db.engine import Database
from a1111_proxy.deliveries import DeliveryRepository
from a1111_proxy.jobs.clauses import JobFilter
from a1111_proxy.jobs.control import JobControl
from a1111_proxy.jobs.intake import NO_LIMITS, BatchKey, JobIntake, NewJob, Submitted, TenantLimits
from a1111_proxy.jobs.machine import JobMachine, Touch
from a1111_proxy.jobs.metrics import JobMetrics, JobMetricsQueries
from a1111_proxy.jobs.placement import Slots
from a1111_proxy.jobs.reads import JobReads
from a1111_proxy.jobs.records import Claim, JobPage, JobRecord, JobState, WorkerRecord
from a1111_proxy.jobs.retention import Retention
from a1111_proxy.jobs.workers import WorkerRegistry
from a1111_proxy.wakeup import WORK_CHANNEL, notify


class JobRepository:
    def __init__(
        self,
        db: Database,
        *,
        max_attempts: int = 3,
        lease_seconds: float = 30.0,
        clock: Callable[[], float] = time.time,
        catalogue: CatalogueStore | None = None,
        limits: TenantLimits = NO_LIMITS,
        batch_key: BatchKey | None = None,
    ) -> None:
        self.db = db
        self.deliveries = DeliveryRepository(db, clock=clock)
        self.intake = JobIntake(
            db,
            catalogue or CatalogueStore(db, clock),
            max_attempts=max_attempts,
            limits=limits,
            batch_key=batch_key,
            clock=clock,
        )
        self.machine = JobMachine(db, self.deliveries, lease_seconds=lease_seconds, clock=clock)
        self.control = JobControl(db, self.deliveries, clock=clock)
        self.reads = JobReads(db, clock=clock)
        self.workers = WorkerRegistry(db, clock=clock)
        self.retention = Retention(db, self.deliveries)
        self.job_metrics = JobMetricsQueries(db, clock=clock)

    # --- storing new jobs (intake.py) --------------------------------------------------------

    async def submit(self, new: NewJob) -> Submitted:
        return await self.intake.submit(new)

    # --- the worker's lease (machine.py) -----------------------------------------------------

    async def claim(
        self, owner: str, slots: Slots, *, batch: int = 1, key: str | None = None
    ) -> list[tuple[int, Claim]]:
        return await self.machine.claim(owner, slots, batch=batch, key=key)

    async def touch(
        self,
        claim: Claim,
        *,
        progress: float | None = None,
        eta: float | None = None,
        preview: str | None = None,
    ) -> Touch:
        return await self.machine.touch(claim, progress=progress, eta=eta, preview=preview)

    async def requests(self, claim: Claim) -> Touch:
        return await self.machine.requests(claim)

    async def clear_skip(self, claim: Claim) -> None:
        await self.machine.clear_skip(claim)

    async def complete(
        self,
        claim: Claim,
        result: Any,
        images: list[bytes],
        *,
        status: str = "completed",
        error: str | None = None,
    ) -> bool:
        return await self.machine.complete(claim, result, images, status=status, error=error)

    async def finish(self, claim: Claim, status: str, error: str | None) -> bool:
        return await self.machine.finish(claim, status, error)

    async def requeue(self, claim: Claim, delay: float, error: str | None) -> bool:
        return await self.machine.requeue(claim, delay, error)

    async def release(self, claim: Claim) -> bool:
        return await self.machine.release(claim)

    # --- changes from outside a lease (control.py) -------------------------------------------

    async def cancel(self, job_id: str) -> JobRecord | None:
        return await self.control.cancel(job_id)

    async def cancel_queued(self, job_id: str, code: str, message: str) -> bool:
        return await self.control.cancel_queued(job_id, code, message)

    async def interrupt_running(self, *, owner: str | None, job_id: str | None = None) -> int:
        return await self.control.interrupt_running(owner=owner, job_id=job_id)

    async def skip_running(self, *, owner: str | None, job_id: str | None = None) -> int:
        return await self.control.skip_running(owner=owner, job_id=job_id)

    async def watch(self, seq: int, *, preview: bool = False) -> None:
        await self.control.watch(seq, preview=preview)

    async def reap_expired(self) -> list[tuple[str, str]]:
        return await self.control.reap_expired()

    async def expire_deadlines(self) -> tuple[list[str], list[str]]:
        return await self.control.expire_deadlines()

    # --- reads (reads.py) --------------------------------------------------------------------

    async def get(self, job_id: str) -> JobRecord | None:
        return await self.reads.get(job_id)

    async def page(
        self,
        *,
        status: str | None = None,
        type: str | None = None,
        owner: str | None = None,
        before_seq: int | None = None,
        limit: int = 50,
    ) -> list[JobRecord]:
        return await self.reads.page(
            status=status, type=type, owner=owner, before_seq=before_seq, limit=limit
        )

    async def listing(
        self, where: JobFilter, *, before_seq: int | None = None, limit: int = 50
    ) -> JobPage:
        return await self.reads.listing(where, before_seq=before_seq, limit=limit)

    async def images(self, seq: int) -> list[bytes]:
        return await self.reads.images(seq)

    async def image(self, seq: int, n: int) -> bytes | None:
        return await self.reads.image(seq, n)

    async def preview(self, seq: int) -> str | None:
        return await self.reads.preview(seq)

    async def webhook_secret(self, seq: int) -> str | None:
        return await self.reads.webhook_secret(seq)

    async def owned(self, owner: str, job_id: str) -> JobRecord | None:
        return await self.reads.owned(owner, job_id)

    async def shown(
        self, job_id: str, owner: str | None
    ) -> tuple[JobRecord, list[bytes] | None, int | None] | None:
        return await self.reads.shown(job_id, owner)

    async def progress_of(
        self, owner: str, job_id: str | None, *, with_preview: bool
    ) -> tuple[JobRecord | None, int, str | None]:
        return await self.reads.progress_of(owner, job_id, with_preview=with_preview)

    async def queued(self, limit: int) -> tuple[list[JobRecord], int]:
        return await self.reads.queued(limit)

    async def queue_position(self, job: JobRecord) -> int | None:
        return await self.reads.queue_position(job)

    async def running(self) -> list[JobRecord]:
        return await self.reads.running()

    async def counts(self) -> dict[str, int]:
        return await self.reads.counts()

    async def recent_durations(self, limit: int = 20, within: float = 86400.0) -> list[float]:
        return await self.reads.recent_durations(limit, within)

    async def has_due_job(self) -> bool:
        return await self.reads.has_due_job()

    async def has_expired_deadline(self) -> bool:
        return await self.reads.has_expired_deadline()

    async def busy_elsewhere(self, owner: str, backends: Sequence[str]) -> set[str]:
        return await self.reads.busy_elsewhere(owner, backends)

    async def snapshots(self, ids: Sequence[str]) -> dict[str, JobState]:
        return await self.reads.snapshots(ids)

    async def ping(self) -> None:
        await self.reads.ping()

    # --- /metrics (metrics.py), the worker registry (workers.py), retention (retention.py) ---

    async def metrics(
        self, window: float, claim_buckets: Sequence[float], duration_buckets: Sequence[float]
    ) -> JobMetrics:
        return await self.job_metrics.metrics(window, claim_buckets, duration_buckets)

    async def beat_worker(
        self, worker_id: str, started_at: float, slots: list[dict[str, Any]]
    ) -> None:
        await self.workers.beat(worker_id, started_at, slots)

    async def forget_worker(self, worker_id: str) -> None:
        await self.workers.forget(worker_id)

    async def nudge_workers(self) -> None:
        """Wake the workers' dispatchers (a backend was left for the worker whose share it is:
        worker/shares.py). PostgreSQL: a NOTIFY on their channel; SQLite: every commit wakes
        them already."""
        if not self.db.is_sqlite:
            async with self.db.writing() as conn:
                await notify(self.db, conn, WORK_CHANNEL)

    async def live_workers(self, stale_after: float) -> list[WorkerRecord]:
        return await self.workers.live(stale_after)

    async def purge_finished(self, older_than: float, batch: int = 100) -> int:
        return await self.retention.purge_finished(older_than, batch)

    async def reclaim_space(self, pages: int = 2000) -> int:
        return await self.retention.reclaim_space(pages)
