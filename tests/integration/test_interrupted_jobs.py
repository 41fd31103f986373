"""A running job that is canceled or interrupted, through the worker and the fake A1111 (a real
HTTP server): what A1111 answers after /interrupt is what the job keeps and what a held A1111
request gets; an A1111 that ignores /interrupt is given INTERRUPT_GRACE_SECONDS, then the job ends
canceled anyway and the slot takes its next job."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from a1111_proxy.backends.a1111 import A1111Backend
from a1111_proxy.db.engine import Database
from a1111_proxy.jobs import JobRepository, NewJob
from a1111_proxy.wakeup import make_wakeup
from tests.fakes.a1111 import FakeA1111
from tests.servers import serve
from worker.execute import Timing
from worker.loop import Worker

pytestmark = pytest.mark.anyio

# A short grace, so that the test of an A1111 that ignores /interrupt does not wait long; the
# others never reach it (the fake stops at once).
FAST = Timing(
    progress_seconds=0.02, heartbeat_seconds=0.2, interrupt_grace_seconds=0.3, stall_seconds=5
)


@pytest.fixture
def fake() -> Iterator[tuple[FakeA1111, str]]:
    a1111 = FakeA1111(service_time=0.05)
    with serve(a1111.app) as url:
        yield a1111, url


def make_worker(repo: JobRepository, url: str, database_url: str) -> Worker:
    return Worker(
        repo=repo,
        backends=[A1111Backend(url, connect_retries=2, retry_wait=0.01)],
        wakeup=make_wakeup(database_url, 0.005),
        timing=FAST,
        reap_seconds=0.2,
        shutdown_grace_seconds=1,
    )


async def submit(repo: JobRepository, **body: object) -> str:
    text = json.dumps({"prompt": "a lighthouse", "steps": 20, **body})
    return (await repo.submit(NewJob("txt2img", request=text, payload=text))).job.id


async def until(check: Callable[[], Any], timeout: float = 15) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.01)


def status_is(repo: JobRepository, job_id: str, status: str) -> Callable[[], Any]:
    async def check() -> bool:
        row = await repo.get(job_id)
        return row is not None and row.status == status

    return check


def generating(a1111: FakeA1111, number: int = 1) -> Callable[[], Any]:
    async def check() -> bool:
        return a1111.current is not None and a1111.current.number == number

    return check


async def test_a_canceled_job_keeps_the_partial_images_a1111_answered_with(
    repo: JobRepository, fake: tuple[FakeA1111, str], database_url: str
) -> None:
    a1111, url = fake
    job_id = await submit(repo, batch_size=2, n_iter=3, fake_seconds=300)
    run = asyncio.create_task(make_worker(repo, url, database_url).run_until_empty())
    await until(generating(a1111))
    await repo.cancel(job_id)
    await asyncio.wait_for(run, 15)

    row = await repo.get(job_id)
    assert row.status == "canceled" and row.error["code"] == "canceled"
    assert a1111.interrupts == 1 and a1111.completed == []
    # A1111 stopped in its first of 3 iterations: it answered that batch's 2 images (denoised
    # as far as it got), and the job keeps them, as a client of A1111 would have had them.
    images = await repo.images(row.seq)
    assert row.image_count == 2 and len(images) == 2
    assert all(image.startswith(b"\x89PNG") for image in images)
    assert json.loads(row.result["info"])["fake_generation"] == 1


async def test_an_a1111_ignoring_interrupt_gets_the_grace_then_the_job_ends_canceled_and_next_runs(
    repo: JobRepository, fake: tuple[FakeA1111, str], database_url: str
) -> None:
    a1111, url = fake
    a1111.ignores_interrupt = True
    stuck = await submit(repo, fake_seconds=300)
    after = await submit(repo)
    run = asyncio.create_task(make_worker(repo, url, database_url).run_until_empty())
    await until(generating(a1111))
    await repo.cancel(stuck)

    # A1111 took the interrupt and ran on: after the grace the job ends canceled all the same,
    # with nothing kept (A1111 never answered), and its request is dropped.
    await until(status_is(repo, stuck, "canceled"))
    row = await repo.get(stuck)
    assert row.error["code"] == "canceled" and row.result is None and row.image_count == 0
    assert a1111.interrupts == 1
    # The slot is free again: the next job is claimed and sent to that A1111, which queues it
    # behind the generation it would not stop (one at a time, as A1111's queue lock does).
    await until(status_is(repo, after, "processing"))
    await until(lambda: _true(a1111.in_flight == 2))
    assert (await repo.get(after)).status == "processing"
    a1111.finish_current()  # the generation that ignored /interrupt ends at last
    await asyncio.wait_for(run, 15)

    assert (await repo.get(after)).status == "completed"
    assert [g["number"] for g in a1111.completed] == [1, 2]  # the stuck one ran on, then it
    assert a1111.max_in_flight == 2 and (await repo.get(stuck)).status == "canceled"


async def _true(value: bool) -> bool:
    return value


@pytest.fixture
def api_and_worker(
    fake: tuple[FakeA1111, str], sqlite_url: str, settings_for: Any
) -> Iterator[tuple[str, Database]]:
    """The API on uvicorn over a SQLite file, with the fake A1111 as its backend."""
    settings = settings_for(database_url=sqlite_url, a1111_urls=fake[1])
    from a1111_proxy.app import create_app

    with serve(create_app(settings)) as base:
        yield base, Database(sqlite_url)


async def test_a_held_a1111_request_interrupted_by_its_client_answers_200_with_the_partial_image(
    fake: tuple[FakeA1111, str], api_and_worker: tuple[str, Database], sqlite_url: str
) -> None:
    """As A1111 does: a client that calls /sdapi/v1/interrupt while its txt2img is held gets
    200 with what the generation had made."""
    a1111, url = fake
    base, db = api_and_worker
    worker = make_worker(JobRepository(db), url, sqlite_url)
    running = asyncio.create_task(worker.run())
    try:
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            held = asyncio.create_task(
                client.post(
                    "/sdapi/v1/txt2img", json={"prompt": "a slow castle", "fake_seconds": 300}
                )
            )
            await until(generating(a1111))
            assert (await client.post("/sdapi/v1/interrupt")).json() == {}
            answer = await asyncio.wait_for(held, 15)
            assert answer.status_code == 200
            body = answer.json()
            [image] = body["images"]
            assert base64.b64decode(image).startswith(b"\x89PNG")
            assert json.loads(body["info"])["fake_generation"] == 1
            assert body["parameters"]["prompt"] == "a slow castle"
            job = (await client.get(f"/sdapi/v1/jobs/{answer.headers['x-job-id']}")).json()
            assert job["status"] == "canceled" and job["error"]["code"] == "canceled"
            # The job API shows the same images, as it shows a completed job's.
            assert job["result"]["images"] == body["images"] and len(job["image_urls"]) == 1
            png = await client.get(job["image_urls"][0])
            assert png.status_code == 200 and png.content == base64.b64decode(image)
    finally:
        worker.stop()
        await running
        await db.dispose()
