"""Scale-out on PostgreSQL, for real: several API processes and workers on one database, several
fake A1111 backends shared by every worker (each worker lists all of them in A1111_URLS)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import _truncate_pg
from tests.fakes.a1111 import FakeA1111
from tests.servers import ASYNC, serve, wait_for
from tests.stack import Stack

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

JOBS = 300


@pytest.fixture
def fakes() -> Iterator[list[tuple[FakeA1111, str]]]:
    made = [FakeA1111(service_time=0.01, name=f"fake{i}") for i in range(4)]
    with contextlib.ExitStack() as stack:
        yield [(fake, stack.enter_context(serve(fake.app))) for fake in made]


@pytest.fixture
def pg_stack(
    tmp_path: Path, fakes: list[tuple[FakeA1111, str]], postgres_url: str
) -> Iterator[Stack]:
    _truncate_pg(postgres_url)
    made = Stack(tmp_path, [url for _, url in fakes], database_url=postgres_url)
    try:
        yield made
    finally:
        made.close()


async def _submit_all(bases: list[str], count: int) -> list[str]:
    """Submit `count` jobs, alternating between the APIs, 16 at a time."""
    limit = asyncio.Semaphore(16)
    clients = [httpx.AsyncClient(base_url=base, timeout=30, headers=ASYNC) for base in bases]

    async def one(i: int) -> str:
        async with limit:
            response = await clients[i % len(clients)].post(
                "/sdapi/v1/txt2img", json={"prompt": f"job {i}", "steps": 2}
            )
            assert response.status_code == 202, response.text
            return str(response.json()["id"])

    try:
        return await asyncio.gather(*(one(i) for i in range(count)))
    finally:
        for client in clients:
            await client.aclose()


def _start_two_apis(stack: Stack) -> tuple[httpx.Client, httpx.Client]:
    """Two API processes; the Stack itself talks to the second."""
    stack.start_api()
    first = httpx.Client(base_url=stack.base, timeout=10, headers=ASYNC)
    stack.closers.append(first.close)
    return first, stack.start_api()


def _prompts(fakes: list[tuple[FakeA1111, str]]) -> list[str]:
    return [r.body["prompt"] for fake, _ in fakes for r in fake.generation_requests()]


def test_two_apis_and_three_workers_run_300_jobs_each_exactly_once_on_four_backends(
    pg_stack: Stack, fakes: list[tuple[FakeA1111, str]]
) -> None:
    first, second = _start_two_apis(pg_stack)
    for _ in range(3):
        pg_stack.start_worker()
    ids = asyncio.run(_submit_all([str(first.base_url), pg_stack.base], JOBS))
    wait_for(
        lambda: sum(len(f.completed) for f, _ in fakes) >= JOBS,
        timeout=90,
        what=f"{JOBS} generations",
    )
    statuses = [
        (first if i % 2 else second).get(f"/sdapi/v1/jobs/{job_id}").json()
        for i, job_id in enumerate(ids)
    ]
    assert {s["status"] for s in statuses} == {"completed"}
    assert {s["attempts"] for s in statuses} == {1}
    prompts = _prompts(fakes)
    assert len(prompts) == JOBS and len(set(prompts)) == JOBS  # no job ran twice
    assert all(fake.max_in_flight == 1 for fake, _ in fakes)  # one job at a time per A1111
    assert all(len(fake.completed) > 10 for fake, _ in fakes)  # every backend did its share
    workers = second.get("/health").json()["workers"]
    assert len(workers) == 3


def test_a_cancel_through_one_api_stops_a_job_running_under_another_process(
    pg_stack: Stack, fakes: list[tuple[FakeA1111, str]]
) -> None:
    first, second = _start_two_apis(pg_stack)
    pg_stack.start_worker()
    pg_stack.start_worker()
    response = first.post("/sdapi/v1/txt2img", json={"prompt": "long", "fake_seconds": 30})
    job_id = response.json()["id"]
    pg_stack.wait_status(job_id, "processing")
    assert second.post(f"/sdapi/v1/jobs/{job_id}/cancel").status_code == 200
    job = pg_stack.wait_status(job_id, "canceled", timeout=10)
    assert job["error"]["code"] == "canceled"
    assert sum(fake.interrupts for fake, _ in fakes) == 1
    assert first.get(f"/sdapi/v1/jobs/{job_id}").json()["status"] == "canceled"


def test_a_job_whose_worker_is_killed_runs_again_on_another_worker(
    pg_stack: Stack, fakes: list[tuple[FakeA1111, str]]
) -> None:
    pg_stack.start_api()
    workers = [pg_stack.start_worker(), pg_stack.start_worker()]
    job_id = pg_stack.submit(prompt="doomed", fake_seconds=0.5)
    pg_stack.wait_status(job_id, "processing")
    [holder] = wait_for(
        lambda: [w for w in workers if f"job {job_id}: attempt 1" in w.output()],
        what="the worker running the job to log it",
    )
    holder.kill()  # SIGKILL: no release; the lease must expire for the job to run again
    job = pg_stack.wait_status(job_id, "completed", timeout=20)
    assert job["attempts"] == 2
    [survivor] = [w for w in workers if w is not holder]
    assert f"job {job_id}: completed" in survivor.output()


def test_an_idle_worker_picks_up_a_new_job_at_once_not_at_its_next_poll(
    pg_stack: Stack, fakes: list[tuple[FakeA1111, str]]
) -> None:
    pg_stack.start_api()
    pg_stack.start_worker(A1111_PROXY_POLL_SECONDS="30")
    pg_stack.wait_status(pg_stack.submit(prompt="warm up"), "completed")
    waits = []
    for i in range(5):
        time.sleep(0.3)  # the worker is idle, waiting on LISTEN
        job = pg_stack.wait_status(pg_stack.submit(prompt=f"p{i}"), "completed")
        waits.append(_seconds(job["started_at"]) - _seconds(job["created_at"]))
    assert max(waits) < 0.5, waits  # an idle worker rechecks the queue only once a second


def _seconds(stamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
