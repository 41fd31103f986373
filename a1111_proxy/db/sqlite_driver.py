"""aiosqlite with one thread round trip per statement, for SQLAlchemy's aiosqlite dialect.

aiosqlite runs each sqlite3 call on the connection's own thread, and SQLAlchemy makes four of
them per statement (open a cursor, execute, fetch, close): each a queue put, a thread switch and
an event-loop wake-up, which on a busy machine cost more than the statement itself. Here a
statement is one round trip: the cursor is made and closed in the caller's thread (plain Python
objects; the connection is opened with check_same_thread=False), and execute fetches its rows in
the same call. Everything else is aiosqlite's: the thread, the queue, the errors, the dialect's
URL handling. `DBAPI` is what `create_async_engine(..., module=DBAPI)` takes.

`READ_DBAPI` is for read-only transactions: their deferred BEGIN and their ROLLBACK run in the
caller's thread too (in WAL mode neither waits for a lock nor touches a file), so a read is one
round trip per SELECT and nothing else.
"""

from __future__ import annotations

import sqlite3
import types
from collections.abc import Iterable
from functools import partial
from typing import Any

import aiosqlite
from sqlalchemy.dialects.sqlite.aiosqlite import AsyncAdapt_aiosqlite_dbapi


class Cursor(aiosqlite.Cursor):
    """Executes and fetches in one round trip; rows wait here for SQLAlchemy's fetch."""

    _rows: list[Any] | None = None

    async def execute(self, sql: str, parameters: Iterable[Any] | None = None) -> Cursor:
        if sql == "BEGIN":  # deferred: takes no lock, reads nothing
            self._rows = None
            self._cursor.execute(sql)
            return self
        run = partial(_execute_and_fetch, self._cursor, sql, parameters or ())
        self._rows = await self._conn._execute(run)  # type: ignore[no-untyped-call]  # aiosqlite's
        return self

    async def executemany(self, sql: str, parameters: Iterable[Iterable[Any]]) -> Cursor:
        self._rows = None
        await super().executemany(sql, parameters)
        return self

    async def fetchall(self) -> list[Any]:
        if self._rows is None:
            return list(await super().fetchall())
        rows, self._rows = self._rows, []
        return rows

    async def fetchone(self) -> Any:
        if self._rows is None:
            return await super().fetchone()
        return self._rows.pop(0) if self._rows else None

    async def fetchmany(self, size: int | None = None) -> list[Any]:
        if self._rows is None:
            return list(await super().fetchmany(size))
        count = self._cursor.arraysize if size is None else size
        rows, self._rows = self._rows[:count], self._rows[count:]
        return rows

    async def close(self) -> None:
        self._rows = None
        self._cursor.close()


def _execute_and_fetch(cursor: sqlite3.Cursor, sql: str, parameters: Any) -> list[Any] | None:
    """On the connection's thread: the statement, then its rows if it returns any."""
    cursor.execute(sql, parameters)
    return cursor.fetchall() if cursor.description is not None else None


class Connection(aiosqlite.Connection):
    def cursor(self) -> Cursor:  # type: ignore[override]  # SQLAlchemy enters it: no await
        return Cursor(self, self._conn.cursor())

    async def rollback(self) -> None:
        if self._conn.in_transaction:  # not the pool's reset after a commit: nothing to undo
            await super().rollback()


class ReadConnection(Connection):
    """A connection that only reads: ending its transaction releases a snapshot, nothing more."""

    async def rollback(self) -> None:
        self._conn.rollback()


def connector(
    kind: type[Connection], database: str | Any, iter_chunk_size: int = 64, **kwargs: Any
) -> Connection:
    """aiosqlite.connect, with the connection usable from the event loop's thread too."""

    def connect() -> sqlite3.Connection:
        options = {**kwargs, "check_same_thread": False}
        made: sqlite3.Connection = sqlite3.connect(database, **options)
        return made

    return kind(connect, iter_chunk_size)


def _module(kind: type[Connection]) -> types.ModuleType:
    """aiosqlite's names (its errors, version), with this connect and Connection."""
    module = types.ModuleType(f"{__name__}.aiosqlite.{kind.__name__}")
    module.__dict__.update({name: getattr(aiosqlite, name) for name in aiosqlite.__all__})
    module.__dict__.update(connect=partial(connector, kind), Connection=kind, Cursor=Cursor)
    return module


DBAPI = AsyncAdapt_aiosqlite_dbapi(_module(Connection), sqlite3)
READ_DBAPI = AsyncAdapt_aiosqlite_dbapi(_module(ReadConnection), sqlite3)
