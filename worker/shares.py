"""Shares: which backends a worker claims for at once, when several workers list the same ones.

A claim is safe whoever makes it (a backend runs one job at a time across all workers: the
claim's locks, jobs/placement.py); this only spreads the work. Without it, the worker whose
dispatcher woke first claimed every idle backend in one claim and then kept them, since a
worker claims a backend's next job the moment that backend answers: on 64 backends shared by 4
workers, one worker ran 483 of 576 jobs, and its claims waited 50 ms (p50) for its own busy
event loop while the other three idled.

Each backend has one owner among the live workers that list it, shares even to one backend
(`Shares.update`; the heartbeats say which workers live and what they list). A worker's
dispatcher claims for its own idle backends at once, and for the others only
GRACE_SECONDS later, when jobs are still waiting: their owner had its chance (it is busy,
stuck, or gone). The backend that just answered always stays with the worker that ran it.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable

from a1111_proxy.jobs import WorkerRecord
from a1111_proxy.redaction import backend_name

GRACE_SECONDS = 0.2


class Shares:
    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id
        # The backends (names shown to people) this worker owns; None: all of them (no other
        # worker's heartbeat read yet).
        self.owned: set[str] | None = None

    def update(self, mine: Iterable[str], live: Iterable[WorkerRecord]) -> None:
        """Own, of `mine` (this worker's backends), those the assignment gives this worker.
        Every worker computes the same assignment from the same heartbeats: the backends in
        the order of their hash, each to the worker listing it that owns the fewest so far
        (ties: the highest hash of backend and worker), so shares are even to one backend."""
        listed: dict[str, set[str]] = {}
        for worker in live:
            for slot in worker.slots:
                listed.setdefault(backend_name(str(slot.get("backend"))), set()).add(worker.id)
        for name in mine:
            listed.setdefault(backend_name(name), set()).add(self.worker_id)
        counts: Counter[str] = Counter()
        self.owned = set()
        for name in sorted(listed, key=lambda name: _rank(name, "")):
            owner = min(listed[name], key=lambda worker: (counts[worker], _rank(name, worker)))
            counts[owner] += 1
            if owner == self.worker_id:
                self.owned.add(name)

    def owns(self, backend: str) -> bool:
        return self.owned is None or backend_name(backend) in self.owned


def _rank(backend: str, worker_id: str) -> bytes:
    return hashlib.sha256(f"{backend}\n{worker_id}".encode()).digest()
