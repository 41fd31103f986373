"""Whether anything can run jobs now, as the workers' heartbeats tell it.

Wait mode uses it to fail fast, as A1111 refusing the connection would: once no backend has
answered for BACKEND_DOWN_GRACE seconds (or none is configured, or no worker runs), a waiting
request gets 503 instead of hanging. Queued async jobs stay queued, and their job view says why
they wait. Each API process reads the heartbeats at most once a second, whoever asks.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from a1111_proxy.jobs import JobRepository, WorkerRecord

REFRESH_SECONDS = 1.0


@dataclass(frozen=True)
class Outage:
    """Nothing can run jobs: since when (wall clock) and why, naming backends and last errors."""

    since: float
    reason: str

    def age(self, now: float) -> float:
        return max(0.0, now - self.since)


class BackendWatch:
    def __init__(
        self,
        repo: JobRepository,
        *,
        grace: float,
        stale_after: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.repo = repo
        self.grace = grace
        self.stale_after = stale_after
        self.clock = clock
        self._read_at = float("-inf")
        self._outage: Outage | None = None
        self._no_worker_since: float | None = None
        self._lock = asyncio.Lock()

    async def outage(self) -> Outage | None:
        """The current outage, however short, or None when some backend can take jobs."""
        async with self._lock:
            now = self.clock()
            if now - self._read_at >= REFRESH_SECONDS:
                self._outage = self._judge(await self.repo.live_workers(self.stale_after), now)
                self._read_at = now
            return self._outage

    async def unavailable(self) -> Outage | None:
        """The outage once it has lasted BACKEND_DOWN_GRACE seconds: waiting is pointless."""
        outage = await self.outage()
        if outage is not None and outage.age(self.clock()) >= self.grace:
            return outage
        return None

    def _judge(self, workers: list[WorkerRecord], now: float) -> Outage | None:
        if not workers:
            self._no_worker_since = self._no_worker_since or now
            return Outage(
                self._no_worker_since,
                (
                    f"no worker has sent a heartbeat in the last {self.stale_after:.0f} s, so no "
                    "backend can run jobs: start one with `a1111-proxy worker` (or check its log)"
                ),
            )
        self._no_worker_since = None
        slots = [slot for row in workers for slot in row.slots]
        if not slots:
            return Outage(
                0.0,
                "no backend is configured: set A1111_PROXY_A1111_URLS to your "
                "A1111 servers (or A1111_PROXY_BACKEND=diffusers)",
            )
        if any(slot.get("state") != "down" for slot in slots):
            return None
        since = max(slot.get("down_since") or now for slot in slots)
        errors = "; ".join(
            f"{slot['backend']}: {slot.get('last_error') or 'down'}" for slot in _unique(slots)
        )
        return Outage(
            since,
            f"no backend answers ({errors}); check that A1111 runs with --api "
            "and that A1111_PROXY_A1111_URLS points at it",
        )


def _unique(slots: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per backend URL (several workers may share one A1111)."""
    seen: dict[str, dict[str, Any]] = {}
    for slot in slots:
        seen.setdefault(slot["backend"], slot)
    return list(seen.values())
