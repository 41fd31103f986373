"""The SQLite driver under the engines (a1111_proxy/db/sqlite_driver.py): aiosqlite with one
round trip to the connection's thread per statement, and otherwise the same answers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import insert, select, text, update
from sqlalchemy.exc import IntegrityError

from a1111_proxy.db.engine import Database
from a1111_proxy.db.tables import workers
from tests.plans import count_round_trips

pytestmark = pytest.mark.anyio


@pytest.fixture
async def db(sqlite_url: str) -> AsyncIterator[Database]:
    made = Database(sqlite_url)
    yield made
    await made.dispose()


async def test_a_statement_and_its_rows_take_one_round_trip_to_the_connections_thread(
    db: Database,
) -> None:
    async with db.write_engine.connect() as conn:
        sent = await count_round_trips(conn)
        async with conn.begin():
            rows = (await conn.execute(text("SELECT 1 UNION SELECT 2 ORDER BY 1"))).all()
    assert [tuple(row) for row in rows] == [(1,), (2,)]
    # BEGIN IMMEDIATE (it may wait for the lock) with the statement, then COMMIT (it may write),
    # and no rollback when the pool takes the connection back; aiosqlite alone makes 4 round
    # trips of each statement (open a cursor, execute, fetch, close), one of BEGIN, and one for
    # that rollback.
    assert len(sent) == 2


async def test_a_transaction_whose_statements_run_in_one_trip_commits_in_it_too(
    db: Database,
) -> None:
    from a1111_proxy.db.sqlite_driver import on_connection_thread

    def store(connection: Any) -> int:
        connection.execute("INSERT INTO workers VALUES ('w1', 1.0, 1.0, '[]')")
        return int(connection.execute("SELECT count(*) FROM workers").fetchone()[0])

    async with db.write_engine.connect() as conn:
        sent = await count_round_trips(conn)
        async with conn.begin():
            assert await on_connection_thread(conn, store, commit=True) == 1
    assert len(sent) == 1  # BEGIN IMMEDIATE, the statements and COMMIT
    async with db.reading() as conn:
        assert (await conn.execute(select(workers.c.id))).scalars().all() == ["w1"]


async def test_a_read_is_one_round_trip_per_select_and_nothing_else(db: Database) -> None:
    async with db.reading() as conn:
        sent = await count_round_trips(conn)
        one = (await conn.execute(text("SELECT 1"))).scalar()
    assert one == 1
    assert len(sent) == 1  # its deferred BEGIN and its ROLLBACK run in the caller's thread


async def test_writes_returning_rows_counts_and_errors_are_the_drivers_own(db: Database) -> None:
    row = {"id": "w1", "started_at": 1.0, "heartbeat_at": 2.0, "slots": "[]"}
    async with db.writing() as conn:
        returned = (await conn.execute(insert(workers).returning(workers.c.id), row)).all()
        many = await conn.execute(insert(workers), [{**row, "id": "w2"}, {**row, "id": "w3"}])
        changed = await conn.execute(update(workers).values(heartbeat_at=3.0))
    assert [r.id for r in returned] == ["w1"]
    assert many.rowcount == 2 and changed.rowcount == 3
    with pytest.raises(IntegrityError):
        async with db.writing() as conn:
            await conn.execute(insert(workers), row)
    async with db.reading() as conn:
        ids = (await conn.execute(select(workers.c.id).order_by(workers.c.id))).scalars().all()
        streamed = [r.id async for r in await conn.stream(select(workers.c.id))]
    assert ids == ["w1", "w2", "w3"] and sorted(streamed) == ids


def sqlite_file(url: str) -> str:
    from a1111_proxy.db.engine import sqlite_path

    path = sqlite_path(url)
    assert path is not None
    return str(path)


async def test_a_write_waits_for_another_processes_writer_lock_and_goes_on_when_it_is_released(
    db: Database, sqlite_url: str
) -> None:
    """Writers of every process queue on `<database>-writer` (flock), woken by the kernel when
    it is released, instead of meeting SQLite's busy handler, which sleeps up to 100 ms a try.
    The lock is taken here on a file descriptor of its own, as another process holds it."""
    import asyncio
    import fcntl
    import os

    async with db.writing() as conn:  # the first write makes the lock file
        await conn.execute(text("SELECT 1"))
    other = os.open(f"{sqlite_file(sqlite_url)}-writer", os.O_RDWR)
    try:
        fcntl.flock(other, fcntl.LOCK_EX)

        async def write() -> None:
            async with db.writing() as conn:
                await conn.execute(
                    insert(workers).values(id="w1", started_at=1.0, heartbeat_at=1.0, slots="[]")
                )

        writing = asyncio.create_task(write())
        await asyncio.sleep(0.3)
        assert not writing.done()  # it waits for the lock, not beside it
        fcntl.flock(other, fcntl.LOCK_UN)
        await asyncio.wait_for(writing, 10)
        # ...and the lock is free again once it committed.
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(other)
    async with db.reading() as conn:
        assert (await conn.execute(select(workers.c.id))).scalars().all() == ["w1"]


async def test_a_failed_write_releases_the_writer_lock(db: Database, sqlite_url: str) -> None:
    import fcntl
    import os

    with pytest.raises(RuntimeError):
        async with db.writing() as conn:
            await conn.execute(text("SELECT 1"))
            raise RuntimeError("the caller's own error: rolled back")
    other = os.open(f"{sqlite_file(sqlite_url)}-writer", os.O_RDWR)
    try:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises BlockingIOError if held
    finally:
        os.close(other)
