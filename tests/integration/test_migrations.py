"""Migrations build exactly the schema the code declares, on SQLite and PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command

from a1111_proxy.migrate import alembic_config, upgrade
from tests.conftest import _pg, create_pg_database, postgres_unavailable


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path}/data/fresh.db"  # the folder does not exist yet
        return
    name = f"a1111_proxy_mig_{uuid.uuid4().hex[:10]}"
    if (failure := create_pg_database(name)) is not None:
        postgres_unavailable(failure)
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
