"""`up`'s restart backoff and how it names a child's end; the database URL as logs show it."""

from __future__ import annotations

from pathlib import Path

from a1111_proxy.db.check import redact
from a1111_proxy.db.engine import sqlite_path
from a1111_proxy.supervise import Backoff, describe_exit


def test_restarts_wait_one_second_then_twice_as_long_each_time_up_to_30() -> None:
    backoff = Backoff()
    assert [backoff.after(ran_for=0.5) for _ in range(8)] == [1, 2, 4, 8, 16, 30, 30, 30]


def test_a_child_that_stayed_up_a_minute_is_restarted_after_one_second_again() -> None:
    backoff = Backoff()
    for _ in range(5):
        backoff.after(ran_for=2)
    assert backoff.after(ran_for=60) == 1
    assert backoff.after(ran_for=2) == 2


def test_an_end_is_named_by_its_exit_code_or_its_signal() -> None:
    assert describe_exit(3) == "exit code 3"
    assert describe_exit(-9) == "killed by signal SIGKILL"


def test_a_database_url_is_shown_without_its_password() -> None:
    assert redact("postgresql+asyncpg://u:s3cret@db:5432/jobs") == (
        "postgresql+asyncpg://u:***@db:5432/jobs"
    )
    assert redact("sqlite+aiosqlite:///file:/data/j.db?mode=ro&uri=true") == (
        "sqlite+aiosqlite:///file:/data/j.db?mode=ro&uri=true"
    )


def test_a_sqlite_uri_names_its_file() -> None:
    assert sqlite_path("sqlite+aiosqlite:///file:/data/j.db?mode=ro&uri=true") == Path("/data/j.db")
    assert sqlite_path("sqlite+aiosqlite:////data/j.db") == Path("/data/j.db")
    assert sqlite_path("sqlite+aiosqlite:///file::memory:?uri=true") is None
