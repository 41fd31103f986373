"""One claimed job's life on one backend slot: generate, watch progress and cancel, finish.

Retries are of two kinds, kept apart: the backend client retries a call that cannot have started
a generation (seconds, in memory); this module re-queues the job with a durable backoff when the
backend was unavailable, and ends it `error` once its attempts are used up.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, wait_exponential

from a1111_proxy.backends import (
    BackendError,
    BackendProtocolError,
    BackendUnavailable,
    Runner,
)
from a1111_proxy.db.engine import unavailable, why_unavailable
from a1111_proxy.jobs import GENERATIONS, Claim, JobRepository, error_json, retry_delay
from a1111_proxy.logs import job_id_var

log = logging.getLogger("a1111_proxy.worker")


@dataclass(frozen=True)
class Timing:
    progress_seconds: float = 0.5
    heartbeat_seconds: float = 10.0
    interrupt_grace_seconds: float = 30.0
    stall_seconds: float = 600.0
    preview_seconds: float = 1.0  # how often a live preview is asked for while a job runs
    # How often progress is read while nobody looks at the job (Touch.progress_wanted): often
    # enough for a list of jobs and the stall check, not twice a second for nobody.
    unwatched_progress_seconds: float = 5.0


class LeaseLost(Exception):
    """Another worker owns this job now; touch nothing more."""


async def execute(
    claim: Claim,
    backend: Runner,
    repo: JobRepository,
    timing: Timing,
    on_backend_free: Callable[[], Awaitable[None]] | None = None,
) -> str:
    """Run the job to an end state and return what happened: completed, error, canceled,
    requeued or lost. On cancellation (worker shutdown) the lease is released first.

    `on_backend_free` is awaited once the backend has answered with a result, before the
    result is stored, so that the worker starts the backend's next job first."""
    job_id_var.set(claim.id)  # this task's log lines (and the backend client's) name the job
    payload = with_checkpoint(claim.payload, claim.checkpoint)
    generation = asyncio.create_task(backend.generate(claim.type, payload))
    try:
        try:
            canceled = await _watch(claim, backend, repo, generation, timing)
        except BackendUnavailable as stalled:
            return await _fail(claim, repo, stalled)
        if canceled:
            with contextlib.suppress(Exception):
                await backend.interrupt()
            return await _finish_canceled(claim, repo, generation, timing)
        if generation.exception() is None and on_backend_free is not None:
            await on_backend_free()
        return await _finish(claim, repo, generation)
    except LeaseLost:
        generation.cancel()
        log.warning("job %s: lease lost to another worker; abandoning this attempt", claim.id)
        return "lost"
    except asyncio.CancelledError:
        await _give_back(claim, backend, repo, generation)
        raise
    except Exception as exc:  # a bug of ours must not strand the job in `processing`
        generation.cancel()
        log.exception("job %s: internal error", claim.id)
        message = f"internal error in the worker: {type(exc).__name__}: {exc} (see the worker log)"
        with contextlib.suppress(Exception):
            await repo.finish(claim, "error", error_json("internal_error", message))
        return "error"


async def _watch(
    claim: Claim,
    backend: Runner,
    repo: JobRepository,
    generation: asyncio.Task[Any],
    timing: Timing,
) -> bool:
    """Wait for the generation, storing progress and renewing the lease. True: cancel asked.

    What was asked of the job (a cancel, a skip, a watcher) is looked at every
    `progress_seconds`: first `progress_seconds` after the job starts (which spreads the
    first progress reads of jobs started together), then on ticks all of a worker's jobs
    share (the second between half an interval and one and a half after the first).
    Progress is read from the A1111 and stored as often only while someone looks at the job
    or its progress webhooks were asked for (Touch.progress_wanted), otherwise every
    `unwatched_progress_seconds` (the first read is at the first tick either way); a live
    preview is fetched (at most every `preview_seconds`) only while someone looks at one
    (Touch.preview_wanted). For nobody, each would cost the A1111 a request (a preview: an
    image encode), and us its transfer and a write."""
    last_write = last_busy = last_preview = time.monotonic()
    last_read = float("-inf")
    last_seen: tuple[float, float | None] | None = None
    watched = False  # someone looks at the live preview (as the last touch said)
    followed = claim.progress_webhook  # someone looks at the progress
    away = False  # the database did not answer the last touch
    tick = timing.progress_seconds  # the first: its own, so that starts spread the first reads
    while True:
        done, _ = await asyncio.wait({generation}, timeout=tick)
        if done:
            return False
        tick = _next_tick(timing.progress_seconds, at_least=timing.progress_seconds / 2)
        now = time.monotonic()
        want_image = watched and now - last_preview >= timing.preview_seconds
        read = followed or want_image or now - last_read >= timing.unwatched_progress_seconds
        progress = None
        if read:
            last_read = now
            progress = await _read_progress_unless_done(backend, want_image, generation)
            if generation.done():  # never make a finished job wait for a progress read
                return False
        seen = (progress.progress, progress.eta_relative) if progress else None
        preview = progress.current_image if progress and want_image else None
        if want_image:
            last_preview = now
        if progress is not None and progress.started:
            last_busy = now
        elif read and now - last_busy > timing.stall_seconds:
            generation.cancel()
            raise BackendUnavailable(
                f"A1111 at {backend.name} took the {claim.type} request but has shown no "
                f"generation running for {timing.stall_seconds:.0f} s (hung or restarted?)"
            )
        changed = seen is not None and seen != last_seen
        try:
            if changed or preview or now - last_write >= timing.heartbeat_seconds:
                touch = await repo.touch(
                    claim,
                    progress=seen[0] if seen else None,
                    eta=seen[1] if seen else None,
                    preview=preview,
                )
                last_write, last_seen = now, seen or last_seen
            else:
                touch = await repo.requests(claim)
        except Exception as exc:
            # A busy or unreachable database: try again next tick (said once). If it lasts past
            # the lease, the lease expires and the job runs again, as it should.
            if not unavailable(exc):
                raise
            if not away:
                log.warning("job %s: database unavailable (%s)", claim.id, why_unavailable(exc))
            away = True
            continue
        if away:
            log.info("job %s: the database answers again", claim.id)
            away = False
        if not touch.alive:
            raise LeaseLost()
        watched = touch.preview_wanted
        followed = touch.progress_wanted or claim.progress_webhook
        if touch.cancel_requested:
            return True
        if touch.skip_requested:
            await _skip(claim, backend, repo)


def _next_tick(every: float, *, at_least: float = 0.0) -> float:
    """Seconds to the next multiple of `every` on the event loop's clock (at least
    `at_least` away). A worker's running jobs tick together, so that their looks at what was
    asked of them are one read (JobMachine.requests) instead of one each."""
    left = every - asyncio.get_running_loop().time() % every
    return left if left >= at_least else left + every


async def _skip(claim: Claim, backend: Runner, repo: JobRepository) -> None:
    with contextlib.suppress(Exception):
        await backend.skip()
    await repo.clear_skip(claim)
    log.info("job %s: skipped the current batch on %s", claim.id, backend.name)


def with_checkpoint(payload: dict[str, Any], checkpoint: str | None) -> dict[str, Any]:
    """The job's checkpoint as A1111's per-request override, unless the body names one."""
    if not checkpoint:
        return payload
    overrides = payload.get("override_settings")
    overrides = dict(overrides) if isinstance(overrides, dict) else {}
    if overrides.get("sd_model_checkpoint"):
        return payload
    return {**payload, "override_settings": {**overrides, "sd_model_checkpoint": checkpoint}}


async def _read_progress_unless_done(
    backend: Runner, with_image: bool, generation: asyncio.Task[Any]
) -> Any:
    """The backend's progress, or None as soon as the generation ends (the read is dropped)."""
    reading = asyncio.create_task(_read_progress(backend, with_image))
    await asyncio.wait({reading, generation}, return_when=asyncio.FIRST_COMPLETED)
    if not reading.done():
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reading
        return None
    return reading.result()


async def _read_progress(backend: Runner, with_image: bool) -> Any:
    try:
        return await backend.progress(with_image=with_image)
    except Exception as exc:  # progress is best-effort; the generation call decides the outcome
        log.debug("progress from %s failed: %s", backend.name, exc)
        return None


async def _finish(claim: Claim, repo: JobRepository, generation: asyncio.Task[Any]) -> str:
    try:
        stored, images = split_images(claim, generation.result())
    except BackendError as exc:
        return await _fail(claim, repo, exc)
    if not await _persist(lambda: repo.complete(claim, stored, images)):
        # A cancel that arrived after the last look still wins over a result nobody wants.
        if not (await repo.requests(claim)).cancel_requested:
            raise LeaseLost()
        return await _end_canceled(claim, repo, stored, images)
    log.info("job %s: completed on %s (attempt %d)", claim.id, claim.backend, claim.attempts)
    return "completed"


async def _fail(claim: Claim, repo: JobRepository, exc: BackendError) -> str:
    extra = {} if exc.status is None else {"backend_status": exc.status, "backend_body": exc.body}
    error = error_json(exc.code, exc.message, backend=claim.backend, **extra)
    if isinstance(exc, BackendUnavailable) and claim.attempts < claim.max_attempts:
        delay = retry_delay(claim.attempts)
        log.warning("job %s: %s; trying again in %.1f s", claim.id, exc.message, delay)
        if not await _persist(lambda: repo.requeue(claim, delay, error)):
            raise LeaseLost()
        return "requeued"
    log.warning("job %s: failed: %s", claim.id, exc.message)
    return await _end(claim, repo, "error", error)


async def _finish_canceled(
    claim: Claim, repo: JobRepository, generation: asyncio.Task[Any], timing: Timing
) -> str:
    # The slot's interrupt makes A1111 stop after the current step and answer with what it has
    # (kept, as A1111 would give it); give it a while.
    with contextlib.suppress(Exception):
        await asyncio.wait_for(asyncio.shield(generation), timing.interrupt_grace_seconds)
    generation.cancel()
    stored: Any = None
    images: list[bytes] = []
    if generation.done() and not generation.cancelled() and generation.exception() is None:
        with contextlib.suppress(BackendError):
            stored, images = split_images(claim, generation.result())
    return await _end_canceled(claim, repo, stored, images)


async def _end_canceled(claim: Claim, repo: JobRepository, stored: Any, images: list[bytes]) -> str:
    error = error_json("canceled", "canceled while running")
    if stored is None:
        return await _end(claim, repo, "canceled", error)
    if not await _persist(
        lambda: repo.complete(claim, stored, images, status="canceled", error=error)
    ):
        raise LeaseLost()
    log.info("job %s: canceled (partial result kept)", claim.id)
    return "canceled"


async def _end(claim: Claim, repo: JobRepository, status: str, error: str) -> str:
    if not await _persist(lambda: repo.finish(claim, status, error)):
        raise LeaseLost()
    log.info("job %s: %s", claim.id, status)
    return status


async def _persist(write: Any) -> bool:
    """A job's final write, retried while the database is busy or away (a result that took
    minutes of GPU time is worth a few seconds of retrying); the lease bounds how long."""
    async for attempt in AsyncRetrying(
        retry=retry_if_exception(unavailable),
        stop=stop_after_delay(20),
        wait=wait_exponential(multiplier=0.1, max=2),
        reraise=True,
    ):
        with attempt:
            return bool(await write())
    raise AssertionError("unreachable")


async def _give_back(
    claim: Claim, backend: Runner, repo: JobRepository, generation: asyncio.Task[Any]
) -> None:
    """Shutdown: stop our generation on our slot, then let the job run again at once."""
    generation.cancel()
    with contextlib.suppress(Exception):
        await backend.interrupt()
    with contextlib.suppress(Exception):
        if await repo.release(claim):
            log.info("job %s: released for another worker (shutdown)", claim.id)


def split_images(claim: Claim, result: Any) -> tuple[Any, list[bytes]]:
    """A generation's images are stored apart (decoded); other answers are kept whole."""
    if claim.type not in GENERATIONS:
        return result, []
    try:
        images = [base64.b64decode(image, validate=True) for image in result.get("images") or []]
    except (binascii.Error, TypeError, ValueError) as exc:
        raise BackendProtocolError(
            f"A1111 at {claim.backend} returned an image that is not base64 ({exc})"
        ) from exc
    return {**result, "images": []}, images
