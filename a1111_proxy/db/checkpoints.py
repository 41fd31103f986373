"""SQLite's WAL checkpoints, in the background instead of inside a commit.

In WAL mode a commit appends pages to the `-wal` file; a checkpoint copies them into the
database file and fsyncs it. By default SQLite runs one inside every commit that takes the WAL
past 1,000 pages, so that commit, and every write queued behind it (a group of submits waiting
for its 202), waits for the disk's fsync: on a cloud VM's disk, whose fsyncs stall for 50-400 ms
now and then, that made the slowest submits take 200-300 ms. Our connections turn that off
(`PRAGMA wal_autocheckpoint=0`, db/engine.py) and each API and worker process runs this loop:
every CHECKPOINT_SECONDS, when the WAL changed, a PASSIVE checkpoint on a connection of its own,
in a thread. A PASSIVE checkpoint waits for no reader and no writer, so writes go on while it
syncs. With `SQLITE_SYNCHRONOUS=normal` it is also when commits reach the disk: within about
CHECKPOINT_SECONDS, where SQLite's default left them unsynced until the WAL had grown by 1,000
pages, minutes on a quiet queue.

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
from pathlib import Path

log = logging.getLogger("a1111_proxy.db")

CHECKPOINT_SECONDS = 0.5
CATCH_UP_FRAMES = 8192  # pages (32 MiB of 4 KiB pages) in a WAL that did not start over
RESTART_WAIT_SECONDS = 0.1  # how long a catch-up waits for readers older than it
# A WAL that starts over is cut back to this (journal_size_limit, set by db/engine.py).
WAL_KEEP_BYTES = 64 * 1024 * 1024


class WalCheckpoints:
    """The background checkpoints of one SQLite database file."""

    def __init__(
        self,
        path: Path,
        interval: float = CHECKPOINT_SECONDS,
        catch_up_frames: int = CATCH_UP_FRAMES,
    ) -> None:
        self.path = path
        self.wal = Path(f"{path}-wal")
        self.interval = interval
        self.catch_up_frames = catch_up_frames
        self.done = 0  # checkpoints run (for tests and the debug log)
        self._seen: tuple[int, int] | None = None  # the WAL's (size, mtime) last checkpointed
        self._conn: sqlite3.Connection | None = None
        self._running: asyncio.Future[None] | None = None  # a checkpoint in its thread now

    async def run(self) -> None:
        """Until cancelled: a checkpoint every `interval` while the WAL changes."""
        try:
            while True:
                await asyncio.sleep(self.interval)
                await self.checkpoint_if_changed()
        finally:
            self.close()

    async def checkpoint_if_changed(self) -> None:
        try:
            stat = self.wal.stat()
        except FileNotFoundError:
            return  # no WAL yet (or the last connection closed and removed it)
        seen = (stat.st_size, stat.st_mtime_ns)
        if seen == self._seen:
            return
        self._running = asyncio.ensure_future(asyncio.to_thread(self._checkpoint))
        try:
            await asyncio.shield(self._running)  # stopped meanwhile, it still ends in its thread
        except sqlite3.Error as exc:  # a full disk, a damaged file: say so, try again later
            log.warning("WAL checkpoint of %s failed (%s); retrying", self.path, exc)
            return
        self._seen = seen  # writes made during the checkpoint change it: the next round runs

    def _checkpoint(self) -> None:
        """In its thread: a checkpoint; and when the WAL did not start over since the last
        round although it holds CATCH_UP_FRAMES pages (writes never paused), a RESTART
        checkpoint under our writers' lock (it waits up to RESTART_WAIT_SECONDS for older
        readers), after which the next write starts the WAL over."""
        conn = self._connection()
        frames, _ = self._run(conn, "PASSIVE")
        if frames > self.catch_up_frames:
            lock = os.open(f"{self.path}-writer", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX)
                self._run(conn, "RESTART")
            finally:
                os.close(lock)  # releases the lock too
        self.done += 1

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
