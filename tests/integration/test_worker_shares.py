"""Several workers listing the same backends (worker/shares.py, worker/loop.py): each claims for
its own share at once and the others' when they stay idle; backends that answer together are
claimed for in one transaction."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from a1111_proxy.backends import Backend
from a1111_proxy.backends.fake import FakeBackend
from a1111_proxy.jobs import JobRepository
from tests.integration.test_worker import make_worker, submit, wait_until
from worker.loop import Worker

pytestmark = pytest.mark.anyio


@pytest.fixture
def repo_options() -> dict[str, Any]:
    return {"max_attempts": 3, "lease_seconds": 30}


@pytest.fixture
def fakes() -> list[FakeBackend]:
    return [FakeBackend(f"fake{i}", service_time=0.05) for i in range(4)]


async def knows_its_share(worker: Worker, size: int) -> bool:
    return len(worker.shares.owned or ()) == size


async def all_running(repo: JobRepository, ids: list[str]) -> bool:
    return all([(await repo.get(job_id)).status == "processing" for job_id in ids])


@contextlib.asynccontextmanager
async def running(fakes: list[FakeBackend], *workers: Worker) -> AsyncIterator[None]:
    """The workers run inside; then they stop, the fakes' generations end, and they are done."""
    runs = [asyncio.create_task(worker.run()) for worker in workers]
    try:
        yield
    finally:
        for worker in workers:
            worker.stop()
        for fake in fakes:
            fake.finish_current()
        await asyncio.wait_for(asyncio.gather(*runs), 10)


async def each_runs_on_its_share(repo: JobRepository, ids: list[str], *workers: Worker) -> None:
    owner = {worker.worker_id: worker for worker in workers}
    for job_id in ids:
        job = await repo.get(job_id)
        assert job.lease_owner is not None and job.backend is not None
        assert job.backend in (owner[job.lease_owner].shares.owned or ()), job.lease_owner


async def test_two_workers_listing_the_same_backends_each_take_the_jobs_of_their_own_share(
    repo: JobRepository, fakes: list[FakeBackend], database_url: str
) -> None:
    workers = [make_worker(repo, list[Backend](fakes), database_url) for _ in range(2)]
    async with running(fakes, *workers):
        await wait_until(
            lambda: _both(knows_its_share(workers[0], 2), knows_its_share(workers[1], 2))
        )
        ids = [await submit(repo, fake_seconds=300) for _ in fakes]
        await wait_until(lambda: all_running(repo, ids))
        await each_runs_on_its_share(repo, ids, *workers)


async def test_the_share_of_a_worker_that_claims_nothing_is_claimed_by_the_others(
    repo: JobRepository, fakes: list[FakeBackend], database_url: str
) -> None:
    # A worker alive by its heartbeat that never claims (stuck, or its dispatcher asleep).
    await repo.beat_worker("silent", time.time(), [{"backend": fake.name} for fake in fakes])
    worker = make_worker(repo, list[Backend](fakes), database_url)
    async with running(fakes, worker):
        await wait_until(lambda: knows_its_share(worker, 2))
        ids = [await submit(repo, fake_seconds=300) for _ in fakes]
        await wait_until(lambda: all_running(repo, ids))
        assert {job.lease_owner for job in [await repo.get(i) for i in ids]} == {worker.worker_id}


async def test_a_worker_that_joins_gets_its_share_as_the_backends_finish_their_jobs(
    repo: JobRepository, fakes: list[FakeBackend], database_url: str
) -> None:
    first = make_worker(repo, list[Backend](fakes), database_url)
    ids = [await submit(repo, fake_seconds=300) for _ in range(2 * len(fakes))]
    async with running(fakes, first):
        await wait_until(lambda: all_running(repo, ids[: len(fakes)]))  # all on the first
        joined = make_worker(repo, list[Backend](fakes), database_url)
        async with running(fakes, joined):
            await wait_until(lambda: _both(knows_its_share(first, 2), knows_its_share(joined, 2)))
            for fake in fakes:  # the first worker's jobs end; the next ones go by share
                fake.finish_current()
            await wait_until(lambda: all_running(repo, ids[len(fakes) :]))
            await each_runs_on_its_share(repo, ids[len(fakes) :], first, joined)


async def test_backends_that_answer_while_a_claim_runs_are_served_together_by_one_claim(
    repo: JobRepository, fakes: list[FakeBackend], database_url: str
) -> None:
    worker = make_worker(repo, list[Backend](fakes), database_url)
    first = [await submit(repo, fake_seconds=300) for _ in fakes]
    second = [await submit(repo, fake_seconds=300) for _ in fakes]
    async with running(fakes, worker):
        await wait_until(lambda: all_running(repo, first))
        entered: list[int] = []
        gate = asyncio.Event()
        claim = repo.claim

        async def first_held(*args: Any, **kwargs: Any) -> Any:
            entered.append(len(args[1]))  # the slots it claims for
            if len(entered) == 1:
                await gate.wait()
            return await claim(*args, **kwargs)

        repo.claim = first_held  # type: ignore[method-assign]
        fakes[0].finish_current()
        await wait_until(lambda: _async(len(entered) == 1))
        for fake in fakes[1:]:  # they answer while the first backend's claim runs
            fake.finish_current()
        # The claim ahead takes too long: one claim serves the three, beside it.
        await wait_until(lambda: _async(len(entered) == 2))
        gate.set()
        await wait_until(lambda: all_running(repo, second))
        assert entered == [1, 3]  # not one claim each


async def _async(value: object) -> object:
    return value


async def _both(*checks: Any) -> bool:
    return all([await check for check in checks])
