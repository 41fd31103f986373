"""Learning quickly that the database changed, from another process, without hammering it.

SQLite: `PRAGMA data_version` on a connection of our own changes whenever any other connection
commits. On Linux, inotify on the database's folder says when its files are written, so a waiter
sleeps until then (no CPU while nothing happens) and confirms with data_version; elsewhere (or
if inotify is unavailable) it reads data_version every POLL_SECONDS, which costs microseconds.
PostgreSQL: LISTEN on the channel that job writes NOTIFY.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import sqlite3
import struct
import sys
import time
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection

from a1111_proxy.db.engine import Database, sqlite_path

# A job changed (submitted, started, ended...): the API's waiters and event streams listen here.
NOTIFY_CHANNEL = "a1111_proxy_jobs"
# Progress and previews: only the API's event streams listen here, so workers are not woken
# several times a second by every running job's progress.
PROGRESS_CHANNEL = "a1111_proxy_progress"
# Work for the workers' dispatchers: a job became due (submitted, put back in the queue) or a
# request waits that they apply between jobs. Only they listen here: a job that ends wakes no
# worker to claim (the one that ran it claims its backend's next job itself), so the claims
# that each job's end would cost grow with the jobs, not with jobs x workers.
WORK_CHANNEL = "a1111_proxy_work"
# A webhook message was queued or made due: the workers' webhook senders listen here.
WEBHOOK_CHANNEL = "a1111_proxy_webhooks"
# What a change that makes a job due NOTIFYs.
DUE = (NOTIFY_CHANNEL, WORK_CHANNEL)


async def notify(db: Database, conn: AsyncConnection, *channels: str) -> None:
    """PostgreSQL: NOTIFY each of `channels` (NOTIFY_CHANNEL when none is named) when `conn`'s
    transaction commits, in one statement. SQLite: nothing to do (every commit changes the
    data_version that SqliteWakeup reads)."""
    if not db.is_sqlite:
        named = channels or (NOTIFY_CHANNEL,)
        await conn.execute(select(*(func.pg_notify(channel, "") for channel in named)))


class Wakeup(Protocol):
    # True when wait() returning False means no commit happened at all (SQLite's data_version);
    # PostgreSQL only hears the channels it listens on.
    sees_every_commit: bool

    async def start(self) -> None: ...

    async def wait(self, timeout: float) -> bool:
        """Wait until the database may have changed (True) or `timeout` passes (False)."""
        ...

    async def close(self) -> None: ...


class SqliteWakeup:
    sees_every_commit = True

    def __init__(self, url: str, poll_seconds: float) -> None:
        self.path = sqlite_path(url)
        self.poll_seconds = poll_seconds
        self._conn: sqlite3.Connection | None = None
        self._version: int | None = None
        self._watch: FolderWatch | None = None

    async def start(self) -> None:
        if self.path is not None:
            self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._version = self._read()
            self._watch = FolderWatch.open(Path(self.path))

    def _read(self) -> int | None:
        if self._conn is None:
            return None
        return int(self._conn.execute("PRAGMA data_version").fetchone()[0])

    def changed(self) -> bool:
        version = self._read()
        if version != self._version:
            self._version = version
            return True
        return False

    async def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if self.changed():
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self._watch is not None:
                await self._watch.wait(min(WATCH_RECHECK_SECONDS, left))
            else:
                await asyncio.sleep(min(self.poll_seconds, left))

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

    async def wait(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.event.wait(), timeout)
        self.event.clear()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self.fd)
        with contextlib.suppress(OSError):
            os.close(self.fd)


class PostgresWakeup:
    sees_every_commit = False

    def __init__(self, url: str, channels: tuple[str, ...] = (NOTIFY_CHANNEL,)) -> None:
        self.dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        self.channels = channels
        self._event = asyncio.Event()
        self._conn: Any = None

    async def start(self) -> None:
        import asyncpg

        self._conn = await asyncpg.connect(self.dsn)
        for channel in self.channels:
            await self._conn.add_listener(channel, self._on_notify)

    def _on_notify(self, *_args: Any) -> None:
        self._event.set()

    async def wait(self, timeout: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout)
        woke = self._event.is_set()
        self._event.clear()
        return woke

    async def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
            self._conn = None


def make_wakeup(
    url: str, poll_seconds: float, channels: tuple[str, ...] = (NOTIFY_CHANNEL,)
) -> Wakeup:
    """`channels`: what PostgreSQL NOTIFY channels to listen on (SQLite sees every commit)."""
    if make_url(url).get_backend_name() == "sqlite":
        return SqliteWakeup(url, poll_seconds)
    return PostgresWakeup(url, channels)
