"""JobWaiter: lets requests wait for jobs to end, learning it from the database.

One pump per API process watches for database changes (SQLite's data_version, PostgreSQL's
NOTIFY) and then reads the status of every job someone waits for in a single query. It works the
same with several API processes: nothing is signalled in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict

from a1111_proxy.jobs import TERMINAL, JobRepository
from a1111_proxy.wakeup import Wakeup

RECHECK_SECONDS = 1.0


class JobWaiter:
    def __init__(self, repo: JobRepository, wakeup: Wakeup) -> None:
        self.repo = repo
        self.wakeup = wakeup
        self._waiting: defaultdict[str, set[asyncio.Future[None]]] = defaultdict(set)
        self._pump: asyncio.Task[None] | None = None
        self._started = False

    async def wait(self, job_id: str, timeout: float) -> bool:
        """True once the job is terminal; False if `timeout` passed first."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[job_id].add(future)
        if self._pump is None or self._pump.done():
            self._pump = asyncio.create_task(self._run_pump(), name="job waiter")
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout)
            return True
        except TimeoutError:
            return False
        finally:
            self._forget(job_id, future)

    def _forget(self, job_id: str, future: asyncio.Future[None]) -> None:
        futures = self._waiting.get(job_id)
        if futures is not None:
            futures.discard(future)
            if not futures:
                del self._waiting[job_id]

    async def _run_pump(self) -> None:
        if not self._started:
            await self.wakeup.start()
            self._started = True
        while self._waiting:
            statuses = await self.repo.statuses(list(self._waiting))
            for job_id, status in statuses.items():
                if status in TERMINAL:
                    for future in self._waiting.get(job_id, ()):
                        if not future.done():
                            future.set_result(None)
            await self.wakeup.wait(RECHECK_SECONDS)

    async def close(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._pump
        if self._started:
            await self.wakeup.close()
