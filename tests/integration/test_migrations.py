"""Migrations build exactly the schema the code declares, on SQLite and PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command

from a1111_proxy.migrate import alembic_config, upgrade
from tests.conftest import _pg


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path}/data/fresh.db"  # the folder does not exist yet
        return
    name = f"a1111_proxy_mig_{uuid.uuid4().hex[:10]}"
    try:
        _pg(f'CREATE DATABASE "{name}"')
    except Exception as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"no PostgreSQL at 127.0.0.1:5432 ({type(exc).__name__}: {exc})")
    yield f"postgresql+asyncpg://root@127.0.0.1:5432/{name}"
    _pg(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_upgrade_to_head_leaves_no_drift_and_downgrade_undoes_it(empty_database: str) -> None:
    upgrade(empty_database)
    config = alembic_config(empty_database)
    command.check(config)  # raises if autogenerate would find any difference
    command.downgrade(config, "base")
    upgrade(empty_database)  # and it goes up again cleanly


def test_a_sqlite_file_from_an_earlier_version_is_converted_to_incremental_vacuum(
    tmp_path: Path,
) -> None:
    import sqlite3

    path = tmp_path / "old.db"
    url = f"sqlite+aiosqlite:///{path}"
    upgrade(url, "788abb4a5cc6")  # the revision before auto-vacuum was set up
    with sqlite3.connect(path, isolation_level=None) as conn:  # as earlier versions made files
        conn.execute("PRAGMA auto_vacuum=NONE")
        conn.execute("VACUUM")
        assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 0
    upgrade(url)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # INCREMENTAL
    fresh = tmp_path / "new.db"
    upgrade(f"sqlite+aiosqlite:///{fresh}")
    with sqlite3.connect(fresh) as conn:
        assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2


def test_the_fair_share_revision_numbers_waiting_jobs_per_owner_and_priority(
    empty_database: str,
) -> None:
    """Queued and running jobs take turns 0, 1, 2... per owner and priority, in the order they
    came (jobs without an owner count as one owner), so the queue rotates across owners at once;
    finished jobs take 0."""
    import asyncio

    from sqlalchemy import text

    from a1111_proxy.db.engine import Database

    upgrade(empty_database, "62d8ef72f7db")  # the revision before
    jobs = [  # (owner, priority, status), in the order they were submitted
        ("alice", 0, "queued"),
        ("alice", 0, "processing"),
        ("alice", 0, "queued"),
        ("bob", 0, "queued"),
        ("alice", 5, "queued"),
        (None, 0, "queued"),
        ("bob", 0, "completed"),
        (None, 0, "queued"),
        ("bob", 0, "queued"),
    ]

    async def store() -> None:
        db = Database(empty_database)
        async with db.writing() as conn:
            for n, (owner, priority, status) in enumerate(jobs):
                await conn.execute(
                    text(
                        "INSERT INTO jobs (id, type, status, priority, request, max_attempts, "
                        "run_after, created_at, updated_at, owner, lease_token) VALUES (:id, "
                        "'txt2img', :status, :priority, '{}', 3, 0, 0, 0, :owner, :token)"
                    ),
                    {
                        "id": f"job-{n}",
                        "status": status,
                        "priority": priority,
                        "owner": owner,
                        "token": "t" if status == "processing" else None,
                    },
                )
        await db.dispose()

    async def turns() -> list[int]:
        db = Database(empty_database)
        async with db.reading() as conn:
            rows = await conn.execute(text("SELECT turn FROM jobs ORDER BY seq"))
            found = list(rows.scalars())
        await db.dispose()
        return found

    asyncio.run(store())
    upgrade(empty_database)
    assert asyncio.run(turns()) == [0, 1, 2, 0, 0, 0, 0, 1, 1]
