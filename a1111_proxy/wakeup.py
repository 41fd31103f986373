"""Learning quickly that the database changed, from another process, without hammering it.

SQLite: `PRAGMA data_version` on a connection of our own changes whenever any other connection
commits. On Linux, inotify on the database's folder says when its files are written, so a waiter
sleeps until then (no CPU while nothing happens) and confirms with data_version; elsewhere (or
if inotify is unavailable) it reads data_version every POLL_SECONDS, which costs microseconds.
PostgreSQL: LISTEN on the channel that job writes NOTIFY.

A waiter that cares about one kind of change (the webhook sender: a message queued) names it:
on PostgreSQL a channel of its own, on SQLite a `mark`, a query whose answer moves with that
change (the outbox's latest row), read on the waiter's own connection only when data_version
moved. Other commits then cost it a microsecond read instead of a round of queries.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import sqlite3
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection

from a1111_proxy.db.engine import Database, sqlite_path

log = logging.getLogger("a1111_proxy")

# A job changed (submitted, started, ended...): the API's waiters and event streams listen here.
NOTIFY_CHANNEL = "a1111_proxy_jobs"
# Progress and previews: only the API's event streams listen here, so workers are not woken
# several times a second by every running job's progress.
PROGRESS_CHANNEL = "a1111_proxy_progress"
# A webhook message queued (or made due again): only the webhook sender listens here.
OUTBOX_CHANNEL = "a1111_proxy_outbox"
# Work for the workers' dispatchers: a job became due (submitted, put back in the queue) or a
# request waits that they apply between jobs. Only they listen here: a job that ends wakes no
# worker to claim (the one that ran it claims its backend's next job itself), so the claims
# that each job's end would cost grow with the jobs, not with jobs x workers.
WORK_CHANNEL = "a1111_proxy_work"
# What a change that makes a job due NOTIFYs.
DUE = (NOTIFY_CHANNEL, WORK_CHANNEL)
RELISTEN_SECONDS = 0.25  # a dropped LISTEN connection is made again this soon,
RELISTEN_MAX_SECONDS = 5.0  # then twice as long each try, up to this


async def notify(db: Database, conn: AsyncConnection, *channels: str) -> None:
    """PostgreSQL: NOTIFY each of `channels` (NOTIFY_CHANNEL when none is named) when `conn`'s
    transaction commits, in one statement. SQLite: nothing to do (every commit changes the
    data_version that SqliteWakeup reads)."""
    if not db.is_sqlite:
        named = channels or (NOTIFY_CHANNEL,)
        await conn.execute(select(*(func.pg_notify(channel, "") for channel in named)))


def notifying(*channels: str) -> list[Any]:
    """PostgreSQL: columns that NOTIFY `channels` (NOTIFY_CHANNEL when none is named), for the
    RETURNING of a write that changes one row: the NOTIFY rides with that statement (a round
    trip less than notify()) and is sent when its transaction commits, if it changed a row."""
    return [
        func.pg_notify(channel, "").label(f"notify_{channel}")
        for channel in channels or (NOTIFY_CHANNEL,)
    ]


class Wakeup(Protocol):
    # True when wait() returning False means no commit happened at all (SQLite's data_version);
    # PostgreSQL only hears the channels it listens on.
    sees_every_commit: bool

    async def start(self) -> None: ...

    async def wait(self, timeout: float) -> bool:
        """Wait until the database may have changed (True) or `timeout` passes (False)."""
        ...

    def catch_up(self) -> None:
        """Forget the changes seen so far: the next wait() wakes only for later commits. For a
        caller about to look at the database, which sees those changes itself."""
        ...

    async def close(self) -> None: ...


class SqliteWakeup:
    sees_every_commit = True

    def __init__(self, url: str, poll_seconds: float, mark: str | None = None) -> None:
        """`mark`: a query; a commit wakes this waiter only if the query's answer moved."""
        self.path = sqlite_path(url)
        self.poll_seconds = poll_seconds
        self.mark = mark
        self.sees_every_commit = mark is None
        self._conn: sqlite3.Connection | None = None
        self._version: int | None = None
        self._marked: Any = None
        self._watch: FolderWatch | None = None

    async def start(self) -> None:
        if self.path is not None:
            self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._version = self._read()
            self._marked = self._read_mark()
            self._watch = FolderWatch.open(Path(self.path))

    def _read(self) -> int | None:
        if self._conn is None:
            return None
        return int(self._conn.execute("PRAGMA data_version").fetchone()[0])

    def _read_mark(self) -> Any:
        if self._conn is None or self.mark is None:
            return None
        try:
            return self._conn.execute(self.mark).fetchone()
        except sqlite3.Error:  # not migrated yet: every commit counts
            return object()

    def catch_up(self) -> None:
        self._version = self._read()
        self._marked = self._read_mark()

    def committed(self) -> bool:
        """Whether another connection committed since the last look."""
        version = self._read()
        if version != self._version:
            self._version = version
            return True
        return False

    def changed(self) -> bool:
        """Whether another connection committed (what the mark follows) since the last look."""
        if not self.committed():
            return False
        marked = self._read_mark()
        if self.mark is not None and marked == self._marked:
            return False
        self._marked = marked
        return True

    async def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        pauses: Iterator[float] = iter(())
        while True:
            seen = self._version
            if self.changed():
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self._watch is None:
                await asyncio.sleep(min(self.poll_seconds, left))
                continue
            if self._version != seen:  # a commit explained the file event (one the mark ignores)
                pauses = iter(())
            if await self._watch.wait(min(next(pauses, WATCH_RECHECK_SECONDS), left)):
                # SQLite writes a commit's pages to the -wal file (this event), then publishes
                # the commit in shared memory (no event): a look in between sees nothing yet.
                # Look again within milliseconds (or at the next event), not at the next recheck.
                pauses = iter(SETTLE_PAUSES)

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None


# With inotify, data_version is still read this often in case an event was missed (a network
# file system, a full event queue): a few reads a second, not two hundred.
WATCH_RECHECK_SECONDS = 0.25
# After a file event that showed no commit yet, look again after these pauses (31 ms in all).
SETTLE_PAUSES = (0.001, 0.002, 0.004, 0.008, 0.016)
_IN_MODIFY, _IN_CLOSE_WRITE, _IN_MOVED_TO, _IN_CREATE = 0x2, 0x8, 0x80, 0x100
_IN_NONBLOCK, _IN_CLOEXEC = 0o4000, 0o2000000
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then len bytes of name)


class FolderWatch:
    """inotify on the database's folder: set when one of the database's files (the file, its
    -wal or -journal) is written. The folder, not the files: SQLite deletes and recreates -wal."""

    def __init__(self, fd: int, prefix: bytes) -> None:
        self.fd = fd
        self.prefix = prefix
        self.event = asyncio.Event()
        asyncio.get_running_loop().add_reader(fd, self._on_readable)

    @classmethod
    def open(cls, database: Path) -> FolderWatch | None:
        """A watch on Linux; None where inotify is unavailable (the caller polls instead)."""
        if not sys.platform.startswith("linux"):
            return None
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
            if fd < 0:
                return None
            folder = str(database.resolve().parent).encode()
            mask = _IN_MODIFY | _IN_CLOSE_WRITE | _IN_MOVED_TO | _IN_CREATE
            if libc.inotify_add_watch(fd, folder, mask) < 0:
                os.close(fd)
                return None
        except (OSError, AttributeError):
            return None
        return cls(fd, database.name.encode())

    def _on_readable(self) -> None:
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        offset = 0
        while offset + _EVENT.size <= len(data):
            _, _, _, length = _EVENT.unpack_from(data, offset)
            name = data[offset + _EVENT.size : offset + _EVENT.size + length].rstrip(b"\0")
            offset += _EVENT.size + length
            if name.startswith(self.prefix):
                self.event.set()

    async def wait(self, timeout: float) -> bool:
        """True: one of the database's files was written; False: `timeout` passed."""
        await wait_set(self.event, timeout)
        written = self.event.is_set()
        self.event.clear()
        return written

    def close(self) -> None:
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self.fd)
        with contextlib.suppress(OSError):
            os.close(self.fd)


class PostgresWakeup:
    """LISTEN on its own connection. A connection the server drops (a restart, a failover) is
    made again, every RELISTEN_SECONDS at first and up to RELISTEN_MAX_SECONDS apart; the
    waiters are woken when it drops and when it is back, since notifications may have been
    missed in between (until then they wake on their own timeouts, as before a NOTIFY)."""

    sees_every_commit = False

    def __init__(self, url: str, channels: tuple[str, ...] = (NOTIFY_CHANNEL,)) -> None:
        self.dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        self.channels = channels
        self._event = asyncio.Event()
        self._conn: Any = None
        self._closing = False
        self._relistening: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._listen()

    async def _listen(self) -> None:
        import asyncpg

        conn = await asyncpg.connect(self.dsn)
        try:
            for channel in self.channels:
                await conn.add_listener(channel, self._on_notify)
        except BaseException:
            conn.terminate()
            raise
        conn.add_termination_listener(self._on_lost)
        self._conn = conn

    def _on_notify(self, *_args: Any) -> None:
        self._event.set()

    def _on_lost(self, _conn: Any) -> None:
        self._conn = None
        self._event.set()
        if not self._closing and (self._relistening is None or self._relistening.done()):
            self._relistening = asyncio.create_task(self._relisten(), name="relisten")

    async def _relisten(self) -> None:
        log.warning(
            "lost the database connection that LISTENs for %s; connecting again",
            ", ".join(self.channels),
        )
        delay = RELISTEN_SECONDS
        while not self._closing:
            await asyncio.sleep(delay)
            try:
                await self._listen()
            except Exception as exc:
                delay = min(delay * 2, RELISTEN_MAX_SECONDS)
                log.debug("LISTEN again failed (%s); next try in %.1f s", exc, delay)
                continue
            log.info("listening for %s again", ", ".join(self.channels))
            self._event.set()
            return

    def catch_up(self) -> None:
        self._event.clear()

    async def wait(self, timeout: float) -> bool:
        await wait_set(self._event, timeout)
        woke = self._event.is_set()
        self._event.clear()
        return woke

    async def close(self) -> None:
        self._closing = True
        if self._relistening is not None:
            self._relistening.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._relistening
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
            self._conn = None


async def wait_set(event: asyncio.Event, timeout: float) -> None:
    """Until `event` is set or `timeout` passes. Not asyncio.wait_for: on Python 3.11 it can
    swallow a cancellation that arrives as the event is set, and the waiter then sleeps on."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()


def make_wakeup(
    url: str,
    poll_seconds: float,
    channels: tuple[str, ...] = (NOTIFY_CHANNEL,),
    mark: str | None = None,
) -> Wakeup:
    """`channels`: what PostgreSQL NOTIFY channels to listen on. SQLite sees every commit, or,
    with a `mark` query, only those that move its answer."""
    if make_url(url).get_backend_name() == "sqlite":
        return SqliteWakeup(url, poll_seconds, mark)
    return PostgresWakeup(url, channels)
