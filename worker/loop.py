"""Worker: one claimer per process handing jobs to backend slots, plus its side tasks.

Each slot (one backend URL) runs one job at a time. The dispatcher claims a job only for a free,
healthy slot. A slot whose backend was unavailable rests and is probed before it claims again, so
while a backend is down its jobs wait in the queue instead of burning their attempts. Side tasks
publish the worker's heartbeat (for /health) and reap expired leases of crashed workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

from a1111_proxy.backends import Backend, Batching
from a1111_proxy.db.engine import unavailable, unless_unavailable, why_unavailable
from a1111_proxy.jobs import Claim, JobRepository
from a1111_proxy.wakeup import Wakeup
from worker.catalogue import CatalogueKeeper
from worker.execute import Timing, execute, with_checkpoint
from worker.shares import GRACE_SECONDS, Shares

log = logging.getLogger("a1111_proxy.worker")

IDLE_RECHECK_SECONDS = 1.0  # look for due jobs at least this often (retries scheduled later)
WORKER_BEAT_SECONDS = 5.0
# A worker silent this long no longer owns a share of the backends it lists (shares.py).
SHARE_STALE_SECONDS = 3 * WORKER_BEAT_SECONDS
SHARE_READ_SECONDS = 1.0
# How long a backend that answered waits for a claim made for others that answered before it
# (then it is claimed for beside that claim): see Worker._claim_next.
HAND_OVER_WAIT_SECONDS = 0.1


class Chore(Protocol):
    """Background work beside the jobs (hashing model files, Civitai lookups): `tick` runs every
    `interval` seconds in a task of its own, so a slow chore never delays a job."""

    interval: float

    async def tick(self) -> None: ...

    async def aclose(self) -> None: ...


@dataclass(eq=False)  # a slot is itself (kept in sets), whatever its state
class Slot:
    backend: Backend
    task: asyncio.Task[str] | None = None
    claim: Claim | None = None
    state: str = "idle"  # idle | busy | down
    last_error: str | None = None
    down_since: float | None = None  # wall time of the first failure since it last answered
    rest_until: float = 0.0
    failures: int = 0
    jobs_done: int = 0
    checkpoint: str | None = None  # the checkpoint its last job asked for (likely still loaded)
    options_version: int = 0  # the pending options it has applied
    # The unload/reload request it has applied (None: none looked at yet; reported in the
    # heartbeat, so the API can tell when every backend has applied one).
    checkpoint_version: int | None = None
    # Jobs whose backend has answered and that are storing their result while the slot's next
    # job already runs.
    finishing: set[asyncio.Task[str]] = field(default_factory=set)
    reserved: bool = False  # a claim running now is looking for a job for it

    @property
    def batch(self) -> int:
        """How many compatible jobs it runs at once (a backend that batches; else 1)."""
        return self.backend.max_batch if isinstance(self.backend, Batching) else 1

    def free(self, now: float) -> bool:
        return (
            self.task is None
            and not self.reserved
            and (self.state != "down" or now >= self.rest_until)
        )

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.backend.name,
            "state": self.state,
            "job_id": self.claim.id if self.claim else None,
            "last_error": self.last_error,
            "down_since": self.down_since,
            "jobs_done": self.jobs_done,
            "checkpoint": self.checkpoint,
            "checkpoint_version": self.checkpoint_version,
        }


@dataclass
class Worker:
    repo: JobRepository
    backends: list[Backend]
    wakeup: Wakeup
    timing: Timing = field(default_factory=Timing)
    reap_seconds: float = 5.0
    batch_wait_seconds: float = 0.0  # a batch not full waits this long for company
    # How it waits for company (tests pass a wait they end by hand).
    wait_for_company: Callable[[float], Awaitable[None]] = asyncio.sleep
    shutdown_grace_seconds: float = 30.0
    rest_seconds: float = 2.0  # a failing slot rests rest_seconds x failures (at most 30 s)
    keeper: CatalogueKeeper | None = None
    catalogue_check_seconds: float = 2.0
    chores: list[Chore] = field(default_factory=list)
    worker_id: str = field(
        default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    )

    def __post_init__(self) -> None:
        self.slots = [Slot(backend) for backend in self.backends]
        self._stop = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._side_claims: set[asyncio.Task[None]] = set()  # see _backend_free
        self.shares = Shares(self.worker_id)
        self._shares_read_at = float("-inf")
        self._others_later: asyncio.Task[None] | None = None  # see _fill_slots
        self._answered: set[Slot] = set()  # see _claim_next
        self._handing_over: asyncio.Task[None] | None = None
        self.started_at = time.time()

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Claim and run jobs until stop(); then drain gracefully."""
        await self.wakeup.start()
        side = [
            asyncio.create_task(self._every(WORKER_BEAT_SECONDS, self._beat), name="beat"),
            asyncio.create_task(self._every(self.reap_seconds, self._reap), name="reap"),
        ]
        if self.keeper is not None:
            side.append(
                asyncio.create_task(
                    self._every(self.catalogue_check_seconds, self._keep_catalogue, at_once=True),
                    name="catalogue",
                )
            )
        side += [
            asyncio.create_task(
                self._every(c.interval, c.tick, at_once=True), name=type(c).__name__
            )
            for c in self.chores
        ]
        log.info(
            "worker %s: %d slot(s): %s",
            self.worker_id,
            len(self.slots),
            ", ".join(s.backend.name for s in self.slots),
        )
        try:
            await self._dispatch()
            await self._drain()
        finally:
            for task in side:
                task.cancel()
            await asyncio.gather(*side, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self.repo.forget_worker(self.worker_id)
            await self.aclose()

    async def aclose(self) -> None:
        await self.wakeup.close()
        for backend in self.backends:
            await backend.aclose()
        for chore in self.chores:
            await chore.aclose()

    async def run_until_empty(self) -> None:
        """Run until no job is due and every slot is idle, then close (tests, batch use)."""
        try:
            await self._run_until_empty()
        finally:
            await self.aclose()

    async def _run_until_empty(self) -> None:
        while True:
            self._slot_freed.clear()
            await self._read_requests()
            await self._fill_slots()
            running = self._running()
            if running:  # until a job ends, or a backend answers (its slot is free then)
                await first_of(
                    asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED),
                    self._slot_freed.wait(),
                    timeout=3600,
                )
            elif not await self.repo.has_due_job():
                return
            else:  # due jobs, but every slot is resting
                await asyncio.sleep(0.01)

    async def _dispatch(self) -> None:
        for first in (self._reap, self._beat):
            with unless_unavailable():  # retried by their side tasks
                await first()
        while not self._stop.is_set():
            self._slot_freed.clear()  # before claiming: a slot freed meanwhile is not missed
            # The claim sees every commit made so far: only later ones are worth waking for
            # (not the worker's own claim and result just before, one empty claim each).
            self.wakeup.catch_up()
            try:
                await self._read_requests()
                await self._read_shares()
                # Then wait, whether it claimed or not: a claim takes a job for every free slot
                # it can fill; what frees a slot or queues a job later wakes this loop.
                await self._fill_slots()
            except Exception as exc:
                # Locked by a stuck process, or the database is away: keep trying, never die.
                if not unavailable(exc):
                    raise
                log.warning(
                    "database unavailable while claiming (%s); retrying in 1 s",
                    why_unavailable(exc),
                )
                await first_of(self._stop.wait(), timeout=1.0)
                continue
            waiters: list[Coroutine[Any, Any, bool]] = [self._stop.wait(), self._slot_freed.wait()]
            if any(slot.free(time.monotonic()) for slot in self.slots):
                waiters.append(self.wakeup.wait(IDLE_RECHECK_SECONDS))
            await first_of(*waiters, timeout=IDLE_RECHECK_SECONDS)

    async def _fill_slots(self, *, answered: Collection[Slot] = (), everyone: bool = False) -> bool:
        """Claim a job for every free slot of this worker's share (shares.py; `answered`, the
        slots whose backends just answered, are always in it; `everyone`: every free slot), in one
        transaction. True if any was claimed. The others are claimed GRACE_SECONDS later, if
        jobs are still waiting then.

        The slots are reserved while it runs: a claim that starts meanwhile (a backend answered)
        runs beside it, for the slots that are free then; so no slot is looked at by two claims,
        and a backend's next job waits for a claim made for other backends at most
        HAND_OVER_WAIT_SECONDS (_claim_next)."""
        if self._stop.is_set():
            return False
        usable: list[Slot] = []
        later: list[Slot] = []
        for slot in await self._reserve_free_slots():
            (usable if everyone or self._in_share(slot, answered) else later).append(slot)
        for slot in later:
            slot.reserved = False
        if not usable:
            if later:
                self._claim_others_later()
            return False
        try:
            await self._apply_checkpoint_request(usable)
            for slot in usable:
                await self._apply_options(slot)
            began = time.perf_counter()
            claimed = await self._claim(usable)
            took = time.perf_counter() - began
        finally:
            for slot in usable:
                slot.reserved = False
        by_slot: dict[int, list[Claim]] = {}
        for index, claim in claimed:
            by_slot.setdefault(index, []).append(claim)
        # How many jobs the claim of the one-job slots took (each batching slot has its own).
        alone = len([index for index, _ in claimed if usable[index].batch == 1])
        for index, claims in by_slot.items():
            if len(claims) == 1:
                self._start(usable[index], claims[0], took, alone)
            else:
                self._start_batch(usable[index], claims, took)
        if later and any(claim.more_queued for _, claim in claimed):
            self._claim_others_later()
        return bool(claimed)

    def _in_share(self, slot: Slot, answered: Collection[Slot]) -> bool:
        return slot in answered or self.shares.owns(slot.backend.name)

    def _nudge_owner(self) -> None:
        """Wake the workers: a backend of another's share is idle (see _backend_free)."""

        async def nudge() -> None:
            with unless_unavailable():  # its dispatcher wakes each second
                await self.repo.nudge_workers()

        task = asyncio.create_task(nudge(), name="nudge")
        self._side_claims.add(task)
        task.add_done_callback(self._side_claims.discard)

    def _claim_others_later(self) -> None:
        """In GRACE_SECONDS, claim for every free slot (the other workers' shares among them),
        if jobs are still waiting then; once at a time."""
        if self._others_later is not None and not self._others_later.done():
            return

        async def claim_others() -> None:
            await first_of(self._stop.wait(), timeout=GRACE_SECONDS)
            with unless_unavailable():  # the dispatcher tries again
                if await self.repo.has_due_job():
                    await self._fill_slots(everyone=True)

        self._others_later = asyncio.create_task(claim_others(), name="claim-others")
        self._side_claims.add(self._others_later)
        self._others_later.add_done_callback(self._side_claims.discard)

    async def _claim(self, usable: list[Slot]) -> list[tuple[int, Claim]]:
        """One claim for the slots that run one job at a time; one for each slot that batches
        (the first due job and the compatible jobs behind it)."""
        single = [i for i, slot in enumerate(usable) if slot.batch == 1]
        claimed: list[tuple[int, Claim]] = []
        if single:
            slots = [(usable[i].backend.name, usable[i].checkpoint) for i in single]
            claimed += [(single[n], c) for n, c in await self.repo.claim(self.worker_id, slots)]
        for index, slot in enumerate(usable):
            if slot.batch > 1:
                claimed += [(index, c) for c in await self._claim_batch(slot)]
        return claimed

    async def _claim_batch(self, slot: Slot) -> list[Claim]:
        name = [(slot.backend.name, slot.checkpoint)]
        claims = [c for _, c in await self.repo.claim(self.worker_id, name, batch=slot.batch)]
        key = claims[0].batch_key if claims else None
        if key is None or len(claims) >= slot.batch or self.batch_wait_seconds <= 0:
            return claims
        # ENGINE_BATCH_WAIT_MS: give compatible jobs a moment to arrive, then take them too.
        await first_of(self._stop.wait(), self.wait_for_company(self.batch_wait_seconds))
        more = await self.repo.claim(self.worker_id, name, batch=slot.batch - len(claims), key=key)
        return claims + [c for _, c in more]

    async def _reserve_free_slots(self) -> list[Slot]:
        """The free slots, reserved; one that is down only if its probe says it is back."""
        usable = []
        for slot in self.slots:
            if not slot.free(time.monotonic()):
                continue
            slot.reserved = True
            if slot.state == "down" and not await self._probe(slot):
                slot.reserved = False
                continue
            usable.append(slot)
        return usable

    async def _apply_options(self, slot: Slot) -> None:
        """Options set through the API reach each backend between its jobs, never during one."""
        keeper = self.keeper
        if keeper is None or slot.options_version == keeper.options_version:
            return
        slot.options_version = keeper.options_version
        try:
            await slot.backend.apply_options(keeper.options)
            log.info("applied options %s to %s", sorted(keeper.options), slot.backend.name)
        except Exception as exc:
            log.warning("could not apply options to %s: %s", slot.backend.name, exc)

    async def _read_requests(self) -> None:
        """Look for an unload/reload request (at most every CHECKPOINT_READ_SECONDS), each time
        the dispatcher wakes (a request NOTIFYs the workers, and it wakes every second anyway).
        The claims made the moment a backend answers apply what it read: a backend's hand-over
        to its next job costs no read of its own."""
        keeper = self.keeper
        if keeper is None:
            return
        await keeper.read_checkpoint_request()
        if self.slots[0].checkpoint_version is None:  # its first look: say where it starts
            for slot in self.slots:
                slot.checkpoint_version = keeper.checkpoint_baseline
            await self._beat()

    async def _apply_checkpoint_request(self, usable: list[Slot]) -> None:
        """POST /sdapi/v1/unload-checkpoint or reload-checkpoint reach each backend between its
        jobs, never during one (nor during another worker's job on a shared A1111); then the
        heartbeat tells the API, which waits for it, and /memory is refetched."""
        keeper = self.keeper
        if keeper is None or keeper.checkpoint_baseline is None:
            return
        request = keeper.checkpoint_request
        if request is None:
            return
        behind = [s for s in usable if (s.checkpoint_version or 0) < request["version"]]
        if not behind:
            return
        busy = await self.repo.busy_elsewhere(self.worker_id, [s.backend.name for s in behind])
        ready = [s for s in behind if s.backend.name not in busy]
        await asyncio.gather(*(self._apply_checkpoint(s, request) for s in ready))
        if ready:
            await self._beat()
            await keeper.refresh_memory(ready[0].backend)

    async def _apply_checkpoint(self, slot: Slot, request: dict[str, Any]) -> None:
        slot.checkpoint_version = request["version"]
        loaded = bool(request["loaded"])
        try:
            if loaded:  # A1111 reloads its own current checkpoint; the engine loads this one
                await slot.backend.reload_checkpoint(request.get("checkpoint") or None)
            else:
                await slot.backend.unload_checkpoint()
            log.info(
                "%s the checkpoint on %s", "reloaded" if loaded else "unloaded", slot.backend.name
            )
        except Exception as exc:  # A1111 loads on demand: the next job still runs
            log.warning(
                "could not %s the checkpoint on %s: %s",
                "reload" if loaded else "unload",
                slot.backend.name,
                exc,
            )

    async def _keep_catalogue(self) -> None:
        assert self.keeper is not None
        usable = [s for s in self.slots if s.state == "idle"]
        silent = await self.keeper.tick([slot.backend for slot in usable])
        for slot in usable:
            if slot.backend in silent and slot.state == "idle":
                self._rest_down(slot, "did not answer the catalogue fetch")

    def _start(self, slot: Slot, claim: Claim, claim_seconds: float, claimed: int = 1) -> None:
        """Run `claim` on `slot`; `claim_seconds`: how long its claim transaction took (logged:
        a claim that waits on others' locks or on the database shows there), `claimed`: how
        many jobs that transaction claimed."""
        log.info(
            "job %s: attempt %d on %s (claimed in %.1f ms)",
            claim.id,
            claim.attempts,
            slot.backend.name,
            claim_seconds * 1000,
            extra={
                "job_id": claim.id,
                "claim_ms": round(claim_seconds * 1000, 2),
                "claim_jobs": claimed,
            },
        )
        slot.claim, slot.state = claim, "busy"
        slot.checkpoint = claim.checkpoint or slot.checkpoint
        task = asyncio.create_task(
            execute(
                claim,
                slot.backend,
                self.repo,
                self.timing,
                on_backend_free=lambda: self._backend_free(slot, task, claim),
            ),
            name=f"job {claim.id}",
        )
        slot.task = task
        task.add_done_callback(lambda done: self._finished(slot, done, claim.id))

    def _start_batch(self, slot: Slot, claims: list[Claim], claim_seconds: float) -> None:
        """Run `claims` (compatible jobs) as one batch on `slot`: each job's own task (lease,
        progress, cancel, result) drives its place in the backend's batch."""
        assert isinstance(slot.backend, Batching)
        log.info(
            "jobs %s: one batch of %d on %s (claimed in %.1f ms)",
            ", ".join(c.id for c in claims),
            len(claims),
            slot.backend.name,
            claim_seconds * 1000,
            extra={"job_ids": [c.id for c in claims], "batch_size": len(claims)},
        )
        slot.claim, slot.state = claims[0], "busy"
        slot.checkpoint = claims[0].checkpoint or slot.checkpoint
        batch = slot.backend.batch(
            [(c.type, with_checkpoint(c.payload, c.checkpoint)) for c in claims]
        )

        async def backend_free() -> None:
            if batch.answered():  # the last job's answer: the engine is free
                await self._backend_free(slot, task, claims[0])

        async def run() -> str:
            jobs = [
                asyncio.create_task(
                    execute(c, runner, self.repo, self.timing, on_backend_free=backend_free),
                    name=f"job {c.id}",
                )
                for c, runner in zip(claims, batch.runners, strict=True)
            ]
            outcomes = await asyncio.gather(*jobs, return_exceptions=True)
            for claim, outcome in zip(claims, outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    log.error("job %s: worker bug", claim.id, exc_info=outcome)
            slot.jobs_done += max(0, outcomes.count("completed") - 1)
            if "requeued" in outcomes:
                return "requeued"
            return "completed" if "completed" in outcomes else "error"

        task = asyncio.create_task(run(), name=f"batch of {len(claims)}")
        slot.task = task
        task.add_done_callback(lambda done: self._finished(slot, done, claims[0].id))

    async def _backend_free(self, slot: Slot, task: asyncio.Task[str], claim: Claim) -> None:
        """The backend answered. When jobs were waiting, claim its next one and start it
        before this job stores its result, so that the backend never waits for the store (on
        SQLite, one writer, the store would otherwise go first). A crash in between loses
        nothing: this job is still `processing` under its lease, and runs again once the lease
        expires. The wait is bounded (half a heartbeat), so that a slow claim (a lock held
        elsewhere) cannot hold a finished result near the end of its lease: the claim then
        goes on beside the store. With nothing waiting, the store goes first."""
        if slot.task is not task:
            return
        slot.finishing.add(task)
        slot.task, slot.claim, slot.state, slot.failures = None, None, "idle", 0
        # The dispatcher is told (_slot_freed) only once this job has stored its result
        # (_finished): an empty claim of its own must not hold the writer before that store.
        # A backend of another worker's share is left to that worker (told once the result
        # is stored), so that shares settle after workers start or stop.
        if not claim.more_queued or not self.shares.owns(slot.backend.name):
            return
        claiming = asyncio.create_task(self._claim_next(slot), name="claim-next")
        self._side_claims.add(claiming)
        claiming.add_done_callback(self._side_claims.discard)
        await asyncio.wait({claiming}, timeout=self.timing.heartbeat_seconds / 2)

    async def _claim_next(self, slot: Slot) -> None:
        """Claim the next job of a backend that answered. Backends that answer while such a
        claim runs are claimed for together, in one claim right after it: when many answer at
        once (backends in step, as after a burst of submits), one transaction serves them
        instead of one each side by side, which made each wait for the others on the event
        loop, the connection pool and the database. A claim that takes longer than
        HAND_OVER_WAIT_SECONDS (a lock held elsewhere, a busy database) is not waited for:
        the backends that answered meanwhile are claimed for beside it."""
        if not slot.free(time.monotonic()):
            return  # a claim that started meanwhile has it (or has given it its next job)
        slot.reserved = True  # for the claim that serves it, not the dispatcher's meanwhile
        self._answered.add(slot)
        if self._handing_over is None or self._handing_over.done():
            self._handing_over = asyncio.create_task(self._hand_over(), name="claim-next")
        ahead = self._handing_over
        await asyncio.wait({ahead}, timeout=HAND_OVER_WAIT_SECONDS)
        if not ahead.done() and slot in self._answered:
            await self._claim_answered()  # with the others that answered meanwhile

    async def _hand_over(self) -> None:
        while self._answered:
            await self._claim_answered()

    async def _claim_answered(self) -> None:
        answered, self._answered = self._answered, set()
        for slot in answered:
            slot.reserved = False  # _fill_slots reserves them again, at once
        try:
            await self._fill_slots(answered=answered)
        except Exception as exc:  # the dispatcher tries again
            log.warning("could not claim the next job at once (%s); the dispatcher will", exc)
            self._slot_freed.set()

    def _finished(self, slot: Slot, task: asyncio.Task[str], job_id: str) -> None:
        outcome = (
            "cancelled" if task.cancelled() else ("crashed" if task.exception() else task.result())
        )
        if outcome == "crashed":
            log.error(
                "job %s: worker bug", job_id, exc_info=task.exception(), extra={"job_id": job_id}
            )
        if task in slot.finishing:  # the slot moved on when the backend answered
            slot.finishing.discard(task)
            slot.jobs_done += outcome == "completed"
            if slot.free(time.monotonic()):  # no claim gave it its next job: claim one now
                self._slot_freed.set()
                if not self.shares.owns(slot.backend.name):
                    self._nudge_owner()
            return
        slot.task, slot.claim = None, None
        if outcome == "requeued":  # the backend was unavailable: rest this slot, then probe
            self._rest_down(slot, "did not answer; its job was requeued")
        else:
            slot.state, slot.failures = "idle", 0
            slot.jobs_done += outcome == "completed"
        self._slot_freed.set()

    def _rest_down(self, slot: Slot, why: str) -> None:
        """The backend did not answer: no job goes to it until a probe says it is back."""
        slot.failures += 1
        slot.state = "down"
        slot.rest_until = time.monotonic() + self._rest(slot)
        slot.last_error = why
        slot.down_since = slot.down_since or time.time()

    def _rest(self, slot: Slot) -> float:
        return min(30.0, self.rest_seconds * slot.failures)

    async def _probe(self, slot: Slot) -> bool:
        try:
            await slot.backend.progress()
        except Exception as exc:
            slot.failures += 1
            slot.rest_until = time.monotonic() + self._rest(slot)
            slot.last_error = f"{type(exc).__name__}: {exc}"
            slot.down_since = slot.down_since or time.time()
            return False
        log.info("backend %s is reachable again", slot.backend.name)
        slot.state, slot.failures, slot.last_error, slot.down_since = "idle", 0, None, None
        return True

    def _running(self) -> list[asyncio.Task[str]]:
        return [t for s in self.slots for t in (s.task, *s.finishing) if t is not None]

    async def _drain(self) -> None:
        await asyncio.gather(*self._side_claims, return_exceptions=True)  # their jobs count too
        running = self._running()
        if not running:
            return
        log.info(
            "stopping: waiting up to %.0f s for %d running job(s)",
            self.shutdown_grace_seconds,
            len(running),
        )
        _, pending = await asyncio.wait(running, timeout=self.shutdown_grace_seconds)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _beat(self) -> None:
        await self.repo.beat_worker(
            self.worker_id, self.started_at, [slot.describe() for slot in self.slots]
        )

    async def _read_shares(self) -> None:
        """Which backends are this worker's share, from the live workers' heartbeats: read by
        the dispatcher at most every SHARE_READ_SECONDS (workers that start together learn of
        each other within a second), never on a backend's hand-over to its next job."""
        if len(self.slots) < 2 or time.monotonic() < self._shares_read_at + SHARE_READ_SECONDS:
            return
        self._shares_read_at = time.monotonic()
        live = await self.repo.live_workers(SHARE_STALE_SECONDS)
        self.shares.update([slot.backend.name for slot in self.slots], live)

    async def _reap(self) -> None:
        for job_id, status in await self.repo.reap_expired():
            log.warning(
                "job %s: its worker stopped renewing the lease; now %s",
                job_id,
                status,
                extra={"job_id": job_id},
            )

    async def _every(self, seconds: float, action: Any, at_once: bool = False) -> None:
        while True:
            if not at_once:
                await asyncio.sleep(seconds)
            at_once = False
            try:
                await action()
            except Exception as exc:
                if not unavailable(exc):
                    log.exception("%s failed; trying again in %.0f s", action.__qualname__, seconds)
                    continue
                log.warning(
                    "%s: database unavailable (%s); trying again in %g s",
                    action.__qualname__,
                    why_unavailable(exc),
                    seconds,
                )


async def first_of(*aws: Any, timeout: float | None = None) -> None:
    """Returns once the first of `aws` is done, or after `timeout` seconds (None: no limit);
    cancels the rest."""
    tasks = [asyncio.ensure_future(aw) for aw in aws]
    try:
        await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
