"""The worker on a real database: its logic against FakeBackend (in process, scripted); what
is about A1111's HTTP API against the fake A1111, a real HTTP server."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import event, select, update
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from a1111_proxy.backends import Backend, BackendProtocolError, BackendRejected, BackendUnavailable
from a1111_proxy.backends.a1111 import CATALOGUE_PATHS, A1111Backend
from a1111_proxy.backends.fake import FakeBackend
from a1111_proxy.catalogue import ENTRIES
from a1111_proxy.db.engine import Database
from a1111_proxy.db.tables import job_previews, jobs
from a1111_proxy.jobs import JobRepository, NewJob
from a1111_proxy.wakeup import make_wakeup
from tests.fakes.a1111 import FakeA1111
from tests.servers import serve
from worker.execute import Timing
from worker.loop import Worker

pytestmark = pytest.mark.anyio

FAST = Timing(
    progress_seconds=0.02,
    heartbeat_seconds=0.2,
    interrupt_grace_seconds=5,
    stall_seconds=0.5,
    unwatched_progress_seconds=0.1,
)


@pytest.fixture
def repo_options() -> dict[str, Any]:
    return {"max_attempts": 3, "lease_seconds": 5}


@pytest.fixture
def fakes() -> list[FakeBackend]:
    """Three scripted backends (tests use as many as they need)."""
    return [FakeBackend(f"fake{i}", service_time=0.05) for i in range(3)]


def make_worker(repo: JobRepository, backends: list[Backend], database_url: str) -> Worker:
    return Worker(
        repo=repo,
        backends=backends,
        wakeup=make_wakeup(database_url, 0.005),
        timing=FAST,
        reap_seconds=0.2,
        shutdown_grace_seconds=0.3,
        rest_seconds=0.05,
    )


def a1111(url: str) -> A1111Backend:
    return A1111Backend(url, connect_retries=2, retry_wait=0.01)


async def submit(repo: JobRepository, priority: int = 0, **body: object) -> str:
    body = {"prompt": "a cat", "steps": 20, **body}
    text = json.dumps(body)
    return (
        await repo.submit(NewJob("txt2img", request=text, payload=text, priority=priority))
    ).job.id


async def wait_until(check: Callable[[], object], timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while not await check():  # type: ignore[misc]
            await asyncio.sleep(0.01)


async def test_a_job_completes_with_a1111s_response_stored_exactly(
    repo: JobRepository, fakes: list[FakeBackend], database_url: str
) -> None:
    fake = fakes[0]
    job_id = await submit(repo, seed=7, unknown_extension_field={"kept": True})
    await make_worker(repo, [fake], database_url).run_until_empty()

    row = await repo.get(job_id)
    assert row.status == "completed" and row.attempts == 1 and row.progress == 1.0
    [sent] = fake.generation_requests()
    assert sent == {
        "prompt": "a cat",
        "steps": 20,
        "seed": 7,
        "unknown_extension_field": {"kept": True},
    }
    result = row.result
    assert result["parameters"] == sent
    info = json.loads(result["info"])
    assert info["seed"] == 7 and info["all_seeds"] == [7]
    [image] = await repo.images(row.seq)
    assert image.startswith(b"\x89PNG") and b"Seed: 7" in image


async def test_progress_is_stored_while_the_generation_runs(
    repo: JobRepository, fakes: list[FakeBackend], database_url: str
) -> None:
    fake = fakes[0]
    job_id = await submit(repo, fake_seconds=300)
    worker = make_worker(repo, [fake], database_url)
    run = asyncio.create_task(worker.run_until_empty())
    seen: list[float] = []

    async def progressed() -> bool:
        row = await repo.get(job_id)
        if row.status == "processing" and row.progress > 0:
            seen.append(row.progress)
        return len(seen) >= 3 and seen[-1] > seen[0]

    await wait_until(progressed)
    row = await repo.get(job_id)
    assert row.eta_relative is not None and row.eta_relative > 0
    fake.finish_current()
    await run
    assert (await repo.get(job_id)).status == "completed"


async def test_a_live_preview_is_fetched_only_while_someone_looks_at_the_job(
    repo: JobRepository, fakes: list[FakeBackend], database_url: str, db: Database
) -> None:
    fake = fakes[0]
    job_id = await submit(repo, fake_seconds=300)
    worker = make_worker(repo, [fake], database_url)
    worker.timing = dataclasses.replace(FAST, preview_seconds=0.05)
    run = asyncio.create_task(worker.run_until_empty())
    progressed: list[float] = []

    async def progress_stored(times: int) -> bool:
        row = await repo.get(job_id)
        if row.progress > (progressed[-1] if progressed else 0):
            progressed.append(row.progress)
        return len(progressed) >= times

    await wait_until(lambda: progress_stored(5))  # many ticks, a preview due at each
    seq = (await repo.get(job_id)).seq
    assert await repo.preview(seq) is None  # nobody looked: none fetched

    await repo.watch(seq, preview=True)  # an event stream or A1111's /progress looks
    await wait_until(lambda: repo.preview(seq))
    assert base64.b64decode(await repo.preview(seq) or "").startswith(b"\x89PNG")

    async with db.writing() as conn:  # the watch lapses (nobody renewed it)
        await conn.execute(update(jobs).values(preview_wanted_until=0.0))
    await asyncio.sleep(0.1)  # a tick of the worker's may have fetched one meanwhile
    last = await _preview_time(db, seq)
    progressed.clear()
    await wait_until(lambda: progress_stored(5))
    assert await _preview_time(db, seq) == last  # none fetched since
    fake.finish_current()
    await run


async def test_progress_is_read_at_every_tick_only_while_someone_looks_at_the_job(
    repo: JobRepository, fakes: list[FakeBackend], database_url: str, db: Database
) -> None:
    """Nobody looks: the A1111's progress is read every `unwatched_progress_seconds` (each a
    request to the A1111 and a write here), not at every tick; a read of the job, until its
    watch lapses, makes the worker read it at every tick."""
    fake = fakes[0]
    job_id = await submit(repo, fake_seconds=300)
    worker = make_worker(repo, [fake], database_url)
    worker.timing = dataclasses.replace(FAST, unwatched_progress_seconds=5.0)
    run = asyncio.create_task(worker.run_until_empty())

    async def reads_over(seconds: float) -> int:
        before = fake.progress_reads
        await asyncio.sleep(seconds)
        return fake.progress_reads - before

    await wait_until(lambda: _async(fake.progress_reads >= 1))  # the first tick reads
    assert await reads_over(1.0) == 0  # 50 ticks, nobody looks
    seq = (await repo.get(job_id)).seq
    await repo.watch(seq)  # GET /sdapi/v1/jobs/{id} looks
    await wait_until(lambda: _async(fake.progress_reads >= 2))
    assert await reads_over(0.5) >= 5
    async with db.writing() as conn:  # the watch lapses (nobody renewed it)
        await conn.execute(update(jobs).values(progress_wanted_until=0.0))
    await asyncio.sleep(0.1)  # a tick of the worker's may have read it meanwhile
    assert await reads_over(1.0) == 0
    assert (await repo.get(job_id)).status == "processing"  # the lease was renewed meanwhile
    fake.finish_current()
    await run


async def test_the_jobs_a_worker_runs_look_at_what_was_asked_of_them_in_one_read_a_tick(
    repo: JobRepository, fakes: list[FakeBackend], database_url: str, db: Database
) -> None:
    """Three jobs nobody watches, on three slots: each tick is one read of the three jobs'
    cancels and skips (their ticks are shared), not one read per job; a cancel still lands."""
    ids = [await submit(repo, fake_seconds=300) for _ in fakes]
    worker = make_worker(repo, list(fakes), database_url)
    worker.timing = dataclasses.replace(FAST, progress_seconds=0.1, heartbeat_seconds=30.0)
    worker.timing = dataclasses.replace(worker.timing, unwatched_progress_seconds=30.0)
    run = asyncio.create_task(worker.run_until_empty())
    await wait_until(lambda: _async(all(fake.current is not None for fake in fakes)))
    await asyncio.sleep(0.3)  # past each job's first tick (its first progress read and write)

    looks: list[str] = []

    def listen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if "cancel_requested_at" in statement:
            looks.append(statement)

    engine = db.read_engine.sync_engine
    event.listen(engine, "before_cursor_execute", listen)
    try:
        await asyncio.sleep(1.0)  # 10 ticks
    finally:
        event.remove(engine, "before_cursor_execute", listen)
    assert 3 <= len(looks) <= 15, looks  # one a tick (30 if each job read on its own)
    assert await repo.cancel(ids[1]) is not None
    await wait_until(lambda: _status_is(repo, ids[1], "canceled"))
    for fake in (fakes[0], fakes[2]):
        fake.finish_current()
    await run
    assert [(await repo.get(i)).status for i in ids] == ["completed", "canceled", "completed"]


async def _preview_time(db: Database, seq: int) -> float:
    async with db.reading() as conn:
        query = select(job_previews.c.updated_at).where(job_previews.c.job_seq == seq)
        return (await conn.execute(query)).scalar_one()


async def test_canceling_a_running_job_interrupts_its_slot_and_ends_it_canceled(
    repo: JobRepository, fakes: list[FakeBackend], database_url: str
) -> None:
    fake = fakes[0]
    job_id = await submit(repo, fake_seconds=300)
    run = asyncio.create_task(make_worker(repo, [fake], database_url).run_until_empty())
    await wait_until(lambda: _status_is(repo, job_id, "processing"))
    await wait_until(lambda: _async(fake.current is not None))
    await repo.cancel(job_id)
    await asyncio.wait_for(run, 5)
    row = await repo.get(job_id)
    assert row.status == "canceled" and fake.interrupts == 1 and fake.completed == 0
    # What the backend answered after the interrupt is kept, as A1111 would have returned it.
    assert json.loads(row.result["info"])["fake_generation"] == 1


async def test_skipping_a_running_job_ends_its_batch_and_the_next_batch_runs(
    repo: JobRepository, fakes: list[FakeBackend], database_url: str
) -> None:
    fake = fakes[0]
    body = json.dumps({"prompt": "a cat", "n_iter": 2, "fake_seconds": 600})
    new = NewJob("txt2img", request=body, payload=body, owner="alice")
    job_id = (await repo.submit(new)).job.id
    run = asyncio.create_task(make_worker(repo, [fake], database_url).run_until_empty())
    await wait_until(lambda: _async(fake.current is not None))
    await repo.skip_running(owner="alice", job_id=job_id)
    await wait_until(lambda: _async(fake.current is not None and fake.current.batch == 1))
    fake.finish_current()
    await asyncio.wait_for(run, 5)
    row = await repo.get(job_id)
    assert row.status == "completed" and fake.skips == 1
    assert len(await repo.images(row.seq)) == 2


async def test_gateway_errors_are_retried_then_the_job_runs(
    repo: JobRepository, fake_a1111: tuple[FakeA1111, str], database_url: str
) -> None:
    fake, url = fake_a1111
    fake.fail_next(1, status=503)  # one in-process retry absorbs it
    job_id = await submit(repo)
    await make_worker(repo, [a1111(url)], database_url).run_until_empty()
    row = await repo.get(job_id)
    assert row.status == "completed" and row.attempts == 1
    assert len(fake.generation_requests()) == 2


async def test_an_unavailable_backend_requeues_durably_then_errors_naming_backend_and_cause(
    repo: JobRepository, fakes: list[FakeBackend], database_url: str
) -> None:
    fake = fakes[0]
    fake.fail_next(3, "unavailable", status=502)  # one per attempt
    job_id = await submit(repo)
    worker = make_worker(repo, [fake], database_url)
    run = asyncio.create_task(worker.run())
    await wait_until(lambda: _status_is(repo, job_id, "queued", attempts=1))
    row = await repo.get(job_id)
    assert row.run_after > row.updated_at  # durable backoff, visible in the store
    assert row.error["code"] == "backend_unavailable"
    # Skip the backoff rather than sleep through it.
    await _make_due(repo, job_id)
    await wait_until(lambda: _status_is(repo, job_id, "queued", attempts=2))
    await _make_due(repo, job_id)
    await wait_until(lambda: _status_is(repo, job_id, "error"))
    worker.stop()
    await asyncio.wait_for(run, 5)
    row = await repo.get(job_id)
    error = row.error
    assert row.status == "error" and row.attempts == 3
    assert fake.name in error["message"] and "502" in error["message"]
    assert error["backend"] == fake.name and error["backend_status"] == 502


async def test_a1111_gateway_errors_past_the_retries_are_unavailable_naming_url_and_status(
    fake_a1111: tuple[FakeA1111, str],
) -> None:
    fake, url = fake_a1111
    fake.fail_next(2, status=502)  # both tries
    backend = a1111(url)
    try:
        with pytest.raises(BackendUnavailable) as raised:
            await backend.generate("txt2img", {"prompt": "x"})
    finally:
        await backend.aclose()
    assert url in raised.value.message and "502" in raised.value.message
    assert raised.value.status == 502 and len(fake.generation_requests()) == 2


async def test_a_backend_rejecting_a_job_ends_it_with_the_backends_own_detail(
    repo: JobRepository, fakes: list[FakeBackend], database_url: str
) -> None:
    fake = fakes[0]
    a1111_body = {
        "error": "HTTPException",
        "detail": "Script 'nope' not found",
        "body": "",
        "errors": "",
    }
    fake.fail_next(1, "rejected", status=422, body=a1111_body)
    job_id = await submit(repo, script_name="nope")
    await make_worker(repo, [fake], database_url).run_until_empty()
    row = await repo.get(job_id)
    error = row.error
    assert row.status == "error" and row.attempts == 1
    assert "Script 'nope' not found" in error["message"]
    assert error["backend_status"] == 422 and error["backend_body"] == a1111_body


async def test_a1111s_own_error_answer_is_a_rejection_with_its_detail_status_and_body(
    fake_a1111: tuple[FakeA1111, str],
) -> None:
    fake, url = fake_a1111
    a1111_body = {
        "error": "HTTPException",
        "detail": "Script 'nope' not found",
        "body": "",
        "errors": "",
    }
    fake.fail_next(1, status=422, body=a1111_body)
    backend = a1111(url)
    try:
        with pytest.raises(BackendRejected) as raised:
            await backend.generate("txt2img", {"script_name": "nope"})
    finally:
        await backend.aclose()
    assert "Script 'nope' not found" in raised.value.message
    assert raised.value.status == 422 and raised.value.body == a1111_body


async def test_a_garbage_answer_ends_the_job_with_a_clear_error(
    repo: JobRepository, fakes: list[FakeBackend], database_url: str
) -> None:
    fake = fakes[0]
    fake.fail_next(1, "bad_response")
    job_id = await submit(repo)
    await make_worker(repo, [fake], database_url).run_until_empty()
    row = await repo.get(job_id)
    error = row.error
    assert row.status == "error" and row.attempts == 1
    assert error["code"] == "backend_bad_response" and "not an A1111 response" in error["message"]


async def test_a1111_answering_garbage_is_a_protocol_error_that_asks_about_the_url(
    fake_a1111: tuple[FakeA1111, str],
) -> None:
    fake, url = fake_a1111
    fake.garbage_next()
    backend = a1111(url)
    try:
        with pytest.raises(BackendProtocolError) as raised:
            await backend.generate("txt2img", {"prompt": "x"})
    finally:
        await backend.aclose()
    assert "not an A1111 response" in raised.value.message and "--api" in raised.value.message


async def test_no_a1111_api_route_is_a_protocol_error_but_a_missing_extension_is_a1111s_404() -> (
    None
):
    """A1111 started without --api answers 404 {"detail": "Not Found"} to /sdapi/v1/txt2img:
    not a refusal of the request. An A1111 without ControlNet answers /controlnet/detect so too,
    and that one is A1111's own answer."""

    async def not_found(request: object) -> JSONResponse:
        return JSONResponse({"detail": "Not Found"}, status_code=404)

    with serve(Starlette(routes=[Route("/{path:path}", not_found, methods=["POST"])])) as url:
        backend = a1111(url)
        try:
            with pytest.raises(BackendProtocolError) as raised:
                await backend.generate("txt2img", {"prompt": "x"})
            assert "HTTP 404" in raised.value.message and "--api" in raised.value.message
            with pytest.raises(BackendRejected) as refused:
                await backend.generate("controlnet-detect", {"controlnet_module": "canny"})
            assert refused.value.status == 404 and refused.value.body == {"detail": "Not Found"}
        finally:
            await backend.aclose()


async def test_a_hung_backend_that_shows_no_generation_gets_the_job_requeued(
    repo: JobRepository, fakes: list[FakeBackend], database_url: str
) -> None:
    fake = fakes[0]
    fake.hang_next()
    job_id = await submit(repo)
    worker = make_worker(repo, [fake], database_url)
    run = asyncio.create_task(worker.run())
    await wait_until(lambda: _status_is(repo, job_id, "queued", attempts=1))
    assert "shown no generation running" in (await repo.get(job_id)).error["message"]
    await _make_due(repo, job_id)
    await wait_until(lambda: _status_is(repo, job_id, "completed"))
    worker.stop()
    await asyncio.wait_for(run, 5)
    assert len(fake.generation_requests()) == 2


async def test_an_unreachable_backend_keeps_jobs_queued_and_says_why(
    repo: JobRepository, fakes: list[FakeBackend], database_url: str
) -> None:
    fake = fakes[0]
    fake.down = True
    first = await submit(repo)
    second = await submit(repo)
    worker = make_worker(repo, [fake], database_url)
    run = asyncio.create_task(worker.run())
    await wait_until(lambda: _status_is(repo, first, "queued", attempts=1))
    await asyncio.sleep(0.5)
    worker.stop()
    await run
    row = await repo.get(first)
    assert "is down" in row.error["message"] and row.error["backend"] == fake.name
    untouched = await repo.get(second)
    assert untouched.status == "queued" and untouched.attempts == 0  # not burnt while down
    assert worker.slots[0].state == "down"


async def test_an_a1111_that_refuses_connections_is_unavailable_naming_it(
    fake_a1111: tuple[FakeA1111, str],
) -> None:
    from tests.servers import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    backend = a1111(dead)
    try:
        with pytest.raises(BackendUnavailable) as raised:
            await backend.generate("txt2img", {"prompt": "x"})
    finally:
        await backend.aclose()
    assert "cannot connect" in raised.value.message and dead in raised.value.message


async def test_several_slots_run_jobs_in_parallel(
    repo: JobRepository, fakes: list[FakeBackend], database_url: str
) -> None:
    ids = [await submit(repo, fake_seconds=300) for _ in range(3)]
    run = asyncio.create_task(make_worker(repo, list(fakes), database_url).run_until_empty())
    # Three jobs side by side, not one after another: each runs until all three are running.
    await wait_until(lambda: _async(all(fake.current is not None for fake in fakes)))
    for fake in fakes:
        fake.finish_current()
    await asyncio.wait_for(run, 10)
    rows = [await repo.get(job_id) for job_id in ids]
    assert {row.status for row in rows} == {"completed"}
    assert {row.backend for row in rows} == {fake.name for fake in fakes}
    assert all(fake.completed == 1 for fake in fakes)


async def test_stopping_the_worker_releases_running_jobs_for_another_worker(
    repo: JobRepository, fakes: list[FakeBackend], database_url: str
) -> None:
    fake = fakes[0]
    job_id = await submit(repo, fake_seconds=300)
    worker = make_worker(repo, [fake], database_url)
    run = asyncio.create_task(worker.run())
    await wait_until(lambda: _status_is(repo, job_id, "processing"))
    worker.stop()
    await asyncio.wait_for(run, 5)
    row = await repo.get(job_id)
    assert row.status == "queued" and row.attempts == 0 and row.run_after <= row.updated_at
    assert fake.interrupts == 1


async def _status_is(
    repo: JobRepository, job_id: str, status: str, attempts: int | None = None
) -> bool:
    row = await repo.get(job_id)
    return row.status == status and (attempts is None or row.attempts == attempts)


async def _async(value: object) -> object:
    return value


async def _make_due(repo: JobRepository, job_id: str) -> None:
    from sqlalchemy import update

    from a1111_proxy.db.tables import jobs

    async with repo.db.writing() as conn:
        await conn.execute(update(jobs).where(jobs.c.id == job_id).values(run_after=0))


async def test_a_job_goes_to_the_slot_that_last_ran_its_checkpoint(
    repo: JobRepository, fakes: list[FakeBackend], database_url: str
) -> None:
    async def submit_for(checkpoint: str) -> str:
        body = json.dumps(
            {"prompt": checkpoint, "override_settings": {"sd_model_checkpoint": checkpoint}}
        )
        new = NewJob("txt2img", request=body, payload=body, checkpoint=checkpoint)
        return (await repo.submit(new)).job.id

    first = [await submit_for("model-a"), await submit_for("model-b")]
    worker = make_worker(repo, list(fakes[:2]), database_url)
    await worker._run_until_empty()
    slot_of = {(await repo.get(i)).checkpoint: (await repo.get(i)).backend for i in first}
    # Now the other order: each job still finds the slot that has its model loaded.
    second = [await submit_for("model-b"), await submit_for("model-a")]
    await worker.run_until_empty()
    for job_id in second:
        row = await repo.get(job_id)
        assert row.backend == slot_of[row.checkpoint]


class SlowToStore(JobRepository):
    """A database that takes a while to store results (a big batch of images, a busy server)."""

    async def complete(self, *args: object, **kwargs: object) -> bool:
        await asyncio.sleep(0.3)
        return await super().complete(*args, **kwargs)  # type: ignore[arg-type]


async def test_a_backend_starts_its_next_job_while_the_last_result_is_still_being_stored(
    repo: JobRepository, fakes: list[FakeBackend], database_url: str
) -> None:
    fake = fakes[0]
    slow = SlowToStore(repo.db, max_attempts=3, lease_seconds=5)
    first, second = await submit(slow, seed=1), await submit(slow, seed=2)
    await make_worker(slow, [fake], database_url).run_until_empty()
    one, two = await repo.get(first), await repo.get(second)
    assert one.status == two.status == "completed"
    assert two.started_at < one.completed_at  # the backend did not wait for the database
    assert fake.max_in_flight == 1  # and still ran one job at a time


class Recorded(JobRepository):
    """Records the order of claims and result stores, and what the backend had been sent by
    the time each result was committed."""

    def __init__(self, *args: Any, backend: FakeBackend, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.backend = backend
        self.events: list[tuple[str, str]] = []
        self.sent_when_stored: dict[str, int] = {}

    async def claim(self, *args: Any, **kwargs: Any) -> Any:
        claimed = await super().claim(*args, **kwargs)
        self.events += [("claimed", claim.id) for _, claim in claimed]
        return claimed

    async def complete(self, claim: Any, *args: Any, **kwargs: Any) -> bool:
        self.events.append(("storing", claim.id))
        stored = await super().complete(claim, *args, **kwargs)
        self.sent_when_stored[claim.id] = len(self.backend.generation_requests())
        return stored


async def test_a_backends_next_job_is_claimed_and_sent_before_the_last_result_is_stored(
    repo: JobRepository, fakes: list[FakeBackend], database_url: str
) -> None:
    fake = fakes[0]
    recorded = Recorded(repo.db, backend=fake, max_attempts=3, lease_seconds=5)
    first, second = await submit(recorded, seed=1), await submit(recorded, seed=2)
    await make_worker(recorded, [fake], database_url).run_until_empty()
    assert recorded.events == [
        ("claimed", first),
        ("claimed", second),  # the moment the backend answered, before storing its result
        ("storing", first),
        ("storing", second),
    ]
    assert recorded.sent_when_stored == {first: 2, second: 2}
    assert fake.max_in_flight == 1
    assert {(await repo.get(i)).status for i in (first, second)} == {"completed"}


class DiesBeforeStoring(JobRepository):
    """A worker process that dies as it is about to store a result: from then on, nothing it
    does reaches the database."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dying = asyncio.Event()

    async def complete(self, *args: Any, **kwargs: Any) -> bool:
        self.dying.set()
        await asyncio.Event().wait()  # never returns
        raise AssertionError("unreachable")

    async def release(self, *args: Any, **kwargs: Any) -> bool:
        return False  # a dead process gives nothing back


async def test_a_worker_dying_between_the_next_claim_and_the_last_store_loses_no_job(
    repo: JobRepository, fakes: list[FakeBackend], database_url: str
) -> None:
    dead = DiesBeforeStoring(repo.db, max_attempts=3, lease_seconds=0.5)
    first, second = await submit(dead, seed=1), await submit(dead, seed=2)
    worker = make_worker(dead, [fakes[0]], database_url)
    run = asyncio.create_task(worker.run_until_empty())
    await asyncio.wait_for(dead.dying.wait(), 10)
    # The next job was claimed before the first result was stored, and the first is still
    # `processing` under its lease: the crash leaves both to the reaper.
    assert (await repo.get(first)).status == (await repo.get(second)).status == "processing"
    running = worker._running()
    run.cancel()
    for task in running:
        task.cancel()
    await asyncio.gather(run, *running, return_exceptions=True)

    survivor = JobRepository(repo.db, max_attempts=3, lease_seconds=0.5)
    requeued: set[str] = set()

    async def reaped_both() -> bool:
        requeued.update(job_id for job_id, _ in await survivor.reap_expired())
        return requeued == {first, second}

    await wait_until(reaped_both)
    await make_worker(survivor, [fakes[1]], database_url).run_until_empty()
    one, two = await repo.get(first), await repo.get(second)
    assert one.status == two.status == "completed"
    assert one.attempts == 2 and len(await repo.images(one.seq)) == 1


async def test_a_catalogue_refresh_while_a_backend_is_down_warns_and_keeps_the_last_one(
    sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from a1111_proxy.catalogue import CatalogueStore
    from worker.catalogue import CatalogueKeeper

    db = Database(sqlite_url)
    store = CatalogueStore(db)
    keeper = CatalogueKeeper(store)
    up, down = FakeBackend("up"), FakeBackend("http://127.0.0.1:9")
    down.down = True
    try:
        await keeper.fetch_all([up])
        models = await store.get("sd-models")
        with caplog.at_level(logging.INFO, logger="a1111_proxy.worker"):
            await keeper.fetch_all([down])
        assert "http://127.0.0.1:9 did not answer" in caplog.text and "--api" in caplog.text
        assert models and await store.get("sd-models") == models
    finally:
        await db.dispose()


async def test_the_a1111_backend_reads_every_catalogue_entry_and_sends_control_calls_to_a1111(
    fake_a1111: tuple[FakeA1111, str],
) -> None:
    fake, url = fake_a1111
    assert set(CATALOGUE_PATHS) == set(ENTRIES)
    backend = a1111(url)
    try:
        answers = {name: await backend.catalogue_entry(name) for name in ENTRIES}
        assert answers["sd-models"] == fake.models and answers["options"] == fake.options
        assert answers["controlnet-version"] is None  # A1111 answers 404: it lacks it
        await backend.apply_options({"CLIP_stop_at_last_layers": 2})
        for what in ("loras", "vae", "embeddings"):
            await backend.refresh(what)  # type: ignore[arg-type]
        await backend.refresh("checkpoints")
        await backend.unload_checkpoint()
        await backend.reload_checkpoint("dreamshaper_8")
    finally:
        await backend.aclose()
    assert fake.options_posted == [{"CLIP_stop_at_last_layers": 2}]
    assert [r.path for r in fake.received][-5:] == [
        "/sdapi/v1/refresh-loras",
        "/sdapi/v1/refresh-vae",
        "/sdapi/v1/refresh-embeddings",
        "/sdapi/v1/unload-checkpoint",
        "/sdapi/v1/reload-checkpoint",
    ]
    assert fake.received[-1].body == {"sd_model_checkpoint": "dreamshaper_8"}
    assert len(fake.models) == 3  # refresh-checkpoints found the new model
    assert fake.timeline == ["unload-checkpoint", "reload-checkpoint"]


async def test_a_backend_silent_at_start_rests_and_its_catalogue_is_fetched_once_it_answers(
    repo: JobRepository, database_url: str
) -> None:
    from a1111_proxy.catalogue import CatalogueStore
    from worker.catalogue import CatalogueKeeper

    store = CatalogueStore(repo.db)
    backend = FakeBackend("late", service_time=0.05)
    backend.down = True  # A1111 not started yet when the worker starts
    worker = make_worker(repo, [backend], database_url)
    worker.keeper = CatalogueKeeper(store, interval=3600)  # a failed fetch must not wait this
    worker.catalogue_check_seconds = 0.05
    # Short rests: on a busy machine failed probes pile up before the backend comes back, and
    # the rest grows with them (2 s x failures); this test is about the fetch, not the backoff.
    worker.rest_seconds = 0.05
    run = asyncio.create_task(worker.run())
    try:
        await wait_until(lambda: _true(worker.slots[0].state == "down"))
        assert worker.slots[0].down_since is not None
        job_id = await submit(repo)  # not claimed by a backend known to be down
        assert (await repo.get(job_id)).attempts == 0
        backend.down = False
        await wait_until(lambda: store.get("sd-models"))
        await wait_until(lambda: _true(worker.slots[0].down_since is None))
        await wait_until(lambda: _has_status(repo, job_id, "completed"))
    finally:
        worker.stop()
        await run


async def _true(value: bool) -> bool:
    return value


async def _has_status(repo: JobRepository, job_id: str, status: str) -> bool:
    return (await repo.get(job_id)).status == status
