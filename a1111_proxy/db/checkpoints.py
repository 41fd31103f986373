"""SQLite's WAL checkpoints, in the background instead of inside a commit.

In WAL mode a commit appends pages to the `-wal` file; a checkpoint copies them into the
database file and fsyncs it. By default SQLite runs one inside every commit that takes the WAL
past 1,000 pages, so that commit, and every write queued behind it (a group of submits waiting
for its 202), waits for the disk's fsync: on a cloud VM's disk, whose fsyncs stall for 50-400 ms
now and then, that made the slowest submits take 200-300 ms. Our connections turn that off
(`PRAGMA wal_autocheckpoint=0`, db/engine.py) and each API and worker process runs this loop:
every CHECKPOINT_SECONDS it looks at the WAL file (stat only) and, when it changed, runs a
PASSIVE checkpoint on a connection of its own, in a thread, once it has grown by
CHECKPOINT_FRAMES pages, or the last checkpoint found that many (busy writes: every round), or
it changed SYNC_SECONDS ago. A PASSIVE checkpoint waits for no reader and no writer, so writes
go on while it syncs. With `SQLITE_SYNCHRONOUS=normal` it is also when commits reach the disk:
within about SYNC_SECONDS, where SQLite's default left them unsynced until the WAL had grown by
1,000 pages, minutes on a quiet queue. (A checkpoint every round instead cost a quiet queue an
fsync twice a second, and on the same disk some of its commits waited 70-250 ms for it.) This
loop never opens the database's files itself: closing a descriptor drops every POSIX lock the
process holds on that file, SQLite's own included.

The WAL starts over from its beginning at the first write that begins after a checkpoint
copied all of it (and is cut back to WAL_KEEP_BYTES then). Writes that never pause always have
one begun before the checkpoint ended, so it would never start over and the file would grow
without end: when a round finds more than CATCH_UP_FRAMES pages in it, the loop takes our
writers' lock (`<database>-writer`, db/sqlite_driver.py), so that none of ours is writing, and
runs a RESTART checkpoint (which waits up to RESTART_WAIT_SECONDS for readers older than it);
the next write starts the WAL over. Writers wait for that one, as they waited for SQLite's own
checkpoints, but only under sustained writes, once per 32 MiB of WAL instead of once per 4 MiB,
and never when writes pause.

Several processes may run it on one database: a checkpoint that meets another one running
returns at once (busy), and the next round catches up.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import sqlite3
import time
from pathlib import Path

log = logging.getLogger("a1111_proxy.db")

CHECKPOINT_SECONDS = 0.5  # how often the WAL is looked at
CHECKPOINT_FRAMES = 1000  # pages waiting that make a checkpoint due (SQLite's own threshold)
SYNC_SECONDS = 5.0  # pages waiting this long make one due (what a power cut may take)
CATCH_UP_FRAMES = 8192  # pages (32 MiB of 4 KiB pages) in a WAL that did not start over
RESTART_WAIT_SECONDS = 0.1  # how long a catch-up waits for readers older than it
# A WAL that starts over is cut back to this (journal_size_limit, set by db/engine.py).
WAL_KEEP_BYTES = 64 * 1024 * 1024
PAGE_BYTES = 4096  # SQLite's default page size (the WAL grows by a page and a small header)


class WalCheckpoints:
    """The background checkpoints of one SQLite database file."""

    def __init__(
        self,
        path: Path,
        interval: float = CHECKPOINT_SECONDS,
        frames: int = CHECKPOINT_FRAMES,
        sync_seconds: float = SYNC_SECONDS,
        catch_up_frames: int = CATCH_UP_FRAMES,
    ) -> None:
        self.path = path
        self.wal = Path(f"{path}-wal")
        self.interval = interval
        self.frames = frames
        self.sync_seconds = sync_seconds
        self.catch_up_frames = catch_up_frames
        self._done: tuple[int, int] | None = None  # the WAL's (size, mtime) last checkpointed
        self._changed_since: float | None = None  # monotonic: since when it changed after that
        self._last_frames = 0  # pages in the WAL at the last checkpoint
        self._conn: sqlite3.Connection | None = None
        self._running: asyncio.Future[None] | None = None  # a checkpoint in its thread now

    async def run(self) -> None:
        """Until cancelled: every `interval`, a checkpoint when one is due (due())."""
        try:
            while True:
                await asyncio.sleep(self.interval)
                await self.checkpoint_if_due()
        finally:
            self.close()

    async def checkpoint_if_due(self) -> None:
        try:
            stat = self.wal.stat()  # never open the -wal or -shm file here (see due())
        except FileNotFoundError:
            return  # no WAL yet (or the last connection closed and removed it)
        if not self.due((stat.st_size, stat.st_mtime_ns), time.monotonic()):
            return
        self._running = asyncio.ensure_future(asyncio.to_thread(self._checkpoint))
        try:
            await asyncio.shield(self._running)  # stopped meanwhile, it still ends in its thread
        except (sqlite3.Error, OSError) as exc:  # a full disk, a damaged file: say so, retry
            log.warning("WAL checkpoint of %s failed (%s); retrying", self.path, exc)
            return
        self._done = (stat.st_size, stat.st_mtime_ns)
        self._changed_since = None

    def due(self, wal: tuple[int, int], now: float) -> bool:
        """Whether a checkpoint is due, from the WAL file's (size, mtime) and what the last
        checkpoint found: nothing when the WAL did not change since; else once it changed
        SYNC_SECONDS ago, or at once when it grew by CHECKPOINT_FRAMES pages or the last
        checkpoint found that many (writes are busy: keep up every round). A quiet queue so
        costs an fsync every few seconds, not twice a second. Only stat(): opening and closing
        a file of the database would drop SQLite's POSIX locks on it in this process."""
        if wal == self._done:
            self._changed_since = None
            return False
        if self._changed_since is None:
            self._changed_since = now
        grown = wal[0] - (self._done[0] if self._done else 0) >= self.frames * PAGE_BYTES
        busy = self._last_frames >= self.frames
        return busy or grown or now - self._changed_since >= self.sync_seconds

    def _checkpoint(self) -> None:
        """In its thread: a checkpoint; and when the WAL did not start over since the last
        round although it holds CATCH_UP_FRAMES pages (writes never paused), a RESTART
        checkpoint under our writers' lock (it waits up to RESTART_WAIT_SECONDS for older
        readers), after which the next write starts the WAL over."""
        conn = self._connection()
        frames, _ = self._run(conn, "PASSIVE")
        self._last_frames = frames
        if frames > self.catch_up_frames:
            lock = os.open(f"{self.path}-writer", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX)
                self._run(conn, "RESTART")
            finally:
                os.close(lock)  # releases the lock too

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            # Not the first to open the file: our processes made it and set WAL mode.
            self._conn = sqlite3.connect(
                self.path, check_same_thread=False, timeout=RESTART_WAIT_SECONDS
            )
        return self._conn

    def _run(self, conn: sqlite3.Connection, mode: str) -> tuple[int, int]:
        busy, frames, copied = conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
        log.debug(
            "WAL checkpoint (%s) of %s: %s of %s pages copied%s",
            mode,
            self.path,
            copied,
            frames,
            " (busy: another checkpoint, or a reader)" if busy else "",
        )
        return frames, copied

    def close(self) -> None:
        """Close its connection, unless a checkpoint still uses it in its thread (stopped
        while one ran: the connection then closes with the process)."""
        if self._running is not None and not self._running.done():
            return
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None
