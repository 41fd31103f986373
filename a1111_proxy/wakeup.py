"""Learning quickly that the database changed, from another process, without hammering it.

SQLite: `PRAGMA data_version` on a connection of our own changes whenever any other connection
commits. Reading it costs microseconds and no I/O, so a waiter can check it every few
milliseconds. PostgreSQL: LISTEN on the channel that job writes NOTIFY.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from typing import Any, Protocol

from sqlalchemy.engine import make_url

from a1111_proxy.db.engine import sqlite_path
from a1111_proxy.jobs import NOTIFY_CHANNEL


class Wakeup(Protocol):
    async def start(self) -> None: ...

    async def wait(self, timeout: float) -> bool:
        """Wait until the database may have changed (True) or `timeout` passes (False)."""
        ...

    async def close(self) -> None: ...


class SqliteWakeup:
    def __init__(self, url: str, poll_seconds: float) -> None:
        self.path = sqlite_path(url)
        self.poll_seconds = poll_seconds
        self._conn: sqlite3.Connection | None = None
        self._version: int | None = None

    async def start(self) -> None:
        if self.path is not None:
            self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._version = self._read()

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
            await asyncio.sleep(min(self.poll_seconds, left))

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class PostgresWakeup:
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
