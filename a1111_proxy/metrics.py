"""`/metrics` in Prometheus text, computed from the database on each scrape.

Every number comes from the shared database (not from process memory), so any number of API
replicas behind a load balancer report the same values, and a restart loses nothing. The two
histograms are gauge histograms over a recent window (METRICS_WINDOW_SECONDS): they describe
the last minutes, not a count since start, so `histogram_quantile()` applies to the buckets
directly, without `rate()`.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeHistogramMetricFamily, GaugeMetricFamily, Metric

from a1111_proxy.jobs import Histogram, JobMetrics, JobRepository, WorkerRecord

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # what generate_latest writes (names are plain ASCII)
CLAIM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
SLOT_STATES = ("idle", "busy", "down")


async def render(repo: JobRepository, window: float, stale_after: float) -> bytes:
    """The whole exposition, read in a few short queries."""
    jobs = await repo.metrics(window, CLAIM_BUCKETS, DURATION_BUCKETS)
    deliveries = await repo.deliveries.counts()
    workers = await repo.live_workers(stale_after)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collected(list(_families(jobs, deliveries, workers, window))))
    return generate_latest(registry)


class _Collected:
    """A prometheus_client collector that yields metric families read beforehand."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def _families(
    jobs: JobMetrics,
    deliveries: dict[str, dict[str, int]],
    workers: list[WorkerRecord],
    window: float,
) -> Iterator[Metric]:
    by_status = GaugeMetricFamily(
        "a1111_proxy_jobs", "Jobs in the database by status", labels=["status"]
    )
    for status, n in jobs.by_status.items():
        by_status.add_metric([status], n)
    yield by_status
    yield GaugeMetricFamily(
        "a1111_proxy_queue_depth", "Queued jobs that are due to run now", value=jobs.due
    )
    yield GaugeMetricFamily(
        "a1111_proxy_queue_oldest_age_seconds",
        "How long the oldest due job has waited (0 when none)",
        value=round(jobs.oldest_due_age, 3),
    )
    claims = GaugeHistogramMetricFamily(
        "a1111_proxy_claim_latency_seconds",
        f"Submit to first start, for jobs started in the last {window:.0f} s",
    )
    _add(claims, [], jobs.claim_latency, CLAIM_BUCKETS)
    yield claims
    durations = GaugeHistogramMetricFamily(
        "a1111_proxy_job_duration_seconds",
        f"Start to end, for jobs that ended in the last {window:.0f} s, by end status",
        labels=["status"],
    )
    for status, histogram in sorted(jobs.durations.items()):
        _add(durations, [status], histogram, DURATION_BUCKETS)
    yield durations
    yield from _backend_families(jobs, workers)
    hooks = GaugeMetricFamily(
        "a1111_proxy_webhook_deliveries",
        "Webhook messages in the outbox by event and outcome",
        labels=["event", "status"],
    )
    for event, statuses in sorted(deliveries.items()):
        for status, n in sorted(statuses.items()):
            hooks.add_metric([event, status], n)
    yield hooks


def _add(
    family: GaugeHistogramMetricFamily,
    labels: list[str],
    histogram: Histogram,
    bounds: tuple[float, ...],
) -> None:
    buckets = [(_bound(b), n) for b, n in zip(bounds, histogram.counts, strict=False)]
    buckets.append(("+Inf", histogram.counts[-1]))
    family.add_metric(labels, buckets, gsum_value=round(histogram.total, 6))


def _bound(value: float) -> str:
    return repr(float(value))


def _backend_families(jobs: JobMetrics, workers: list[WorkerRecord]) -> Iterator[Metric]:
    """Each backend's state as a set of 0/1 gauges: busy when a job runs on it (any worker),
    down when every live worker that drives it finds it unreachable, else idle."""
    reports: dict[str, list[str]] = {}
    for worker in workers:
        for slot in worker.slots:
            reports.setdefault(slot["backend"], []).append(slot["state"])
    for name in jobs.busy_backends:
        reports.setdefault(name, [])
    state = GaugeMetricFamily(
        "a1111_proxy_backend_state",
        "1 for the state each backend is in (idle, busy, down), else 0",
        labels=["backend", "state"],
    )
    for name in sorted(reports):
        now = _state(jobs.busy_backends.get(name, 0), reports[name])
        for candidate in SLOT_STATES:
            state.add_metric([name, candidate], 1 if candidate == now else 0)
    yield state
    running = GaugeMetricFamily(
        "a1111_proxy_backend_running_jobs",
        "Jobs running on each backend now (more than 1: compatible jobs as one engine batch)",
        labels=["backend"],
    )
    for name in sorted(reports):
        running.add_metric([name], jobs.busy_backends.get(name, 0))
    yield running
    yield GaugeMetricFamily(
        "a1111_proxy_workers", "Workers with a recent heartbeat", value=len(workers)
    )


def _state(running: int, reported: list[str]) -> str:
    if running:
        return "busy"
    if reported and all(r == "down" for r in reported):
        return "down"
    return "idle"
