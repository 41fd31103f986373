"""SQLite's WAL checkpoints run in the background (db/checkpoints.py), never inside a commit: a
commit never waits for the disk's fsync, a committed job reaches the database file within about
half a second, and sustained writes do not grow the WAL without end."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import text

from a1111_proxy.db.checkpoints import WalCheckpoints
from a1111_proxy.db.engine import Database

pytestmark = pytest.mark.anyio

ROW = "x" * 3000  # most of a 4 KiB page: one WAL page per commit


async def fill(db: Database, commits: int) -> None:
    async with db.writing() as conn:
        await conn.execute(text("CREATE TABLE IF NOT EXISTS t (v TEXT)"))
    for _ in range(commits):
        async with db.writing() as conn:
            await conn.execute(text("INSERT INTO t VALUES (:v)"), {"v": ROW})


def rows_in_the_database_file_alone(path: Path, tmp_path: Path) -> int:
    """What a power cut would leave if the WAL were lost: the database file without it."""
    alone = tmp_path / "alone.db"
    shutil.copyfile(path, alone)
    with sqlite3.connect(alone) as conn:
        try:
            return conn.execute("SELECT count(*) FROM t").fetchone()[0]
        except sqlite3.OperationalError:  # not even the table yet
            return 0


async def test_a_commit_never_runs_a_checkpoint_itself(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    db = Database(f"sqlite+aiosqlite:///{path}")
    try:
        await fill(db, 1500)  # past the 1,000 pages at which SQLite's own would run
        assert rows_in_the_database_file_alone(path, tmp_path) == 0
    finally:
        await db.dispose()


async def test_a_committed_write_reaches_the_database_file_within_a_second(
    tmp_path: Path,
) -> None:
    path = tmp_path / "jobs.db"
    db = Database(f"sqlite+aiosqlite:///{path}")
    db.start_checkpoints()
    try:
        await fill(db, 20)
        async with asyncio.timeout(2):
            while rows_in_the_database_file_alone(path, tmp_path) < 20:
                await asyncio.sleep(0.05)
    finally:
        await db.dispose()


async def test_sustained_writes_start_the_wal_over_instead_of_growing_it(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    db = Database(f"sqlite+aiosqlite:///{path}")
    checkpoints = WalCheckpoints(path, interval=0.05, catch_up_frames=200)
    stop = asyncio.Event()

    async def write_without_pause() -> int:
        done = 0
        while not stop.is_set():
            await fill(db, 10)
            done += 10
        return done

    writing = asyncio.create_task(write_without_pause())
    running = asyncio.create_task(checkpoints.run())
    largest = 0
    try:
        for _ in range(300):
            await asyncio.sleep(0.01)
            largest = max(largest, Path(f"{path}-wal").stat().st_size)
    finally:
        stop.set()
        written = await writing
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await db.dispose()
    assert written > 1000  # five times the catch-up size went through the WAL
    # Each row a page of its own: a WAL that never started over would have held them all.
    assert largest < written // 2 * 4096
