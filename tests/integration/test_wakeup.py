"""Wake-ups (a1111_proxy/wakeup.py) on the real databases: what wakes a waiter, and what not."""

from __future__ import annotations

import asyncio
import json
import sqlite3

import pytest

from a1111_proxy import wakeup as wakeups
from a1111_proxy.db.engine import sqlite_path
from a1111_proxy.deliveries import outbox_wakeup
from a1111_proxy.jobs import JobRepository, NewJob
from a1111_proxy.wakeup import SqliteWakeup

pytestmark = pytest.mark.anyio


async def test_the_webhook_senders_wake_up_sleeps_through_job_changes_until_a_message_is_queued(
    repo: JobRepository, database_url: str
) -> None:
    waiter = outbox_wakeup(database_url, 0.005)
    await waiter.start()
    try:
        body = json.dumps({"prompt": "a cat"})
        new = NewJob(
            "txt2img",
            request=body,
            payload=body,
            webhook_url="http://127.0.0.1:9/hook",
            webhook_events=json.dumps(["completed"]),
        )
        await repo.submit(new)
        [(_, claim)] = await repo.claim("w", [("http://a1111", None)])
        # A submit and a claim queue no message: nothing to wake the sender for.
        assert await waiter.wait(0.3) is False
        await repo.complete(claim, {"images": []}, [])
        assert await waiter.wait(10) is True  # `completed` was queued
    finally:
        await waiter.close()


async def test_a_commit_published_just_after_its_file_event_is_seen_without_a_recheck(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite writes a commit's pages to the -wal file (the file event), then publishes it in
    shared memory: a look in between sees nothing yet. The waiter looks again within
    milliseconds instead of sleeping until its next recheck (here: never)."""
    monkeypatch.setattr(wakeups, "WATCH_RECHECK_SECONDS", 3600)
    waiter = SqliteWakeup(sqlite_url, 3600)
    await waiter.start()
    watch = waiter._watch
    if watch is None:
        pytest.skip("no inotify here: the waiter polls data_version instead")
    asyncio.get_running_loop().remove_reader(watch.fd)  # file events come from this test now
    looked = asyncio.Event()
    look = waiter.committed

    def counted() -> bool:
        looked.set()
        return look()

    waiter.committed = counted  # type: ignore[method-assign]
    waiting = asyncio.create_task(waiter.wait(3600))
    try:
        await asyncio.wait_for(looked.wait(), 10)  # the waiter's first look, then it sleeps
        looked.clear()
        watch.event.set()  # the -wal file was written...
        await asyncio.wait_for(looked.wait(), 10)  # ...and the look after it saw no commit
        path = sqlite_path(sqlite_url)
        with sqlite3.connect(str(path)) as conn:  # now the commit is there (and no event)
            conn.execute("INSERT INTO workers VALUES ('w', 1.0, 1.0, '[]')")
        assert await asyncio.wait_for(waiting, 10) is True
    finally:
        waiting.cancel()
        await waiter.close()


async def test_a_wake_up_caught_up_sleeps_through_the_commits_before_it(sqlite_url: str) -> None:
    waiter = SqliteWakeup(sqlite_url, 0.005)
    await waiter.start()
    path = str(sqlite_path(sqlite_url))
    try:
        with sqlite3.connect(path) as conn:
            conn.execute("INSERT INTO workers VALUES ('w1', 1.0, 1.0, '[]')")
        waiter.catch_up()  # the caller is about to look at what that commit did
        assert await waiter.wait(0.3) is False
        with sqlite3.connect(path) as conn:
            conn.execute("INSERT INTO workers VALUES ('w2', 1.0, 1.0, '[]')")
        assert await waiter.wait(10) is True
    finally:
        await waiter.close()


async def test_a_wait_cancelled_as_its_file_event_arrives_ends_at_once(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A waiter's owner (first_of in the worker and the webhook sender) cancels the waits it no
    longer needs; the cancellation must win even when the event has just come."""
    monkeypatch.setattr(wakeups, "WATCH_RECHECK_SECONDS", 3600)
    waiter = SqliteWakeup(sqlite_url, 3600)
    await waiter.start()
    watch = waiter._watch
    if watch is None:
        pytest.skip("no inotify here: the waiter polls data_version instead")
    asyncio.get_running_loop().remove_reader(watch.fd)
    waiting = asyncio.create_task(waiter.wait(3600))
    try:
        for _ in range(3):
            await asyncio.sleep(0)  # the waiter sleeps on the file event
        watch.event.set()
        await asyncio.sleep(0)  # the event's wait is done; the waiter has not resumed yet
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            async with asyncio.timeout(10):
                await waiting
    finally:
        waiting.cancel()
        await waiter.close()


async def test_while_it_looks_again_after_an_early_file_event_a_new_commit_wakes_it_at_once(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The looks after an event that showed no commit yet are waits on the next file event
    too, never blind sleeps: a job submitted meanwhile is claimed at once."""
    monkeypatch.setattr(wakeups, "WATCH_RECHECK_SECONDS", 3600)
    monkeypatch.setattr(wakeups, "SETTLE_PAUSES", (3600,))
    waiter = SqliteWakeup(sqlite_url, 3600)
    await waiter.start()
    watch = waiter._watch
    if watch is None:
        pytest.skip("no inotify here: the waiter polls data_version instead")
    looked = asyncio.Event()
    look = waiter.committed

    def counted() -> bool:
        looked.set()
        return look()

    waiter.committed = counted  # type: ignore[method-assign]
    waiting = asyncio.create_task(waiter.wait(7200))
    try:
        await asyncio.wait_for(looked.wait(), 10)
        looked.clear()
        watch.event.set()  # a file event that no commit explains (yet)
        await asyncio.wait_for(looked.wait(), 10)  # it looked, and now looks again later
        with sqlite3.connect(str(sqlite_path(sqlite_url))) as conn:
            conn.execute("INSERT INTO workers VALUES ('w', 1.0, 1.0, '[]')")
        assert await asyncio.wait_for(waiting, 10) is True
    finally:
        waiting.cancel()
        await waiter.close()
