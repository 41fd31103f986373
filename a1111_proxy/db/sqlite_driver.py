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

`on_connection_thread` runs a whole function of sqlite3 calls on a connection's thread, inside
its current transaction: many statements for one round trip, each a statement sqlite3 has
prepared before (its statement cache), with no SQLAlchemy compile or parameter processing. The
submit path stores a group of jobs this way; `positional` turns a SQLAlchemy statement into the
SQL text and parameter order it takes, so the tables stay defined in one place.

`READ_DBAPI` is for read-only transactions: their deferred BEGIN and their ROLLBACK run in the
caller's thread too (in WAL mode neither waits for a lock nor touches a file), so a read is one
round trip per SELECT and nothing else.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import types
from collections import namedtuple
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cache, partial
from typing import Any, TypeVar
from urllib.parse import urlparse

import aiosqlite
from sqlalchemy.dialects import sqlite
from sqlalchemy.dialects.sqlite.aiosqlite import AsyncAdapt_aiosqlite_dbapi
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler

T = TypeVar("T")
BEGINS = ("BEGIN", "BEGIN IMMEDIATE")  # how our engines begin (db/engine.py): see Connection.begin
# Whether a round trip commits: always, never, or as its result says.
Commit = bool | Callable[[T], bool]


class Cursor(aiosqlite.Cursor):
    """Executes and fetches in one round trip; rows wait here for SQLAlchemy's fetch."""

    _rows: list[Any] | None = None

    async def execute(self, sql: str, parameters: Iterable[Any] | None = None) -> Cursor:
        connection: Connection = self._conn  # type: ignore[assignment]
        if sql in BEGINS:
            self._rows = None
            connection.begin(sql)
            return self
        run = partial(
            connection.run_statement, connection.take_begin(), self._cursor, sql, parameters or ()
        )
        self._rows = await connection._execute(run)  # type: ignore[no-untyped-call]  # aiosqlite's
        return self

    async def executemany(self, sql: str, parameters: Iterable[Iterable[Any]]) -> Cursor:
        self._rows = None
        connection: Connection = self._conn  # type: ignore[assignment]
        if connection.take_begin():
            await connection._execute(connection.begin_writing, self._cursor)  # type: ignore[no-untyped-call]
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
    # BEGIN IMMEDIATE was asked for and is not issued yet: the first statement's round trip
    # issues it (a write transaction costs one round trip fewer; it still holds the lock
    # before its first statement, reads included).
    begin_pending = False

    def cursor(self) -> Cursor:  # type: ignore[override]  # SQLAlchemy enters it: no await
        return Cursor(self, self._conn.cursor())

    def begin(self, sql: str) -> None:
        """BEGIN (deferred: takes no lock, reads nothing) at once, in the caller's thread;
        BEGIN IMMEDIATE in the round trip of the first statement."""
        if sql == "BEGIN":
            self._conn.execute(sql)
        else:
            self.begin_pending = True

    def take_begin(self) -> bool:
        """Whether a BEGIN IMMEDIATE is due (the caller's round trip issues it)."""
        begin, self.begin_pending = self.begin_pending, False
        return begin

    def run_statement(
        self, begin: bool, cursor: sqlite3.Cursor, sql: str, parameters: Any
    ) -> list[Any] | None:
        """On the connection's thread: BEGIN IMMEDIATE if due, then the statement and its rows."""
        if begin:
            self.begin_writing(cursor)
        return _execute_and_fetch(cursor, sql, parameters)

    async def in_one_trip(self, call: Callable[[sqlite3.Connection], T], *, commit: Commit[T]) -> T:
        """`call(connection)` on the connection's thread, after BEGIN IMMEDIATE if due; with
        `commit` (or when `commit(result)` says so), the transaction commits in the same round
        trip (the caller's commit then finds nothing left to do)."""
        return await self._execute(self._trip, self.take_begin(), call, commit)  # type: ignore[no-any-return,no-untyped-call]

    def _trip(self, begin: bool, call: Callable[[sqlite3.Connection], T], commit: Commit[T]) -> T:
        if begin:
            cursor = self._conn.cursor()
            try:
                self.begin_writing(cursor)
            finally:
                cursor.close()
        result = call(self._conn)
        if callable(commit):
            commit = commit(result)
        if commit and self._conn.in_transaction:
            self._conn.commit()
            self._release()
        return result

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
        if self.take_begin() or not self._conn.in_transaction:
            return  # no statement ran, or its last round trip committed (in_one_trip)
        try:
            await super().commit()
        finally:
            if not self._conn.in_transaction:
                self._release()

    async def rollback(self) -> None:
        self.take_begin()
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


async def on_connection_thread(
    conn: AsyncConnection, call: Callable[[sqlite3.Connection], T], *, commit: Commit[T] = False
) -> T:
    """`call(connection)` on the thread of `conn`'s sqlite3 connection, in its transaction, in
    one round trip; with `commit` (or when `commit(result)` says so: work that must go on in
    the transaction otherwise), the transaction commits in that round trip too."""
    raw = await conn.get_raw_connection()
    driver = raw.driver_connection
    if not isinstance(driver, Connection):
        raise TypeError(f"not a connection of this driver: {type(driver).__name__}")
    return await driver.in_one_trip(call, commit=commit)


async def read_on_connection_thread(
    conn: AsyncConnection, call: Callable[[sqlite3.Connection], T]
) -> T:
    """`call(connection)` on the thread of `conn`'s sqlite3 connection, in one round trip,
    its statements reading one snapshot (a read transaction of their own unless one is open)."""

    def in_one_snapshot(connection: sqlite3.Connection) -> T:
        began = not connection.in_transaction
        if began:
            connection.execute("BEGIN")
        try:
            return call(connection)
        finally:
            if began:
                connection.rollback()

    return await on_connection_thread(conn, in_one_snapshot)


def named_rows(cursor: sqlite3.Cursor) -> list[Any]:
    """The rows of `cursor`'s statement, each with its columns by name as SQLAlchemy's rows
    have them (`row.seq`), so that code reading rows takes either."""
    kind = _row_type(tuple(column[0] for column in cursor.description or ()))
    return [kind._make(row) for row in cursor.fetchall()]


@cache
def _row_type(names: tuple[str, ...]) -> Any:
    return namedtuple("Row", names, rename=True)


@dataclass(frozen=True)
class Prepared:
    """A SQLAlchemy statement as sqlite3 takes it: its text, with `?` placeholders, and its
    parameters' names in order (`defaults`: the values the statement itself binds)."""

    sql: str
    names: tuple[str, ...]
    defaults: dict[str, Any]

    def args(self, **values: Any) -> list[Any]:
        return [values[name] if name in values else self.defaults[name] for name in self.names]


def positional(statement: ClauseElement, columns: Sequence[str] | None = None) -> Prepared:
    """`statement` for sqlite3; `columns`: those an INSERT or UPDATE sets, by name."""
    compiled = statement.compile(
        dialect=sqlite.dialect(paramstyle="qmark"),
        column_keys=None if columns is None else list(columns),
    )
    assert isinstance(compiled, SQLCompiler)
    return Prepared(compiled.string, tuple(compiled.positiontup or ()), dict(compiled.params))


DBAPI = AsyncAdapt_aiosqlite_dbapi(_module(Connection), sqlite3)
READ_DBAPI = AsyncAdapt_aiosqlite_dbapi(_module(ReadConnection), sqlite3)
