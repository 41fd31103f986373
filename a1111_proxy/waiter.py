"""JobWaiter: lets requests wait for jobs to end, and event streams follow them, learning both
from the database.

One pump per API process watches for database changes (SQLite's data_version, PostgreSQL's
NOTIFY) and then reads a small snapshot (status, attempts, progress, eta, preview time) of every
job someone waits for or follows, in a single short query. It works the same with several API
processes: nothing is signalled in-process. However many clients follow jobs, a process holds one
wakeup source and reads with one query per change, so streams never pin database connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

from a1111_proxy.availability import BackendWatch, Outage
from a1111_proxy.jobs import TERMINAL, JobRepository, JobState
from a1111_proxy.wakeup import Wakeup

log = logging.getLogger("a1111_proxy")

RECHECK_SECONDS = 1.0  # the backends' state is looked at this often while requests wait
FULL_READ_SECONDS = 15.0  # snapshots are read at least this often, changes or not


class Watch:
    """One follower of one job: the latest snapshot, and an event set when it changes."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.latest: JobState | None = None  # the job's latest state
        self.changed = asyncio.Event()
        self.gone = False

    def offer(self, snapshot: JobState | None) -> None:
        if snapshot is None:
            self.gone = True
            self.changed.set()
        elif snapshot != self.latest:
            self.latest = snapshot
            self.changed.set()


class JobWaiter:
    def __init__(
        self, repo: JobRepository, wakeup: Wakeup, backends: BackendWatch | None = None
    ) -> None:
        self.repo = repo
        self.wakeup = wakeup
        self.backends = backends
        self.outage: Outage | None = None  # nothing can run jobs, past the grace period
        self._waiting: defaultdict[str, set[asyncio.Future[str]]] = defaultdict(set)
        self._watching: defaultdict[str, set[Watch]] = defaultdict(set)
        self._pump: asyncio.Task[None] | None = None
        self._started = False

    @property
    def followers(self) -> int:
        """How many event streams follow jobs in this process."""
        return sum(len(watches) for watches in self._watching.values())

    async def wait(self, job_id: str, timeout: float) -> str:
        """ "done" once the job is terminal, "outage" when no backend can run jobs (see
        `outage`), or "timeout" if `timeout` passed first."""
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiting[job_id].add(future)
        self._ensure_pump()
        try:
            return await asyncio.wait_for(asyncio.shield(future), max(0.0, timeout))
        except TimeoutError:
            return "timeout"
        finally:
            _discard(self._waiting, job_id, future)

    @contextlib.contextmanager
    def watch(self, job_id: str) -> Iterator[Watch]:
        """Follow a job's snapshots until the block ends (a client that goes away ends it)."""
        watch = Watch(job_id)
        self._watching[job_id].add(watch)
        self._ensure_pump()
        try:
            yield watch
        finally:
            _discard(self._watching, job_id, watch)

    def _ensure_pump(self) -> None:
        if self._pump is None or self._pump.done():
            self._pump = asyncio.create_task(self._run_pump(), name="job waiter")

    async def _run_pump(self) -> None:
        if not self._started:
            await self.wakeup.start()
            self._started = True
        read_ids: set[str] = set()
        changed, quiet_since = True, asyncio.get_running_loop().time()
        while self._waiting or self._watching:
            ids = {*self._waiting, *self._watching}
            # Nothing changed and nobody new follows: the snapshots would be the same (but read
            # them now and then all the same, in case a wakeup was missed).
            stale = (
                not self.wakeup.sees_every_commit
                or asyncio.get_running_loop().time() - quiet_since >= FULL_READ_SECONDS
            )
            try:
                if changed or stale or not ids <= read_ids:
                    self._dispatch(await self.repo.snapshots(list(ids)))
                    read_ids, quiet_since = ids, asyncio.get_running_loop().time()
                await self._check_backends()
            except Exception as exc:  # a busy or unreachable database: try again shortly
                log.warning("could not read job states (%s: %s); retrying", type(exc).__name__, exc)
                read_ids = set()
            changed = await self.wakeup.wait(RECHECK_SECONDS)

    def _dispatch(self, snapshots: dict[str, JobState]) -> None:
        for job_id, futures in list(self._waiting.items()):
            found = snapshots.get(job_id)
            if found is not None and found.status in TERMINAL:
                _resolve(futures, "done")
        for job_id, watches in list(self._watching.items()):
            for watch in list(watches):
                watch.offer(snapshots.get(job_id))

    async def _check_backends(self) -> None:
        """Wake every waiting request once nothing can run jobs (they answer 503)."""
        if self.backends is None or not self._waiting:
            return
        self.outage = await self.backends.unavailable()
        if self.outage is not None:
            for futures in list(self._waiting.values()):
                _resolve(futures, "outage")

    async def close(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._pump
        if self._started:
            await self.wakeup.close()


def _resolve(futures: set[asyncio.Future[str]], end: str) -> None:
    for future in futures:
        if not future.done():
            future.set_result(end)


def _discard(registry: defaultdict[str, set[Any]], job_id: str, item: Any) -> None:
    items = registry.get(job_id)
    if items is not None:
        items.discard(item)
        if not items:
            del registry[job_id]
