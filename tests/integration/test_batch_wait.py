"""ENGINE_BATCH_WAIT_MS on the real Worker and a real database, with a scripted backend that
batches: at 0 a lone job starts at once, never waiting for company; above 0 a compatible job
that arrives within the window joins the batch. The window is a wait the test ends by hand."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from a1111_proxy.backends.base import Runner
from a1111_proxy.backends.fake import FakeBackend
from a1111_proxy.engine.compat import batch_key
from a1111_proxy.jobs import JobRepository, NewJob
from a1111_proxy.wakeup import make_wakeup
from worker.execute import Timing
from worker.loop import Worker

pytestmark = pytest.mark.anyio


class FakeBatch:
    def __init__(self, backend: FakeBatching, size: int) -> None:
        self.runners: list[Runner] = [backend] * size
        self.backend = backend

    def answered(self) -> bool:
        return self.backend.in_flight == 0


class FakeBatching(FakeBackend):
    """FakeBackend that takes compatible jobs together, recording each batch's prompts."""

    max_batch = 4

    def __init__(self) -> None:
        super().__init__("fake-engine", service_time=0.01)
        self.batches: list[list[str]] = []

    def batch(self, jobs: list[tuple[str, dict[str, Any]]]) -> FakeBatch:
        self.batches.append([payload["prompt"] for _, payload in jobs])
        return FakeBatch(self, len(jobs))


class Window:
    """The batch window as the test moves it: `opened` once the worker waits, and the wait
    ends when the test calls `close()`."""

    def __init__(self) -> None:
        self.opened = asyncio.Event()
        self._closed = asyncio.Event()
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.opened.set()
        await self._closed.wait()

    def close(self) -> None:
        self._closed.set()


@pytest.fixture
def repo_options() -> dict[str, Any]:
    return {"lease_seconds": 30, "batch_key": batch_key}


async def submit(repo: JobRepository, prompt: str) -> str:
    text = json.dumps({"prompt": prompt, "steps": 4})
    return (await repo.submit(NewJob("txt2img", request=text, payload=text))).job.id


def make_worker(
    repo: JobRepository, database_url: str, backend: FakeBatching, **options: Any
) -> Worker:
    return Worker(
        repo=repo,
        backends=[backend],
        wakeup=make_wakeup(database_url, 0.005),
        timing=Timing(progress_seconds=0.02, heartbeat_seconds=0.5),
        **options,
    )


async def test_with_no_batch_wait_a_lone_job_starts_at_once(
    repo: JobRepository, database_url: str
) -> None:
    backend, window = FakeBatching(), Window()
    job_id = await submit(repo, "alone")
    worker = make_worker(repo, database_url, backend, wait_for_company=window)
    await asyncio.wait_for(worker.run_until_empty(), 30)
    assert window.waits == []  # it never waited for company
    assert (await repo.get(job_id)).status == "completed"
    assert backend.generation_requests()[0]["prompt"] == "alone" and backend.batches == []


async def test_with_a_batch_wait_a_compatible_job_arriving_in_the_window_joins_the_batch(
    repo: JobRepository, database_url: str
) -> None:
    backend, window = FakeBatching(), Window()
    first = await submit(repo, "first")
    worker = make_worker(
        repo, database_url, backend, batch_wait_seconds=0.25, wait_for_company=window
    )
    running = asyncio.create_task(worker.run_until_empty())
    await asyncio.wait_for(window.opened.wait(), 30)
    assert (await repo.get(first)).status == "processing"  # claimed, waiting for company
    assert backend.generation_requests() == []
    second = await submit(repo, "second")
    window.close()
    await asyncio.wait_for(running, 30)
    assert window.waits == [0.25]
    assert backend.batches == [["first", "second"]]
    assert [(await repo.get(i)).status for i in (first, second)] == ["completed", "completed"]
