"""JobMetricsQueries: what /metrics shows about jobs, as aggregate queries.

Read from the database, so that every API replica reports the same numbers. Histograms cover a
recent window: claim latency (created -> first started) of jobs started in it, and duration
(started -> ended) of jobs that ended in it, by end status. Each histogram is one query.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, case, func, select

from a1111_proxy.db.engine import Database
from a1111_proxy.db.tables import STATUSES, jobs
from a1111_proxy.jobs.records import TERMINAL, AnyRow
from a1111_proxy.redaction import backend_name


@dataclass(frozen=True, slots=True)
class Histogram:
    counts: list[int]  # cumulative, one per bucket bound, then +Inf
    total: float


@dataclass(frozen=True, slots=True)
class JobMetrics:
    by_status: dict[str, int]
    due: int  # queued and due now
    oldest_due_age: float  # seconds the oldest due job has waited; 0 when none
    busy_backends: dict[str, int]  # backend name -> jobs running on it (more than 1: a batch)
    claim_latency: Histogram
    durations: dict[str, Histogram]  # by end status


class JobMetricsQueries:
    def __init__(self, db: Database, *, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.clock = clock

    async def metrics(
        self, window: float, claim_buckets: Sequence[float], duration_buckets: Sequence[float]
    ) -> JobMetrics:
        """Counts now, and the histograms of the last `window` seconds."""
        now = self.clock()
        since = now - window
        recent_end = and_(jobs.c.completed_at >= since, jobs.c.started_at.is_not(None))
        waited = jobs.c.started_at - jobs.c.created_at
        ran = jobs.c.completed_at - jobs.c.started_at
        async with self.db.reading() as conn:
            by_status: dict[str, int] = dict(
                (
                    await conn.execute(select(jobs.c.status, func.count()).group_by(jobs.c.status))
                ).all()
            )
            due, oldest = (
                await conn.execute(
                    select(func.count(), func.min(jobs.c.created_at)).where(
                        jobs.c.status == "queued", jobs.c.run_after <= now
                    )
                )
            ).one()
            busy: dict[str | None, int] = dict(
                (
                    await conn.execute(
                        select(jobs.c.backend, func.count())
                        .where(jobs.c.status == "processing")
                        .group_by(jobs.c.backend)
                    )
                ).all()
            )
            claims = (
                await conn.execute(
                    _histogram(waited, claim_buckets).where(
                        (jobs.c.status == "processing") | recent_end,
                        jobs.c.started_at >= since,
                    )
                )
            ).one()
            durations = (
                await conn.execute(
                    _histogram(ran, duration_buckets, jobs.c.status)
                    .where(recent_end, jobs.c.status.in_(TERMINAL))
                    .group_by(jobs.c.status)
                )
            ).all()
        return JobMetrics(
            by_status={status: by_status.get(status, 0) for status in STATUSES},
            due=due,
            oldest_due_age=now - oldest if oldest is not None else 0.0,
            busy_backends={backend_name(name): n for name, n in busy.items() if name},
            claim_latency=_buckets(claims, claim_buckets),
            durations={row.label: _buckets(row, duration_buckets) for row in durations},
        )


def _histogram(
    value: ColumnElement[Any], bounds: Sequence[float], *label: ColumnElement[Any]
) -> Select[Any]:
    """SELECT [label,] count(value <= b) for each bound, count(*), sum(value)."""
    columns = [
        func.sum(case((value <= bound, 1), else_=0)).label(f"le{i}")
        for i, bound in enumerate(bounds)
    ]
    named = [column.label("label") for column in label]
    return select(
        *named,
        *columns,
        func.count().label("n"),
        func.coalesce(func.sum(value), 0.0).label("total"),
    )


def _buckets(row: AnyRow, bounds: Sequence[float]) -> Histogram:
    counts = [int(getattr(row, f"le{i}") or 0) for i in range(len(bounds))]
    return Histogram(counts=[*counts, int(row.n)], total=float(row.total))
