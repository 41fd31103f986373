"""SQLITE_SYNCHRONOUS: every SQLite connection (the writer and the readers) runs with the
durability the operator chose, in WAL mode: `normal` (1) by default, `full` (2) on request."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text

from a1111_proxy.db.engine import Database


@pytest.mark.anyio
@pytest.mark.parametrize(("setting", "pragma"), [("normal", 1), ("full", 2)])
async def test_each_sqlite_connection_runs_with_the_chosen_durability(
    tmp_path: Path, setting: str, pragma: int
) -> None:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'jobs.db'}", sqlite_synchronous=setting)
    try:
        async with db.writing() as conn:
            assert (await conn.execute(text("PRAGMA synchronous"))).scalar() == pragma
            assert (await conn.execute(text("PRAGMA journal_mode"))).scalar() == "wal"
        async with db.reading() as conn:
            assert (await conn.execute(text("PRAGMA synchronous"))).scalar() == pragma
    finally:
        await db.dispose()
