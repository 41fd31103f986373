"""Engines for SQLite and PostgreSQL, with the transaction discipline each one needs.

SQLite has one writer at a time. A deferred transaction that reads and then writes can fail with
SQLITE_BUSY at once, whatever busy_timeout says, so every write transaction here begins
IMMEDIATE, on a write engine with a single pooled connection (writers queue in-process, which is
fairer than SQLite's busy-sleep). Reads use a separate engine and never block the writer (WAL).
The WAL's checkpoints run in the background (`start_checkpoints`), never inside a commit.

PostgreSQL: a pooled connection that sat unused for PING_IDLE_SECONDS is pinged before it is
handed out, and replaced when the server no longer answers it (a restart, an idle timeout of a
proxy in between). One used more recently is handed out as it is: SQLAlchemy's pre-ping on
every checkout costs three round trips (BEGIN, the ping, ROLLBACK) on asyncpg, as many as the
work of a short transaction, and a restart takes longer than PING_IDLE_SECONDS, so a connection
from before it has been idle that long when the server is back. Reads, and writes of one
statement (`writing_alone`), run in autocommit: one round trip each, where asyncpg would add a
BEGIN and a COMMIT or ROLLBACK (under READ COMMITTED every statement has a snapshot of its own
either way).

A process keeps at most DATABASE_POOL_SIZE connections to PostgreSQL and never opens one beyond
them: a transaction that finds them all busy waits for one (transactions here are short and never
span network I/O). Connections opened for a burst and closed after it cost more than the wait:
a PostgreSQL backend to fork, asyncpg's look at the array types, every statement prepared
again, 10-20 ms of CPU on each side; and a few connections per process keep PostgreSQL's own
contention low.

`unavailable(exc)` tells a database that is away (a restart, a failover, a full pool, SQLite's
lock held past busy_timeout) from a statement that failed: the API answers 503 for it, the
worker waits and tries again.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import (
    DBAPIError,
    DisconnectionError,
    InterfaceError,
)
from sqlalchemy.exc import (
    TimeoutError as PoolTimeout,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from a1111_proxy.db.checkpoints import WAL_KEEP_BYTES, WalCheckpoints
from a1111_proxy.db.sqlite_driver import BEGINS, DBAPI, READ_DBAPI

if TYPE_CHECKING:
    from a1111_proxy.settings import Settings

SQLITE_PRAGMAS = (
    # First: switching to WAL needs a lock another connection may hold at that moment, and
    # without a busy timeout it fails at once ("database is locked") instead of waiting.
    "PRAGMA busy_timeout=10000",
    "PRAGMA journal_mode=WAL",
    "PRAGMA foreign_keys=ON",
    # Checkpoints run in the background, never inside a commit (db/checkpoints.py).
    "PRAGMA wal_autocheckpoint=0",
    f"PRAGMA journal_size_limit={WAL_KEEP_BYTES}",
)
PING_IDLE_SECONDS = 1.0
POOL_SIZE = 4
POOL_WAIT_SECONDS = 30.0
SYNCHRONOUS = {"normal": "NORMAL", "full": "FULL"}


class Database:
    """A read engine and a write engine (the same engine on PostgreSQL)."""

    def __init__(
        self,
        url: str,
        *,
        echo: bool = False,
        sqlite_synchronous: str = "normal",
        ping_idle_seconds: float = PING_IDLE_SECONDS,
        pool_size: int = POOL_SIZE,
    ) -> None:
        """`sqlite_synchronous` (SQLITE_SYNCHRONOUS): `normal`, a commit survives the process
        being killed and is on disk at the next WAL checkpoint; `full`, it is on disk (fsync)
        before the commit returns, so it survives a power cut too. `ping_idle_seconds`
        (PostgreSQL): how long a pooled connection may sit unused before it is pinged.
        `pool_size` (DATABASE_POOL_SIZE, PostgreSQL): the connections kept open; a transaction
        that finds them all busy waits for one rather than opening another (see the module's
        docstring)."""
        self.url = url
        self.dialect = make_url(url).get_backend_name()
        self._checkpoints: WalCheckpoints | None = None
        self._checkpointing: asyncio.Task[None] | None = None
        if self.is_sqlite:
            check_sqlite_version()
            ensure_sqlite_dir(url)
            pragmas = (*SQLITE_PRAGMAS, f"PRAGMA synchronous={SYNCHRONOUS[sqlite_synchronous]}")
            self.write_engine = _sqlite_engine(
                url, "BEGIN IMMEDIATE", pragmas, pool_size=1, echo=echo
            )
            self.read_engine = _sqlite_engine(
                url, "BEGIN", pragmas, pool_size=4, echo=echo, reads=True
            )
            path = sqlite_path(url)
            if path is not None and make_url(url).query.get("mode") != "ro":
                self._checkpoints = WalCheckpoints(path)
        else:
            self.write_engine = create_async_engine(
                url, pool_size=pool_size, max_overflow=0, pool_timeout=POOL_WAIT_SECONDS, echo=echo
            )
            _ping_when_idle(self.write_engine, ping_idle_seconds)
            # The same pool: a connection is in autocommit while checked out from this one.
            self.read_engine = self.write_engine.execution_options(isolation_level="AUTOCOMMIT")

    @classmethod
    def for_settings(cls, settings: Settings) -> Database:
        """The database a long-running process (`serve`, `worker`) uses: DATABASE_URL with
        SQLITE_SYNCHRONOUS and DATABASE_POOL_SIZE."""
        return cls(
            settings.database_url,
            sqlite_synchronous=settings.sqlite_synchronous,
            pool_size=settings.database_pool_size,
        )

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    @asynccontextmanager
    async def writing(self) -> AsyncIterator[AsyncConnection]:
        """A short write transaction: committed on exit, rolled back on error."""
        async with self.write_engine.begin() as conn:
            yield conn

    @asynccontextmanager
    async def writing_alone(self) -> AsyncIterator[AsyncConnection]:
        """A write of one statement, its own transaction: on PostgreSQL in autocommit (one
        round trip); on SQLite, writing()."""
        engine = self.write_engine if self.is_sqlite else self.read_engine
        async with engine.begin() if self.is_sqlite else engine.connect() as conn:
            yield conn

    @asynccontextmanager
    async def reading(self) -> AsyncIterator[AsyncConnection]:
        async with self.read_engine.connect() as conn:
            yield conn

    def start_checkpoints(self) -> None:
        """SQLite: run the WAL's checkpoints in the background from now until dispose() (a
        long-running process that writes: the API's and the worker's; db/checkpoints.py)."""
        if self._checkpoints is not None and self._checkpointing is None:
            self._checkpointing = asyncio.create_task(
                self._checkpoints.run(), name="wal-checkpoints"
            )

    async def dispose(self) -> None:
        if self._checkpointing is not None:
            self._checkpointing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checkpointing
            self._checkpointing = None
        await self.write_engine.dispose()
        if self.is_sqlite:  # PostgreSQL's read engine shares the write engine's pool
            await self.read_engine.dispose()


# What says the database is away or not taking work now, rather than that a statement failed.
# PostgreSQL SQLSTATEs: class 08 (connection exception), admin/crash shutdown and "cannot
# connect now" (57P01-57P03, a server starting or stopping), too many connections (53300).
PG_AWAY = ("08", "57P01", "57P02", "57P03", "53300")
# sqlite3 primary result codes: BUSY, LOCKED (a lock held past busy_timeout), IOERR, FULL,
# CANTOPEN, PROTOCOL. sqlite3 raises OperationalError for a missing table too, so the class
# alone says nothing.
SQLITE_AWAY = frozenset({5, 6, 10, 13, 14, 15})


def unavailable(exc: BaseException) -> bool:
    """Whether `exc` says the database could not be reached, dropped the connection or cannot
    take work now (try again later), rather than that it refused a statement (a bug)."""
    if isinstance(exc, PoolTimeout):  # no pooled connection came free in POOL_WAIT_SECONDS
        return True
    if isinstance(exc, DBAPIError):
        code = getattr(exc.orig, "sqlite_errorcode", None)
        if code is not None:
            return code & 0xFF in SQLITE_AWAY
        if exc.connection_invalidated or exc.statement is None or isinstance(exc, InterfaceError):
            return True  # dropped; failed while connecting; asyncpg's "connection is closed"
        return (getattr(exc.orig, "sqlstate", None) or "").startswith(PG_AWAY)
    return isinstance(exc, ConnectionError | socket.gaierror)  # asyncpg's connect, unwrapped


def why_unavailable(exc: BaseException) -> str:
    """The driver's own words for `exc`, one line (never the statement or its values)."""
    return str(getattr(exc, "orig", None) or exc).splitlines()[0]


@contextlib.contextmanager
def unless_unavailable() -> Iterator[None]:
    """Suppress an error that says the database is away (`unavailable`); raise any other."""
    try:
        yield
    except Exception as exc:
        if not unavailable(exc):
            raise


def _ping_when_idle(engine: AsyncEngine, idle_seconds: float) -> None:
    """Ping a pooled connection unused for `idle_seconds` before handing it out; the pool
    replaces it when the ping fails."""

    @event.listens_for(engine.sync_engine, "checkin")
    def _on_checkin(_dbapi_connection: Any, record: Any) -> None:
        record.info["returned_at"] = time.monotonic()

    @event.listens_for(engine.sync_engine, "checkout")
    def _on_checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        returned_at = record.info.pop("returned_at", None)
        if dbapi_connection.driver_connection.is_closed():  # the server closed it meanwhile
            raise DisconnectionError("a pooled connection was closed by the server")
        if returned_at is None or time.monotonic() - returned_at < idle_seconds:
            return  # new, or in use a moment ago
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as exc:
            raise DisconnectionError(f"a pooled connection did not answer: {exc}") from exc


def _sqlite_engine(
    url: str,
    begin: str,
    pragmas: tuple[str, ...],
    *,
    pool_size: int,
    echo: bool,
    reads: bool = False,
) -> AsyncEngine:
    engine = create_async_engine(
        url,
        module=READ_DBAPI if reads else DBAPI,
        pool_size=pool_size,
        max_overflow=0,
        pool_timeout=60,
        echo=echo,
    )

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from the driver, so that BEGIN is ours to issue.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for pragma in pragmas:
            cursor.execute(pragma)
        cursor.close()

    assert begin in BEGINS

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        # To the driver itself: as a statement, SQLAlchemy's work for it cost more than a
        # read's SELECT (the driver runs neither BEGIN in a round trip of its own anyway).
        conn.connection.driver_connection.begin(begin)

    return engine


def check_sqlite_version() -> None:
    if sqlite3.sqlite_version_info < (3, 35, 0):
        raise RuntimeError(
            f"SQLite {sqlite3.sqlite_version} is too old: a1111-proxy needs 3.35 or newer "
            "(for UPDATE ... RETURNING). Use a newer Python build or PostgreSQL."
        )


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL (`.../jobs.db`, or `.../file:jobs.db?mode=ro&uri=true`); None for
    an in-memory database."""
    parsed = make_url(url)
    database = parsed.database
    if database and database.startswith("file:") and parsed.query.get("uri"):
        database = urlparse(database).path
    if not database or database == ":memory:":
        return None
    return Path(database)


def ensure_sqlite_dir(url: str) -> None:
    path = sqlite_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
