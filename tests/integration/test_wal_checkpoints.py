"""SQLite's WAL checkpoints run in the background (db/checkpoints.py), never inside a commit: a
commit never waits for the disk's fsync, a committed job reaches the database file within
seconds (at once when 1,000 pages wait), a quiet queue costs no checkpoint every round, and
sustained writes do not grow the WAL without end."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

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


@contextlib.asynccontextmanager
async def checkpointed(path: Path, **options: Any) -> AsyncIterator[Database]:
    """The database at `path`, its WAL checkpointed in the background as `options` say."""
    db = Database(f"sqlite+aiosqlite:///{path}")
    running = asyncio.create_task(WalCheckpoints(path, **options).run())
    try:
        yield db
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await db.dispose()


async def test_a_few_commits_reach_the_database_file_after_the_sync_interval_not_sooner(
    tmp_path: Path,
) -> None:
    path = tmp_path / "jobs.db"
    async with checkpointed(path, interval=0.05, sync_seconds=1.0) as db:
        await fill(db, 20)
        await asyncio.sleep(0.5)  # ten rounds: a quiet queue costs no checkpoint (no fsync)
        assert rows_in_the_database_file_alone(path, tmp_path) == 0
        async with asyncio.timeout(3):
            while rows_in_the_database_file_alone(path, tmp_path) < 20:
                await asyncio.sleep(0.05)


async def test_a_thousand_pages_waiting_are_checkpointed_at_once(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    async with checkpointed(path, interval=0.05, frames=100) as db:
        await fill(db, 150)
        async with asyncio.timeout(2):  # long before SYNC_SECONDS
            while rows_in_the_database_file_alone(path, tmp_path) < 100:
                await asyncio.sleep(0.05)


async def test_sustained_writes_start_the_wal_over_instead_of_growing_it(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    options = {"interval": 0.05, "frames": 50, "catch_up_frames": 200}
    largest = written = 0
    async with checkpointed(path, **options) as db:
        end = asyncio.get_running_loop().time() + 3
        while asyncio.get_running_loop().time() < end:  # writes that never pause
            await fill(db, 10)
            written += 10
            largest = max(largest, Path(f"{path}-wal").stat().st_size)
    assert written > 1000  # five times the catch-up size went through the WAL
    # Each row a page of its own: a WAL that never started over would have held them all.
    assert largest < written // 2 * 4096
