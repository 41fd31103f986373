"""Deadlines, retention and the queue view on a real database (SQLite file and PostgreSQL),
with a clock the tests move."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from typing import Any

import pytest
from sqlalchemy import func, select

from a1111_proxy.db.engine import Database, sqlite_path
from a1111_proxy.db.tables import job_images, job_payloads, job_previews, webhook_deliveries
from a1111_proxy.jobs import JobRepository, NewJob, error_json
from tests.claims import claim_next
from tests.fakes.clock import Clock
from worker.upkeep import Deadlines, Retention

pytestmark = pytest.mark.anyio


@pytest.fixture
def clock() -> Clock:
    return Clock(1_000_000.0)


@pytest.fixture
def repo_options(clock: Clock) -> dict[str, Any]:
    return {"max_attempts": 3, "lease_seconds": 30, "clock": clock}


async def submit(
    repo: JobRepository,
    *,
    priority: int = 0,
    timeout: float | None = None,
    payload: str | None = None,
    webhook: bool = False,
) -> str:
    body = json.dumps({"prompt": "a cat", "steps": 10})
    new = NewJob(
        "txt2img",
        request=body,
        payload=payload or body,
        priority=priority,
        timeout=timeout,
        webhook_url="http://hooks.example/x" if webhook else None,
        webhook_events=json.dumps(["completed"]) if webhook else None,
    )
    return (await repo.submit(new)).job.id


async def error_code(repo: JobRepository, job_id: str) -> str:
    row = await repo.get(job_id)
    assert row is not None
    return str(row.error["code"])


# --- deadlines --------------------------------------------------------------------------


async def test_a_queued_job_past_its_deadline_is_never_claimed_and_ends_canceled_deadline(
    repo: JobRepository, clock: Clock
) -> None:
    doomed = await submit(repo, timeout=5, webhook=True)
    clock.now += 5
    assert await claim_next(repo, "w", "slot") is None  # not started after its deadline
    assert await repo.has_expired_deadline()
    canceled, interrupted = await Deadlines(repo, 1.0).repo.expire_deadlines()
    assert (canceled, interrupted) == ([doomed], [])
    row = await repo.get(doomed)
    assert row.status == "canceled" and await error_code(repo, doomed) == "deadline"
    [delivery] = await repo.deliveries.for_job(row.seq)
    assert delivery[0].event == "completed"  # the completed webhook fires, as for any end
    assert not await repo.has_expired_deadline()


async def test_a_job_within_its_deadline_runs_normally(repo: JobRepository, clock: Clock) -> None:
    job_id = await submit(repo, timeout=60)
    clock.now += 59
    claim = await claim_next(repo, "w", "slot")
    assert claim is not None and claim.id == job_id
    assert await repo.complete(claim, {"images": []}, [])
    assert (await repo.get(job_id)).error is None


async def test_a_running_job_past_its_deadline_is_interrupted_and_ends_canceled_deadline(
    repo: JobRepository, clock: Clock
) -> None:
    job_id = await submit(repo, timeout=10)
    claim = await claim_next(repo, "w", "slot")
    assert claim is not None
    clock.now += 11
    await Deadlines(repo, 1.0).tick()
    touch = await repo.touch(claim, progress=0.5)
    assert touch.alive and touch.cancel_requested  # the worker interrupts it, as on cancel
    # The worker ends it the way it ends any canceled job; the deadline shows in the error.
    assert await repo.finish(claim, "canceled", error_json("canceled", "canceled while running"))
    assert await error_code(repo, job_id) == "deadline"


async def test_a_user_cancel_before_the_deadline_stays_a_plain_cancel(
    repo: JobRepository, clock: Clock
) -> None:
    job_id = await submit(repo, timeout=100)
    claim = await claim_next(repo, "w", "slot")
    await repo.cancel(job_id)
    clock.now += 200
    assert not await repo.has_expired_deadline()  # a cancel is already on its way
    assert await repo.finish(claim, "canceled", error_json("canceled", "canceled while running"))
    assert await error_code(repo, job_id) == "canceled"


# --- the queue view ---------------------------------------------------------------------


async def test_the_queue_lists_jobs_in_exactly_the_order_they_are_claimed(
    repo: JobRepository,
) -> None:
    ids = [await submit(repo, priority=p) for p in (0, 5, 0, -3, 5)]
    rows, total = await repo.queued(10)
    order = [row.id for row in rows]
    assert total == 5 and order == [ids[1], ids[4], ids[0], ids[2], ids[3]]
    assert [await repo.queue_position(row) for row in rows] == [1, 2, 3, 4, 5]
    claimed = []
    while (claim := await claim_next(repo, "w", "slot")) is not None:
        claimed.append(claim.id)
    assert claimed == order
    assert await repo.queue_position(await repo.get(ids[0])) is None  # no longer queued


# --- retention --------------------------------------------------------------------------


async def finished(
    repo: JobRepository,
    clock: Clock,
    *,
    image: bytes = b"png",
    payload: str | None = None,
    webhook: bool = False,
) -> str:
    job_id = await submit(repo, payload=payload, webhook=webhook)
    claim = await claim_next(repo, "w", "slot")
    assert claim is not None and claim.id == job_id
    await repo.touch(claim, progress=0.5, preview="cHJldmlldw==")
    assert await repo.complete(claim, {"images": []}, [image])
    return job_id


async def rows_for(repo: JobRepository, seq: int) -> int:
    async with repo.db.reading() as conn:
        total = 0
        for table in (job_payloads, job_images, job_previews, webhook_deliveries):
            query = select(func.count()).select_from(table).where(table.c.job_seq == seq)
            total += (await conn.execute(query)).scalar_one()
        return total


async def test_retention_deletes_old_finished_jobs_with_their_data_and_keeps_the_rest(
    repo: JobRepository, clock: Clock
) -> None:
    old = await finished(repo, clock)
    old_seq = (await repo.get(old)).seq
    assert await rows_for(repo, old_seq) == 3  # payload, image, preview
    old_waiting = await submit(repo, priority=-1)  # queued just as long: never deleted
    clock.now += 3600
    recent = await finished(repo, clock)
    clock.now += 100
    assert await Retention(repo, seconds=3600, interval=60, clock=clock).purge() == 1
    assert await repo.get(old) is None and await rows_for(repo, old_seq) == 0
    assert await repo.get(recent) is not None and await repo.get(old_waiting) is not None


async def test_retention_zero_keeps_everything_forever(repo: JobRepository, clock: Clock) -> None:
    job_id = await finished(repo, clock)
    clock.now += 10 * 365 * 86400
    assert await Retention(repo, seconds=0, interval=60, clock=clock).purge() == 0
    assert await repo.get(job_id) is not None


async def test_retention_keeps_a_job_while_its_completed_webhook_is_still_being_retried(
    repo: JobRepository, clock: Clock
) -> None:
    job_id = await finished(repo, clock, webhook=True)
    clock.now += 7200
    retention = Retention(repo, seconds=3600, interval=60, clock=clock)
    assert await retention.purge() == 0  # its job.completed is pending
    [claimed] = await repo.deliveries.claim(1, lease_seconds=30)
    from a1111_proxy.deliveries import Attempt, Verdict

    await repo.deliveries.record(
        claimed, Attempt(clock.now, 5, status_code=200), Verdict("delivered")
    )
    assert await retention.purge() == 1
    assert await repo.get(job_id) is None


async def test_retention_deletes_in_batches_of_100(repo: JobRepository, clock: Clock) -> None:
    for _ in range(130):
        await submit(repo)
    await repo.claim("w", [("slot", None)] * 130)  # then fail them all quickly
    async with repo.db.writing() as conn:
        from sqlalchemy import update

        from a1111_proxy.db.tables import jobs

        await conn.execute(
            update(jobs).values(
                status="error",
                completed_at=clock.now,
                lease_token=None,
                lease_owner=None,
                lease_expires_at=None,
            )
        )
    clock.now += 100
    assert await repo.purge_finished(clock.now - 10, 100) == 100
    assert await repo.purge_finished(clock.now - 10, 100) == 30


async def test_sqlite_gives_the_space_of_deleted_jobs_back_to_the_file_system(
    sqlite_url: str, clock: Clock
) -> None:
    db = Database(sqlite_url)
    repo = JobRepository(db, clock=clock)
    try:
        for _ in range(20):
            await finished(repo, clock, image=b"\x89PNG" + bytes(200_000))
        path = sqlite_path(sqlite_url)
        assert path is not None
        _checkpoint(path)
        full = path.stat().st_size
        clock.now += 100
        assert await Retention(repo, seconds=10, interval=60, clock=clock).purge() == 20
        _checkpoint(path)
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # INCREMENTAL
            assert conn.execute("PRAGMA freelist_count").fetchone()[0] == 0
        assert path.stat().st_size < full / 4
    finally:
        await db.dispose()


def _checkpoint(path: object) -> None:
    """Move the WAL into the main file, so that its size is what the data takes."""
    with sqlite3.connect(path) as conn:  # type: ignore[arg-type]
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


# --- following jobs (the event streams' source) -----------------------------------------


async def test_a_follower_sees_changes_and_once_it_leaves_nothing_is_kept_or_polled(
    repo: JobRepository, database_url: str
) -> None:
    from a1111_proxy.waiter import JobWaiter
    from a1111_proxy.wakeup import make_wakeup

    job_id = await submit(repo)
    waiter = JobWaiter(repo, make_wakeup(database_url, 0.005))
    try:
        with waiter.watch(job_id) as watch, waiter.watch(job_id) as other:
            await asyncio.wait_for(watch.changed.wait(), 5)
            assert watch.latest.status == "queued" and waiter.followers == 2
            watch.changed.clear()
            claim = await claim_next(repo, "w", "slot")
            await repo.touch(claim, progress=0.25, preview="cHJldmlldw==")
            while watch.latest.progress != 0.25 or watch.latest.preview_at is None:
                await asyncio.wait_for(watch.changed.wait(), 5)
                watch.changed.clear()
            assert other.latest == watch.latest  # one read serves every follower
        assert waiter.followers == 0
        await asyncio.wait_for(asyncio.shield(waiter._pump), 5)  # the pump stops with them
    finally:
        await waiter.close()
