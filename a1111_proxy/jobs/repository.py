"""JobRepository: one object for the API and the worker, composed of the parts that own the
job tables. Each operation is the owner's own method (see the package docstring)."""

from __future__ import annotations

import time
from collections.abc import Callable

from a1111_proxy.catalogue import CatalogueStore
from a1111_proxy.db.engine import Database
from a1111_proxy.deliveries import DeliveryRepository
from a1111_proxy.jobs.control import JobControl
from a1111_proxy.jobs.intake import JobIntake
from a1111_proxy.jobs.machine import JobMachine
from a1111_proxy.jobs.metrics import JobMetricsQueries
from a1111_proxy.jobs.reads import JobReads
from a1111_proxy.jobs.retention import Retention
from a1111_proxy.jobs.workers import WorkerRegistry


class JobRepository:
    def __init__(
        self,
        db: Database,
        *,
        max_attempts: int = 3,
        lease_seconds: float = 30.0,
        clock: Callable[[], float] = time.time,
        catalogue: CatalogueStore | None = None,
    ) -> None:
        self.db = db
        self.clock = clock
        self.deliveries = DeliveryRepository(db, clock=clock)
        self.intake = JobIntake(db, catalogue or CatalogueStore(db, clock),
                                max_attempts=max_attempts, clock=clock)
        self.machine = JobMachine(db, self.deliveries, lease_seconds=lease_seconds, clock=clock)
        self.control = JobControl(db, self.deliveries, clock=clock)
        self.reads = JobReads(db, clock=clock)
        self.workers = WorkerRegistry(db, clock=clock)
        self.retention = Retention(db, self.deliveries)
        self.job_metrics = JobMetricsQueries(db, clock=clock)

        # Storing new jobs.
        self.submit = self.intake.submit
        # The worker's lease: the claim and the lease holder's fenced writes.
        self.claim = self.machine.claim
        self.touch = self.machine.touch
        self.requests = self.machine.requests
        self.clear_skip = self.machine.clear_skip
        self.complete = self.machine.complete
        self.finish = self.machine.finish
        self.requeue = self.machine.requeue
        self.release = self.machine.release
        # Changes from outside the lease: the API's cancel, interrupt, skip; the sweeps.
        self.cancel = self.control.cancel
        self.cancel_queued = self.control.cancel_queued
        self.interrupt_running = self.control.interrupt_running
        self.skip_running = self.control.skip_running
        self.reap_expired = self.control.reap_expired
        self.expire_deadlines = self.control.expire_deadlines
        # Reads.
        self.get = self.reads.get
        self.page = self.reads.page
        self.images = self.reads.images
        self.image = self.reads.image
        self.preview = self.reads.preview
        self.webhook_secret = self.reads.webhook_secret
        self.owned = self.reads.owned
        self.running_of = self.reads.running_of
        self.active_count_of = self.reads.active_count_of
        self.queued = self.reads.queued
        self.queue_position = self.reads.queue_position
        self.running = self.reads.running
        self.counts = self.reads.counts
        self.recent_durations = self.reads.recent_durations
        self.has_due_job = self.reads.has_due_job
        self.has_expired_deadline = self.reads.has_expired_deadline
        self.busy_elsewhere = self.reads.busy_elsewhere
        self.snapshots = self.reads.snapshots
        self.ping = self.reads.ping
        # /metrics, the worker registry, retention.
        self.metrics = self.job_metrics.metrics
        self.beat_worker = self.workers.beat
        self.forget_worker = self.workers.forget
        self.live_workers = self.workers.live
        self.purge_finished = self.retention.purge_finished
        self.reclaim_space = self.retention.reclaim_space
