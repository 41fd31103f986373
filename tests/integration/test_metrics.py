"""/metrics: Prometheus text computed from the database, the same on every API replica."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from a1111_proxy.app import create_app
from a1111_proxy.db.engine import Database
from a1111_proxy.jobs import JobRepository, NewJob
from tests.claims import claim_next
from tests.fakes.clock import Clock
from tests.servers import ASYNC, serve


def _job(prompt: str, hook: bool = False) -> NewJob:
    body = json.dumps({"prompt": prompt})
    return NewJob(
        "txt2img",
        request=body,
        payload=body,
        webhook_url="https://example.com/hook" if hook else None,
        webhook_events='["completed"]' if hook else None,
    )


async def _history(url: str) -> None:
    """Two jobs that waited 1 s and ran 2 s and 40 s (one with a webhook), one running on
    http://a, one queued, one canceled before it started; two workers, http://b down in both."""
    clock = Clock(time.time() - 60)
    db = Database(url)
    repo = JobRepository(db, clock=clock)
    for prompt, ran, backend in (("quick", 2.0, "http://a"), ("slow", 40.0, "http://b")):
        await repo.submit(_job(prompt, hook=prompt == "quick"))
        clock.now += 1
        claim = await claim_next(repo, "w1", backend)
        assert claim is not None
        clock.now += ran
        await repo.complete(claim, {"images": []}, [])
    await repo.submit(_job("running"))
    assert await claim_next(repo, "w1", "http://a") is not None
    await repo.submit(_job("queued"))
    canceled = (await repo.submit(_job("canceled"))).job.id
    await repo.cancel(canceled)
    clock.now = time.time()
    for worker in ("w1", "w2"):
        await repo.beat_worker(
            worker,
            clock.now,
            [
                {"backend": "http://a", "state": "busy" if worker == "w1" else "idle"},
                {"backend": "http://b", "state": "down"},
            ],
        )
    await db.dispose()


@pytest.fixture
def replicas(database_url: str, settings_for) -> Iterator[list[httpx.Client]]:  # type: ignore[no-untyped-def]
    asyncio.run(_history(database_url))
    settings = settings_for(database_url=database_url)
    with contextlib.ExitStack() as stack:
        urls = [stack.enter_context(serve(create_app(settings))) for _ in range(2)]
        yield [stack.enter_context(httpx.Client(base_url=url, headers=ASYNC)) for url in urls]


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_show_jobs_queue_latency_durations_backends_and_webhooks(
    replicas: list[httpx.Client],
) -> None:
    response = replicas[0].get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = _samples(response.text)

    def value(name: str, **labels: str) -> float:
        return samples[(name, frozenset(labels.items()))]

    assert value("a1111_proxy_jobs", status="completed") == 2
    assert value("a1111_proxy_jobs", status="processing") == 1
    assert value("a1111_proxy_jobs", status="queued") == 1
    assert value("a1111_proxy_jobs", status="canceled") == 1
    assert value("a1111_proxy_jobs", status="error") == 0
    assert value("a1111_proxy_queue_depth") == 1
    # Both finished jobs (and the running one, claimed at once) waited about 1 s or less.
    assert value("a1111_proxy_claim_latency_seconds_bucket", le="0.5") == 1
    assert value("a1111_proxy_claim_latency_seconds_bucket", le="1.0") == 3
    assert value("a1111_proxy_claim_latency_seconds_gcount") == 3
    assert value("a1111_proxy_job_duration_seconds_bucket", le="2.0", status="completed") == 1
    assert value("a1111_proxy_job_duration_seconds_bucket", le="60.0", status="completed") == 2
    assert value("a1111_proxy_job_duration_seconds_gsum", status="completed") == pytest.approx(42)
    assert value("a1111_proxy_backend_state", backend="http://a", state="busy") == 1
    assert value("a1111_proxy_backend_state", backend="http://a", state="idle") == 0
    assert value("a1111_proxy_backend_state", backend="http://b", state="down") == 1
    assert value("a1111_proxy_backend_running_jobs", backend="http://a") == 1
    assert value("a1111_proxy_backend_running_jobs", backend="http://b") == 0
    assert value("a1111_proxy_workers") == 2
    assert value("a1111_proxy_webhook_deliveries", event="completed", status="pending") == 1


def test_every_api_replica_reports_the_same_numbers(replicas: list[httpx.Client]) -> None:
    first, second = (_samples(client.get("/metrics").text) for client in replicas)
    age = ("a1111_proxy_queue_oldest_age_seconds", frozenset())
    assert first.pop(age) == pytest.approx(second.pop(age), abs=2)  # read a moment apart
    assert first == second


def test_metrics_need_an_admin_token_when_tokens_are_set(sqlite_url: str, settings_for) -> None:  # type: ignore[no-untyped-def]
    settings = settings_for(
        database_url=sqlite_url, api_tokens="tenant-token", admin_tokens="ops:s3cret"
    )
    with serve(create_app(settings)) as url, httpx.Client(base_url=url, headers=ASYNC) as client:
        assert client.get("/metrics").status_code == 401
        refused = client.get("/metrics", headers={"Authorization": "Bearer tenant-token"})
        assert refused.status_code == 403 and "ADMIN_TOKENS" in refused.json()["detail"]
        scraped = client.get("/metrics", headers={"Authorization": "Bearer s3cret"})
        assert scraped.status_code == 200 and "a1111_proxy_jobs" in scraped.text
