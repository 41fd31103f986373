"""A database that cannot be used stops `serve`, `worker`, `migrate` and `up` at start-up with one
paragraph on stderr (the setting, its URL without the password, the reason, what to do) and a
non-zero exit status: 2 when only a change of configuration helps, 1 when a later try may pass."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from a1111_proxy.migrate import upgrade
from tests.conftest import _pg
from tests.servers import ROOT, free_port

pytestmark = pytest.mark.slow

AS_ROOT = "runs as root, whom file modes do not stop from writing (the mode=ro case still runs)"


def start(command: str, url: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`a1111-proxy <command>` on `url`; it must end by itself, having refused to start."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "A1111_PROXY_DATABASE_URL": url,
        "A1111_PROXY_BACKEND": "fake",
        "A1111_PROXY_PORT": str(free_port()),
    }
    argv = [sys.executable, "-m", "a1111_proxy", command]
    return subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


def refusal(done: subprocess.CompletedProcess[str]) -> str:
    """What the user reads: one line, no traceback."""
    output = done.stdout + done.stderr
    assert "Traceback" not in output, output
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("a1111-proxy: cannot use the database A1111_PROXY_DATABASE_URL=")
    return line


def sqlite(path: Path, query: str = "") -> str:
    return f"sqlite+aiosqlite:///{path}{query}"


def test_a_folder_that_cannot_be_made_is_named_with_the_reason(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    done = start("migrate", sqlite(tmp_path / "a-file" / "data" / "jobs.db"), tmp_path)
    assert done.returncode == 2
    line = refusal(done)
    assert f"its folder {tmp_path}/a-file/data does not exist and cannot be made" in line
    assert "Create the folder" in line


def test_a_folder_that_does_not_exist_yet_is_made(tmp_path: Path) -> None:
    done = start("migrate", sqlite(tmp_path / "new" / "data" / "jobs.db"), tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "new" / "data" / "jobs.db").is_file()


def test_a_path_that_is_a_folder_is_refused(tmp_path: Path) -> None:
    done = start("serve", sqlite(tmp_path), tmp_path)
    assert done.returncode == 2
    line = refusal(done)
    assert f"{tmp_path} is a folder, not a file" in line
    assert f"such as {tmp_path}/a1111_proxy.db" in line


@pytest.mark.parametrize("command", ["worker", "up"])
def test_a_file_that_is_not_a_sqlite_database_is_refused(tmp_path: Path, command: str) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not a database, not even close\n" * 100)
    done = start(command, sqlite(notes), tmp_path)
    assert done.returncode == 2
    assert f"{notes} is not a SQLite database (file is not a database)" in refusal(done)
    assert notes.read_text().startswith("not a database")  # left as it was


@pytest.mark.parametrize("journal", ["wal", "delete"])
def test_a_database_opened_read_only_is_refused_before_serve_answers_anything(
    tmp_path: Path, journal: str
) -> None:
    database = tmp_path / "jobs.db"
    upgrade(sqlite(database))
    with contextlib.closing(sqlite3.connect(database)) as conn:
        # A file in WAL mode already fails to open read-only; one in rollback-journal mode opens,
        # reads, and even begins IMMEDIATE: only a write says that it is read-only.
        conn.execute(f"PRAGMA journal_mode={journal}")
    done = start("serve", sqlite(Path(f"file:{database}"), "?mode=ro&uri=true"), tmp_path)
    assert done.returncode == 2
    line = refusal(done)
    assert f"{database} cannot be opened for writing (attempt to write a readonly database)" in line
    assert "do not open it with mode=ro" in line
    assert not (tmp_path / "file:").exists()  # the URI's path, not a folder named file:


@pytest.mark.skipif(os.geteuid() == 0, reason=AS_ROOT)
def test_a_read_only_database_file_is_refused(tmp_path: Path) -> None:
    database = tmp_path / "jobs.db"
    upgrade(sqlite(database))
    database.chmod(0o444)
    done = start("serve", sqlite(database), tmp_path)
    assert done.returncode == 2
    assert f"{database} cannot be opened for writing" in refusal(done)


@pytest.mark.skipif(os.geteuid() == 0, reason=AS_ROOT)
def test_a_database_in_a_read_only_folder_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    upgrade(sqlite(folder / "jobs.db"))
    folder.chmod(0o555)
    try:
        done = start("worker", sqlite(folder / "jobs.db"), tmp_path)
    finally:
        folder.chmod(0o755)
    assert done.returncode == 2
    assert "cannot be opened for writing" in refusal(done)


def test_an_unreachable_postgresql_server_is_named_without_its_password(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    done = start("migrate", f"postgresql+asyncpg://proxy:s3cret@127.0.0.1:{port}/jobs", tmp_path)
    assert done.returncode == 1  # the server may come back: a later try may pass
    line = refusal(done)
    assert f"=postgresql+asyncpg://proxy:***@127.0.0.1:{port}/jobs:" in line
    assert "s3cret" not in done.stdout + done.stderr
    assert f"the server at 127.0.0.1:{port} cannot be reached" in line


@pytest.mark.postgres
def test_a_postgresql_database_that_does_not_exist_is_named(
    tmp_path: Path, postgres_url: str
) -> None:
    missing = postgres_url.rsplit("/", 1)[0].replace("root@", "root:s3cret@") + "/no_such_db"
    done = start("serve", missing, tmp_path)
    assert done.returncode == 2
    line = refusal(done)
    assert 'the server refused: database "no_such_db" does not exist' in line
    assert "Create the database" in line and "s3cret" not in line


@pytest.fixture
def read_only_postgres(postgres_url: str) -> Iterator[str]:
    name = f"a1111_proxy_ro_{uuid.uuid4().hex[:10]}"
    _pg(f'CREATE DATABASE "{name}"')
    _pg(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
    try:
        yield postgres_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        _pg(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.postgres
def test_a_read_only_postgresql_database_is_refused(
    tmp_path: Path, read_only_postgres: str
) -> None:
    done = start("worker", read_only_postgres, tmp_path)
    assert done.returncode == 2
    assert "the server lets this session only read" in refusal(done)
