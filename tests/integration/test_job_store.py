"""The job store's state machine and its database discipline, on SQLite and on PostgreSQL."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import dataclasses
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select
from sqlalchemy.exc import OperationalError

from a1111_proxy.db.engine import Database
from a1111_proxy.db.tables import jobs
from a1111_proxy.errors import IdempotencyKeyReused, TenantLimitReached
from a1111_proxy.jobs import JobRepository, NewJob, TenantLimits
from tests.claims import claim_next
from tests.fakes.clock import Clock
from tests.plans import count_round_trips

pytestmark = pytest.mark.anyio


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def repo_options(clock: Clock) -> dict[str, Any]:
    return {"max_attempts": 2, "lease_seconds": 30, "clock": clock}


def new_job(prompt: str = "cat", priority: int = 0, key: str | None = None) -> NewJob:
    body = json.dumps({"prompt": prompt})
    return NewJob(
        "txt2img",
        request=body,
        payload=body,
        priority=priority,
        idempotency_key=key,
        request_hash=str(hash(prompt)) if key else None,
    )


async def test_submitted_job_is_queued_with_its_payload_stored(repo: JobRepository) -> None:
    submitted = await repo.submit(new_job("a red fox"))
    row = await repo.get(submitted.job.id)
    assert row is not None and row.status == "queued" and row.attempts == 0
    claim = await claim_next(repo, "w", "http://slot")
    assert claim is not None and claim.payload == {"prompt": "a red fox"}


async def test_claims_take_the_highest_priority_first_then_the_oldest(repo: JobRepository) -> None:
    low = (await repo.submit(new_job("low", priority=-1))).job.id
    first = (await repo.submit(new_job("first"))).job.id
    second = (await repo.submit(new_job("second"))).job.id
    urgent = (await repo.submit(new_job("urgent", priority=10))).job.id
    order = []
    while claim := await claim_next(repo, "w", f"http://slot{len(order)}"):
        order.append(claim.id)
    assert order == [urgent, first, second, low]


async def test_concurrent_submits_are_each_committed_once(repo: JobRepository) -> None:
    results = await asyncio.gather(*(repo.submit(new_job(f"p{i}")) for i in range(100)))
    ids = {r.job.id for r in results}
    assert len(ids) == 100
    assert len(await repo.page(limit=200)) == 100


async def test_submits_that_arrive_together_are_stored_in_one_round_trip_on_sqlite(
    sqlite_url: str,
) -> None:
    """BEGIN IMMEDIATE, the defaults read, the turns, the inserts and COMMIT of a group of
    submits run in one call on SQLite's thread; every job is there, in order, with its turn."""
    db = Database(sqlite_url)
    try:
        repo = JobRepository(db)
        await repo.submit(new_job("warm-up"))  # the pool's one write connection now exists
        async with db.write_engine.connect() as conn:
            trips = await count_round_trips(conn)
        submitted = await asyncio.gather(*(repo.submit(new_job(f"p{i}")) for i in range(20)))
        assert len(trips) == 1
        stored = {job.id: job for job in await repo.page(limit=50)}
        for result in submitted:  # the records handed out are what was stored
            assert stored[result.job.id] == result.job
        claimed = [(await claim_next(repo, "w", f"http://s{n}")) for n in range(21)]
        assert [c.payload["prompt"] for c in claimed if c] == ["warm-up"] + [
            f"p{i}" for i in range(20)
        ]
    finally:
        await db.dispose()


async def test_submits_under_tenant_limits_are_stored_in_one_round_trip_on_sqlite(
    sqlite_url: str,
) -> None:
    """With TENANT_MAX_QUEUED and TENANT_SUBMITS_PER_MINUTE on, the tenants' use of their
    limits is read in the same call on SQLite's thread, and counts the whole group."""
    db = Database(sqlite_url)
    try:
        repo = JobRepository(db, limits=TenantLimits(max_queued=3, per_minute=5))
        alice = dataclasses.replace(new_job("a"), owner="alice")
        await repo.submit(alice)  # the pool's one write connection now exists
        async with db.write_engine.connect() as conn:
            trips = await count_round_trips(conn)
        group = [alice] * 4 + [dataclasses.replace(new_job("n"), owner=None)] * 2
        outcomes = await asyncio.gather(
            *(repo.submit(new) for new in group), return_exceptions=True
        )
        assert len(trips) == 1
        refused = [o for o in outcomes if isinstance(o, TenantLimitReached)]
        assert len(refused) == 2 and "TENANT_MAX_QUEUED" in str(refused[0])  # 1 stored + 2 more
        assert len([o for o in outcomes if not isinstance(o, BaseException)]) == 4
        owners = sorted(str(job.owner) for job in await repo.page(limit=50))
        assert owners == ["None", "None", "alice", "alice", "alice"]
    finally:
        await db.dispose()


async def test_a_worker_that_lost_its_lease_can_no_longer_change_the_job(
    repo: JobRepository, clock: Clock
) -> None:
    job_id = (await repo.submit(new_job())).job.id
    stale = await claim_next(repo, "worker-a", "http://slot")
    assert stale is not None
    clock.advance(31)  # worker-a stops renewing (paused, partitioned...)
    assert await repo.reap_expired() == [(job_id, "queued")]
    fresh = await claim_next(repo, "worker-b", "http://slot")
    assert fresh is not None and fresh.id == job_id and fresh.attempts == 2
    assert await repo.complete(fresh, {"images": [], "info": "{}", "parameters": {}}, [b"png-b"])

    # worker-a wakes up: every write it tries touches nothing.
    assert not (await repo.touch(stale, progress=0.5)).alive
    assert not (await repo.requests(stale)).alive
    assert not await repo.complete(stale, {"images": [], "info": "stale"}, [b"png-a"])
    assert not await repo.finish(stale, "error", None)
    assert not await repo.requeue(stale, 0, None)
    assert not await repo.release(stale)
    row = await repo.get(job_id)
    assert row.status == "completed" and row.result["info"] == "{}"
    assert await repo.images(row.seq) == [b"png-b"]


async def test_a_stale_worker_changes_nothing_while_the_rerun_of_its_job_is_still_running(
    repo: JobRepository, clock: Clock
) -> None:
    """The fence is the lease token: while the rerun holds the job, the job is `processing` as
    it was under the stale lease, so only the token tells the two workers apart."""
    body = json.dumps({"prompt": "cat"})
    alices = NewJob("txt2img", request=body, payload=body, owner="alice")
    job_id = (await repo.submit(alices)).job.id
    stale = await claim_next(repo, "worker-a", "http://slot")
    assert stale is not None
    clock.advance(31)  # worker-a stops renewing (paused, partitioned...)
    assert await repo.reap_expired() == [(job_id, "queued")]
    rerun = await claim_next(repo, "worker-b", "http://slot")
    assert rerun is not None and rerun.id == job_id and rerun.token != stale.token
    assert (await repo.touch(rerun, progress=0.25, eta=9.0, preview="rerun-preview")).alive
    assert await repo.skip_running(owner="alice") == 1
    before = await repo.get(job_id)

    # worker-a wakes up while worker-b still runs the job: each write it tries is refused.
    await repo.clear_skip(stale)
    stale_result = {"images": [], "info": "stale"}
    accepted = {
        "touch": (await repo.touch(stale, progress=0.9, eta=1.0, preview="stale")).alive,
        "requests": (await repo.requests(stale)).alive,
        "complete": await repo.complete(stale, stale_result, [b"png-a"]),
        "complete canceled": await repo.complete(stale, stale_result, [], status="canceled"),
        "finish error": await repo.finish(stale, "error", '{"code": "x", "message": "stale"}'),
        "finish canceled": await repo.finish(stale, "canceled", None),
        "requeue": await repo.requeue(stale, 0, None),
        "release": await repo.release(stale),
    }
    assert accepted == dict.fromkeys(accepted, False)

    row = await repo.get(job_id)
    assert row == before  # status, lease, progress, skip, attempts: all still the rerun's
    assert row.status == "processing" and row.lease_owner == "worker-b"
    assert row.progress == 0.25 and row.result is None and row.error is None
    assert row.skip_requested_at is not None
    assert await repo.images(row.seq) == []
    assert await repo.preview(row.seq) == "rerun-preview"
    # The rerun's lease still holds: its own writes go through, and its answer is the job's.
    assert (await repo.requests(rerun)).skip_requested
    assert await repo.complete(rerun, {"images": [], "info": "rerun"}, [b"png-b"])
    done = await repo.get(job_id)
    assert done.status == "completed" and done.result["info"] == "rerun"
    assert await repo.images(done.seq) == [b"png-b"]


async def test_the_looks_of_running_jobs_at_one_moment_are_one_read_each_fenced_by_its_lease(
    repo: JobRepository, clock: Clock
) -> None:
    """A worker's jobs tick together; what was asked of each (a cancel, a skip) is read for all
    of them at once, and a stale worker asking beside the rerun of its job is still refused."""
    body = json.dumps({"prompt": "cat"})
    ids = [(await repo.submit(NewJob("txt2img", body, body, owner=o))).job.id for o in "abc"]
    stale = await claim_next(repo, "worker-a", "http://slot-0")
    assert stale is not None and stale.id == ids[0]
    clock.advance(31)
    assert await repo.reap_expired() == [(ids[0], "queued")]
    claims = [await claim_next(repo, "worker-b", f"http://slot-{n}") for n in range(3)]
    assert [c.id for c in claims if c] == ids
    rerun, skipped, canceled = claims
    assert await repo.skip_running(owner="b") == 1
    assert await repo.cancel(ids[2]) is not None

    statements: list[str] = []
    engine = repo.db.read_engine.sync_engine
    listen = lambda *args: statements.append(args[2])  # noqa: E731
    event.listen(engine, "before_cursor_execute", listen)
    try:
        asked = await asyncio.gather(*(repo.requests(c) for c in (stale, *claims)))
    finally:
        event.remove(engine, "before_cursor_execute", listen)
    assert len([s for s in statements if "cancel_requested_at" in s]) == 1
    alive = [touch.alive for touch in asked]
    assert alive == [False, True, True, True]  # the stale lease, then each current one
    assert [t.skip_requested for t in asked[1:]] == [False, True, False]
    assert [t.cancel_requested for t in asked[1:]] == [False, False, True]
    assert rerun.token != stale.token and skipped and canceled


async def test_an_expired_lease_requeues_until_attempts_run_out_then_errors_worker_lost(
    repo: JobRepository, clock: Clock
) -> None:
    job_id = (await repo.submit(new_job())).job.id
    for _ in range(2):
        assert await claim_next(repo, "w", "http://slot")
        clock.advance(31)
        reaped = await repo.reap_expired()
    assert reaped == [(job_id, "error")]
    row = await repo.get(job_id)
    assert row.status == "error" and row.attempts == 2 and row.completed_at is not None
    assert "worker lost" in row.error["message"]


async def test_a_live_lease_is_not_reaped(repo: JobRepository, clock: Clock) -> None:
    await repo.submit(new_job())
    claim = await claim_next(repo, "w", "http://slot")
    clock.advance(20)
    assert (await repo.touch(claim, progress=0.4, eta=3.0)).alive
    clock.advance(20)  # 40 s after the claim, 20 s after the renewal
    assert await repo.reap_expired() == []
    row = await repo.get(claim.id)
    assert row.status == "processing" and row.progress == 0.4 and row.eta_relative == 3.0


async def test_cancel_ends_a_queued_job_at_once_and_flags_a_running_one(
    repo: JobRepository,
) -> None:
    queued = (await repo.submit(new_job("q"))).job.id
    running = (await repo.submit(new_job("r", priority=5))).job.id
    claim = await claim_next(repo, "w", "http://slot")
    assert claim.id == running

    assert (await repo.cancel(queued)).status == "canceled"
    assert await claim_next(repo, "w", "http://other") is None  # nothing left to run

    row = await repo.cancel(running)
    assert row.status == "processing" and row.cancel_requested_at is not None
    assert (await repo.touch(claim)).cancel_requested
    assert await repo.finish(claim, "canceled", None)
    assert (await repo.get(running)).status == "canceled"


async def test_cancel_leaves_a_finished_job_as_it_is(repo: JobRepository) -> None:
    job_id = (await repo.submit(new_job())).job.id
    claim = await claim_next(repo, "w", "http://slot")
    await repo.complete(claim, {"images": []}, [])
    row = await repo.cancel(job_id)
    assert row.status == "completed" and row.cancel_requested_at is None
    assert await repo.cancel("no-such-job") is None


async def test_a_job_canceled_while_its_worker_died_ends_canceled(
    repo: JobRepository, clock: Clock
) -> None:
    job_id = (await repo.submit(new_job())).job.id
    await claim_next(repo, "w", "http://slot")
    await repo.cancel(job_id)
    clock.advance(31)
    assert await repo.reap_expired() == [(job_id, "canceled")]


async def test_a_preview_watch_is_written_once_per_half_window_and_lapses_unless_renewed(
    repo: JobRepository, db: Database, clock: Clock
) -> None:
    await repo.submit(new_job("watched"))
    claim = await claim_next(repo, "w", "http://slot")
    assert claim is not None
    assert not (await repo.requests(claim)).preview_wanted  # nobody looks: no previews

    async def stored() -> float | None:
        async with db.reading() as conn:
            query = select(jobs.c.preview_wanted_until).where(jobs.c.seq == claim.seq)
            return (await conn.execute(query)).scalar_one()

    await repo.watch(claim.seq, preview=True)
    assert (await repo.requests(claim)).preview_wanted
    assert await stored() == clock.now + 20
    written = await stored()
    clock.advance(9)  # a client polling /progress every moment: no write while half is left
    await repo.watch(claim.seq, preview=True)
    assert await stored() == written
    clock.advance(2)
    await repo.watch(claim.seq, preview=True)
    assert await stored() == clock.now + 20
    clock.advance(21)  # the watcher went away
    touch = await repo.touch(claim, progress=0.5)
    assert touch.alive and not touch.preview_wanted


async def test_a_read_of_the_job_asks_for_its_progress_and_a_preview_watch_for_both(
    repo: JobRepository,
) -> None:
    await repo.submit(new_job("watched"))
    claim = await claim_next(repo, "w", "http://slot")
    assert claim is not None
    asked = await repo.requests(claim)
    assert not asked.progress_wanted and not asked.preview_wanted  # nobody looks
    await repo.watch(claim.seq)  # GET /sdapi/v1/jobs/{id}
    asked = await repo.requests(claim)
    assert asked.progress_wanted and not asked.preview_wanted
    await repo.watch(claim.seq, preview=True)  # at once after: an event stream is not held back
    asked = await repo.requests(claim)
    assert asked.progress_wanted and asked.preview_wanted


async def test_a_watch_the_database_refuses_is_logged_not_raised_and_tried_again(
    repo: JobRepository, db: Database, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    await repo.submit(new_job("watched while the database is locked"))
    claim = await claim_next(repo, "w", "http://slot")
    assert claim is not None

    locked = sqlite3.OperationalError("database is locked")
    locked.sqlite_errorcode = sqlite3.SQLITE_BUSY  # as sqlite3 raises it past busy_timeout

    @contextlib.asynccontextmanager
    async def refused() -> AsyncIterator[None]:
        raise OperationalError("UPDATE jobs", {}, locked)
        yield

    monkeypatch.setattr(db, "writing_alone", refused)
    await repo.watch(claim.seq, preview=True)  # an event stream or /progress goes on
    assert "could not note that job" in caplog.text
    monkeypatch.undo()
    await repo.watch(claim.seq, preview=True)
    assert (await repo.requests(claim)).preview_wanted


async def test_a_queued_job_is_not_marked_watched_until_it_runs(repo: JobRepository) -> None:
    """On PostgreSQL the mark's write would lock the queued row just as a claim looks for it,
    and the claim passes over locked rows: the job would wait for the next look at the queue."""
    submitted = await repo.submit(new_job("polled while queued"))
    row = await repo.get(submitted.job.id)
    await repo.watch(row.seq, preview=True)  # a client polls it, or streams its events
    claim = await claim_next(repo, "w", "http://slot")
    assert claim is not None
    asked = await repo.requests(claim)
    assert not asked.progress_wanted and not asked.preview_wanted
    await repo.watch(row.seq, preview=True)  # the next look, once it runs: not held back
    asked = await repo.requests(claim)
    assert asked.progress_wanted and asked.preview_wanted


async def test_a_finished_job_is_not_marked_watched(repo: JobRepository, db: Database) -> None:
    submitted = await repo.submit(new_job("done"))
    await repo.cancel(submitted.job.id)
    row = await repo.get(submitted.job.id)
    await repo.watch(row.seq, preview=True)
    async with db.reading() as conn:
        query = select(jobs.c.preview_wanted_until).where(jobs.c.seq == row.seq)
        assert (await conn.execute(query)).scalar_one() is None


async def test_requeue_hides_the_job_until_its_backoff_is_over(
    repo: JobRepository, clock: Clock
) -> None:
    await repo.submit(new_job())
    claim = await claim_next(repo, "w", "http://slot")
    assert await repo.requeue(claim, 8.0, '{"code": "backend_unavailable", "message": "x"}')
    assert not await repo.has_due_job()
    assert await claim_next(repo, "w", "http://slot") is None
    clock.advance(8.5)
    assert await repo.has_due_job()
    again = await claim_next(repo, "w", "http://slot")
    assert again.id == claim.id and again.attempts == 2


async def test_release_gives_the_job_back_at_once_without_spending_an_attempt(
    repo: JobRepository,
) -> None:
    await repo.submit(new_job())
    claim = await claim_next(repo, "w", "http://slot")
    assert await repo.release(claim)
    again = await claim_next(repo, "w2", "http://slot")
    assert again.id == claim.id and again.attempts == 1


async def test_an_idempotency_key_returns_the_same_job_and_refuses_another_body(
    repo: JobRepository,
) -> None:
    first = await repo.submit(new_job("cat", key="k-1"))
    again = await repo.submit(new_job("cat", key="k-1"))
    assert not first.replayed and again.replayed and again.job.id == first.job.id
    with pytest.raises(IdempotencyKeyReused):
        await repo.submit(new_job("dog", key="k-1"))
    racing = await asyncio.gather(*(repo.submit(new_job("cow", key="k-2")) for _ in range(20)))
    assert len({r.job.id for r in racing}) == 1
    assert len(await repo.page(limit=100)) == 2


async def test_listing_is_newest_first_with_filters_and_a_cursor(repo: JobRepository) -> None:
    ids = [(await repo.submit(new_job(f"p{i}"))).job.id for i in range(5)]
    page = await repo.page(limit=2)
    assert [r.id for r in page] == [ids[4], ids[3]]
    page2 = await repo.page(limit=2, before_seq=page[-1].seq)
    assert [r.id for r in page2] == [ids[2], ids[1]]
    await repo.cancel(ids[0])
    assert [r.id for r in await repo.page(status="canceled")] == [ids[0]]
    assert await repo.page(type="img2img") == []


async def test_concurrent_claimers_never_claim_the_same_job(database_url: str) -> None:
    """Several workers (each with its own engine and pool) race for 150 jobs."""
    dbs = [Database(database_url) for _ in range(4)]
    repos = [JobRepository(db) for db in dbs]
    await asyncio.gather(*(repos[0].submit(new_job(f"p{i}")) for i in range(150)))
    claimed: list[str] = []

    async def claimer(repo: JobRepository, name: str) -> None:
        while claim := await claim_next(repo, name, f"http://{name}"):
            claimed.append(claim.id)
            await repo.complete(claim, {"images": []}, [])

    await asyncio.gather(*(claimer(r, f"w{i}-{j}") for i, r in enumerate(repos) for j in range(3)))
    assert len(claimed) == 150 and len(set(claimed)) == 150
    for db in dbs:
        await db.dispose()


async def test_a_backend_runs_one_job_at_a_time_across_workers(database_url: str) -> None:
    """Two workers configured with the same A1111 URL never run two jobs on it at once."""
    dbs = [Database(database_url) for _ in range(2)]
    one, two = (JobRepository(db) for db in dbs)
    for i in range(3):
        await one.submit(new_job(f"p{i}"))
    first = await claim_next(one, "worker-1", "http://shared")
    assert first is not None
    assert await claim_next(two, "worker-2", "http://shared") is None  # busy in worker-1
    assert await claim_next(two, "worker-2", "http://own") is not None  # other backends run
    await one.complete(first, {"images": []}, [])
    assert await claim_next(two, "worker-2", "http://shared") is not None
    for db in dbs:
        await db.dispose()


async def test_concurrent_claims_for_one_backend_never_overlap(database_url: str) -> None:
    """Six workers race to claim for the same backend: at most one job runs on it at a time."""
    dbs = [Database(database_url) for _ in range(3)]
    repos = [JobRepository(db) for db in dbs]
    await asyncio.gather(*(repos[0].submit(new_job(f"p{i}")) for i in range(30)))
    running: list[str] = []
    overlaps: list[int] = []
    done: list[str] = []

    async def worker(repo: JobRepository, name: str) -> None:
        idle = 0
        while idle < 50 and len(done) < 30:
            claim = await claim_next(repo, name, "http://shared")
            if claim is None:
                idle += 1
                await asyncio.sleep(0.002)
                continue
            running.append(claim.id)
            overlaps.append(len(running))
            await asyncio.sleep(0.001)
            running.remove(claim.id)
            await repo.complete(claim, {"images": []}, [])
            done.append(claim.id)

    await asyncio.gather(*(worker(r, f"w{i}-{j}") for i, r in enumerate(repos) for j in range(2)))
    assert sorted(done) == sorted(set(done)) and len(done) == 30
    assert max(overlaps) == 1
    for db in dbs:
        await db.dispose()


# Each table and its owner: the only modules that issue SQL for it.
TABLE_OWNERS = {
    "jobs": "a1111_proxy/jobs/",
    "job_payloads": "a1111_proxy/jobs/",
    "job_images": "a1111_proxy/jobs/",
    "job_previews": "a1111_proxy/jobs/",
    "workers": "a1111_proxy/jobs/workers.py",
    "catalogue": "a1111_proxy/catalogue.py",
    "controls": "a1111_proxy/catalogue.py",
    "webhook_deliveries": "a1111_proxy/deliveries.py",
    "webhook_attempts": "a1111_proxy/deliveries.py",
    "model_files": "a1111_proxy/model_info.py",
    "civitai_lookups": "a1111_proxy/model_info.py",
}


def _sources() -> dict[str, str]:
    root = Path(__file__).parents[2]  # the repository (tests/integration/ is two below)
    files = [*root.glob("a1111_proxy/**/*.py"), *root.glob("worker/**/*.py")]
    assert len(files) > 50, f"no sources found under {root}"  # never pass on an empty tree
    return {path.relative_to(root).as_posix(): path.read_text() for path in files}


def test_each_table_is_used_only_by_its_owner() -> None:
    strays = []
    for name, text in _sources().items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and node.module == "a1111_proxy.db.tables":
                strays += [
                    (alias.name, name)
                    for alias in node.names
                    if alias.name in TABLE_OWNERS and not name.startswith(TABLE_OWNERS[alias.name])
                ]
    assert not strays, f"tables used outside their owner (ask the owner instead): {strays}"


def test_only_the_state_machine_changes_a_jobs_status() -> None:
    """intake.py creates jobs (queued); only machine.py and control.py update them."""
    writers = {name for name, text in _sources().items() if "update(jobs)" in text}
    assert writers == {"a1111_proxy/jobs/machine.py", "a1111_proxy/jobs/control.py"}
    creators = {name for name, text in _sources().items() if "insert(jobs)" in text}
    assert creators == {"a1111_proxy/jobs/intake.py"}
