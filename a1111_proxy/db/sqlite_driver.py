"""aiosqlite with one thread round trip per statement, for SQLAlchemy's aiosqlite dialect.

aiosqlite runs each sqlite3 call on the connection's own thread, and SQLAlchemy makes four of
them per statement (open a cursor, execute, fetch, close): each a queue put, a thread switch and
an event-loop wake-up, which on a busy machine cost more than the statement itself. Here a
statement is one round trip: the cursor is made and closed in the caller's thread (plain Python
objects; the connection is opened with check_same_thread=False), and execute fetches its rows in
the same call. Everything else is aiosqlite's: the thread, the queue, the errors, the dialect's
URL handling. `DBAPI` is what `create_async_engine(..., module=DBAPI)` takes.

Write transactions of every process (API and workers) queue on an advisory lock file beside the
database (`<database>-writer`, flock): BEGIN IMMEDIATE is issued once the lock is held, so it
never meets another of our writers, and a waiting writer is woken by the kernel the moment the
lock is released. SQLite's own busy handler sleeps in steps of up to 100 ms while it waits for
the write lock, which made the slowest of many concurrent submits from several processes wait
hundreds of milliseconds. Other programs writing the file (the sqlite3 shell, a backup) still
meet SQLite's busy handler as before.

`READ_DBAPI` is for read-only transactions: their deferred BEGIN and their ROLLBACK run in the
caller's thread too (in WAL mode neither waits for a lock nor touches a file), so a read is one
round trip per SELECT and nothing else.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import types
from collections.abc import Iterable
from functools import partial
from typing import Any
from urllib.parse import urlparse

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
        if sql == "BEGIN IMMEDIATE":
            self._rows = None
            await self._conn._execute(self._conn.begin_writing, self._cursor)  # type: ignore[attr-defined,no-untyped-call]
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
    writer_lock: int | None = None  # the open lock file (see the module's doc), if any

    def cursor(self) -> Cursor:  # type: ignore[override]  # SQLAlchemy enters it: no await
        return Cursor(self, self._conn.cursor())

    def begin_writing(self, cursor: sqlite3.Cursor) -> None:
        """On the connection's thread: wait for the writer lock, then BEGIN IMMEDIATE."""
        if self.writer_lock is not None:
            fcntl.flock(self.writer_lock, fcntl.LOCK_EX)
        try:
            cursor.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        if self.writer_lock is not None:
            fcntl.flock(self.writer_lock, fcntl.LOCK_UN)

    async def commit(self) -> None:
        try:
            await super().commit()
        finally:
            if not self._conn.in_transaction:
                self._release()

    async def rollback(self) -> None:
        if self._conn.in_transaction:  # not the pool's reset after a commit: nothing to undo
            await super().rollback()
        self._release()

    async def close(self) -> None:
        try:
            await super().close()
        finally:
            if self.writer_lock is not None:
                os.close(self.writer_lock)  # releases the lock too
                self.writer_lock = None


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

    made = kind(connect, iter_chunk_size)
    path = _file_of(database, bool(kwargs.get("uri")))
    if kind is Connection and path is not None:
        try:
            made.writer_lock = os.open(f"{path}-writer", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            pass  # a folder we may not write: SQLite's own error will say what is wrong
    return made


def _file_of(database: Any, uri: bool) -> str | None:
    """The database's file, for its writer lock; None in memory."""
    name = os.fspath(database) if isinstance(database, (str, os.PathLike)) else None
    if name is None:
        return None
    if uri and name.startswith("file:"):
        parsed = urlparse(name)
        if "mode=memory" in parsed.query:
            return None
        name = parsed.path
    return None if name in ("", ":memory:") else name


def _module(kind: type[Connection]) -> types.ModuleType:
    """aiosqlite's names (its errors, version), with this connect and Connection."""
    module = types.ModuleType(f"{__name__}.aiosqlite.{kind.__name__}")
    module.__dict__.update({name: getattr(aiosqlite, name) for name in aiosqlite.__all__})
    module.__dict__.update(connect=partial(connector, kind), Connection=kind, Cursor=Cursor)
    return module


DBAPI = AsyncAdapt_aiosqlite_dbapi(_module(Connection), sqlite3)
READ_DBAPI = AsyncAdapt_aiosqlite_dbapi(_module(ReadConnection), sqlite3)
