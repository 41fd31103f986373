"""The job store: the only code that issues SQL for the job tables (jobs, job_payloads,
job_images, job_previews) and the workers table.

The state machine (ARCHITECTURE.md, "Job"):

    queued --claim--> processing --complete--> completed
      |  ^                |  |----fail------> error
      |  +--requeue/------+  |----canceled---> canceled   (cancel requested while running)
      |     release/reap     +--reap, attempts exhausted--> error ("worker lost")
      +--cancel, or its deadline passed--> canceled
    (a running job past its deadline is asked to stop like a cancel; it ends canceled, "deadline")

Jobs are born queued (intake.py); only machine.py and control.py change a job's status.

    records.py    JobRecord, JobState, Claim, WorkerRecord: rows decoded once (the only json
                  decoding of these columns)
    intake.py     submit: new jobs, always queued (grouped commits, idempotency keys)
    machine.py    the worker's lease: claim, progress, complete, fail, requeue, release, all
                  fenced by the lease token
    placement.py  which slots may take a job in a claim (one job per backend), and where each goes
    control.py    cancel, interrupt, skip, and the sweeps of lost leases and deadlines
    outbox.py     the webhook message a change queues, in the transaction of that change
    reads.py      job views, listings (by status, type, owner, checkpoint, prompt text), the
                  queue, one caller's jobs, snapshots for streams
    metrics.py    the aggregate queries behind /metrics
    workers.py    the worker registry (heartbeats)
    retention.py  deleting old finished jobs; SQLite's incremental vacuum
    clauses.py    SQL fragments the writers and readers share
    repository.py JobRepository: one object composed of the above, for the API and the worker
"""

from __future__ import annotations

from a1111_proxy.jobs.clauses import JobFilter
from a1111_proxy.jobs.intake import NewJob, Submitted, TenantLimits
from a1111_proxy.jobs.machine import Touch, retry_delay
from a1111_proxy.jobs.metrics import Histogram, JobMetrics
from a1111_proxy.jobs.records import (
    GENERATIONS,
    TERMINAL,
    Claim,
    JobPage,
    JobRecord,
    JobState,
    WorkerRecord,
    error_json,
    job_record,
    snapshot_record,
)
from a1111_proxy.jobs.repository import JobRepository

__all__ = [
    "GENERATIONS",
    "TERMINAL",
    "Claim",
    "Histogram",
    "JobFilter",
    "JobMetrics",
    "JobPage",
    "JobRecord",
    "JobRepository",
    "JobState",
    "NewJob",
    "Submitted",
    "TenantLimits",
    "Touch",
    "WorkerRecord",
    "error_json",
    "job_record",
    "retry_delay",
    "snapshot_record",
]
