"""unload-checkpoint and reload-checkpoint on the worker's side: a request recorded in the database
reaches each backend (a fake A1111, a real HTTP server) between jobs, never during one."""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import AsyncIterator, Callable

import pytest

from a1111_proxy.backends.a1111 import A1111Backend
from a1111_proxy.catalogue import CatalogueStore
from a1111_proxy.db.engine import Database
from a1111_proxy.jobs import JobRepository, NewJob
from a1111_proxy.wakeup import make_wakeup
from tests.fakes.a1111 import FakeA1111
from tests.servers import serve
from worker.catalogue import CatalogueKeeper
from worker.execute import Timing
from worker.loop import Worker

pytestmark = pytest.mark.anyio

FAST = Timing(
    progress_seconds=0.02, heartbeat_seconds=0.2, interrupt_grace_seconds=5, stall_seconds=5
)


@pytest.fixture
def fake() -> AsyncIterator[tuple[FakeA1111, str]]:
    fake = FakeA1111(service_time=0.05)
    with serve(fake.app) as url:
        yield fake, url


def make_worker(db: Database, url: str, database_url: str, worker_id: str = "w1") -> Worker:
    return Worker(
        repo=JobRepository(db, lease_seconds=5),
        backends=[A1111Backend(url, connect_retries=2, retry_wait=0.01)],
        wakeup=make_wakeup(database_url, 0.005),
        timing=FAST,
        keeper=CatalogueKeeper(CatalogueStore(db)),
        worker_id=worker_id,
        shutdown_grace_seconds=1,
    )


async def submit(db: Database, **body: object) -> str:
    text = json.dumps({"prompt": "a cat", "steps": 5, **body})
    return (await JobRepository(db).submit(NewJob("txt2img", request=text, payload=text))).job.id


async def until(check: Callable[[], object], timeout: float = 15) -> None:
    async with asyncio.timeout(timeout):
        while True:
            value = check()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return
            await asyncio.sleep(0.01)


async def reported(db: Database, version: int) -> bool:
    """Whether the worker's heartbeat says its backend applied request `version`."""
    rows = await JobRepository(db).live_workers(60)
    return any(slot["checkpoint_version"] == version for row in rows for slot in row.slots)


def looked(worker: Worker) -> bool:
    return worker.keeper is not None and worker.keeper.checkpoint_baseline is not None


async def test_an_unload_asked_during_a_job_reaches_a1111_after_that_job_and_is_reported(
    db: Database, fake: tuple[FakeA1111, str], database_url: str
) -> None:
    a1111, url = fake
    store = CatalogueStore(db)
    worker = make_worker(db, url, database_url)
    task = asyncio.create_task(worker.run())
    try:
        await until(lambda: looked(worker))
        await submit(db, fake_seconds=0.5)
        await until(lambda: a1111.current is not None)
        version = await store.request_checkpoint(loaded=False)
        await until(lambda: reported(db, version))
        assert a1111.timeline == ["txt2img", "unload-checkpoint"]
        assert a1111.checkpoint_calls_while_generating == 0 and not a1111.loaded
        # /memory is refetched after it: the freed VRAM shows.
        await until(lambda: _allocated(store, 0))
    finally:
        worker.stop()
        await task


async def _allocated(store: CatalogueStore, current: int) -> bool:
    memory = await store.get("memory")
    return bool(memory) and memory["cuda"]["allocated"]["current"] == current


async def test_a_job_after_an_unload_runs_and_a1111_loads_its_model_on_demand(
    db: Database, fake: tuple[FakeA1111, str], database_url: str
) -> None:
    a1111, url = fake
    worker = make_worker(db, url, database_url)
    task = asyncio.create_task(worker.run())
    try:
        await until(lambda: looked(worker))
        version = await CatalogueStore(db).request_checkpoint(loaded=False)
        await until(lambda: reported(db, version))
        job_id = await submit(db)
        await until(lambda: _status(db, job_id, "completed"))
        assert a1111.timeline == ["unload-checkpoint", "load", "txt2img"]
    finally:
        worker.stop()
        await task


async def _status(db: Database, job_id: str, status: str) -> bool:
    row = await JobRepository(db).get(job_id)
    return row is not None and row.status == status


async def test_a_reload_names_the_default_checkpoint_set_with_options(
    db: Database, fake: tuple[FakeA1111, str], database_url: str
) -> None:
    a1111, url = fake
    store = CatalogueStore(db)
    await store.set_control("default_checkpoint", a1111.models[1]["title"])
    worker = make_worker(db, url, database_url)
    task = asyncio.create_task(worker.run())
    try:
        await until(lambda: looked(worker))
        version = await store.request_checkpoint(loaded=True)
        await until(lambda: reported(db, version))
        [sent] = [r for r in a1111.received if r.path.endswith("-checkpoint")]
        assert sent.path == "/sdapi/v1/reload-checkpoint"
        assert sent.body == {"sd_model_checkpoint": a1111.models[1]["title"]}
    finally:
        worker.stop()
        await task


async def test_a_request_older_than_the_worker_is_not_applied_again(
    db: Database, fake: tuple[FakeA1111, str], database_url: str
) -> None:
    a1111, url = fake
    old = await CatalogueStore(db).request_checkpoint(loaded=False)
    worker = make_worker(db, url, database_url)
    task = asyncio.create_task(worker.run())
    try:
        job_id = await submit(db)
        await until(lambda: _status(db, job_id, "completed"))
        assert worker.slots[0].checkpoint_version == old
        assert a1111.timeline == ["txt2img"]  # no unload: none was asked since it started
    finally:
        worker.stop()
        await task


async def test_a_shared_a1111_is_not_unloaded_while_another_worker_runs_a_job_on_it(
    db: Database, fake: tuple[FakeA1111, str], database_url: str
) -> None:
    a1111, url = fake
    repo = JobRepository(db, lease_seconds=60)
    await submit(db)
    [(_, other)] = await repo.claim("other-worker", [(url, None)])  # its job runs on the A1111
    worker = make_worker(db, url, database_url)
    task = asyncio.create_task(worker.run())
    try:
        await until(lambda: looked(worker))
        version = await CatalogueStore(db).request_checkpoint(loaded=False)
        await asyncio.sleep(0.5)  # many dispatcher rounds: none may send it meanwhile
        assert a1111.timeline == [] and not await reported(db, version)
        await repo.finish(other, "canceled", None)
        await until(lambda: reported(db, version))
        assert a1111.timeline == ["unload-checkpoint"]
    finally:
        worker.stop()
        await task
