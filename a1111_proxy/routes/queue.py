"""`GET /sdapi/v1/queue`: what waits, in claim order, what runs on which slot, and how long.

The estimate: the mean run time (started to completed) of the last 20 jobs completed in the last
24 hours, `mean`; `slots` the distinct usable backends of live workers (workers sharing a URL
count it once; at least the running jobs, at least 1); `busy` the time the running jobs still
need (their A1111 eta, else `mean` minus what they ran). The job at position p starts in about
`(busy + (p - 1) * mean) / slots` seconds; `estimated_wait_seconds` is that for a job submitted
now behind every queued one. With no completed job to learn from, the estimates are null.

A tenant sees its own jobs among the first `limit`, at their places in the whole queue; the
counts and estimates cover every tenant's jobs (numbers only). An admin sees every job.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from a1111_proxy.jobs import JobRepository
from a1111_proxy.routes import context
from a1111_proxy.routes.context import int_param, visible_owner
from a1111_proxy.schemas import iso

SAMPLE = 20


@dataclass(frozen=True)
class Estimate:
    mean: float | None
    busy: float
    slots: int
    sample: int

    def start_in(self, position: int) -> float | None:
        if self.mean is None:
            return None
        return round((self.busy + (position - 1) * self.mean) / self.slots, 1)


async def queue(request: Request) -> Response:
    repo = context.repo(request)
    limit = int_param(request, "limit", default=100, low=1, high=1000)
    queued, total = await repo.queued(limit)
    running = await repo.running()
    estimate = await _estimate(repo, running, context.settings(request).worker_stale_seconds)
    owner = visible_owner(request)  # a tenant sees its own jobs, in their places in the queue

    def shown(row: Any) -> bool:
        return owner is None or row.owner == owner

    return JSONResponse(
        {
            "queued": [
                _queued(row, n, estimate) for n, row in enumerate(queued, start=1) if shown(row)
            ],
            "queued_total": total,
            "running": [
                _running(row)
                for row in sorted(running, key=lambda r: r.backend or "")
                if shown(row)
            ],
            "counts": await repo.counts(),
            "slots": estimate.slots,
            "estimated_wait_seconds": estimate.start_in(total + 1),
            "mean_run_seconds": None if estimate.mean is None else round(estimate.mean, 2),
            "sample_size": estimate.sample,
        }
    )


async def _estimate(repo: JobRepository, running: list[Any], stale_after: float) -> Estimate:
    durations = await repo.recent_durations(SAMPLE)
    mean = sum(durations) / len(durations) if durations else None
    # Workers that share a database list the same A1111 URLs, and each URL runs one job at a
    # time across all of them: count backends, not workers' slots.
    slots = len(
        {
            slot["backend"]
            for worker in await repo.live_workers(stale_after)
            for slot in worker.slots
            if slot.get("state") != "down"
        }
    )
    now = time.time()
    busy = 0.0
    for row in running:
        if row.eta_relative is not None:
            busy += max(0.0, row.eta_relative)
        elif mean is not None:
            busy += max(0.0, mean - (now - (row.started_at or now)))
    return Estimate(mean, busy, max(slots, len(running), 1), len(durations))


def _queued(row: Any, position: int, estimate: Estimate) -> dict[str, Any]:
    return {
        "position": position,
        "id": row.id,
        "type": row.type,
        "priority": row.priority,
        "attempts": row.attempts,
        "created_at": iso(row.created_at),
        "retry_at": iso(row.run_after) if row.attempts and row.run_after > time.time() else None,
        "deadline_at": iso(row.deadline_at),
        "estimated_start_seconds": estimate.start_in(position),
    }


def _running(row: Any) -> dict[str, Any]:
    return {
        "backend": row.backend,
        "id": row.id,
        "type": row.type,
        "priority": row.priority,
        "attempts": row.attempts,
        "progress": row.progress,
        "eta_relative": row.eta_relative,
        "started_at": iso(row.started_at),
        "deadline_at": iso(row.deadline_at),
    }
