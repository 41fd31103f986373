"""One engine batch as the worker sees it: a Runner per job (torch through the engine).

DiffusersBackend.batch() starts the jobs together (engine/batch.py); each job's worker task
drives its own JobPlace, as it would drive the backend for a job alone: generate() answers that
job's result, progress() reads its own steps and preview, interrupt() and skip() end it alone.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from a1111_proxy.backends.base import Progress, Runner
from a1111_proxy.engine.pipeline import RunState


class EngineBatch:
    def __init__(self, name: str, size: int) -> None:
        self.running = False  # the engine has started it (it waits for the job before it)
        loop = asyncio.get_running_loop()
        self.places = [JobPlace(name, self, loop.create_future()) for _ in range(size)]
        self.task: asyncio.Task[None] | None = None

    @property
    def runners(self) -> list[Runner]:
        return list(self.places)

    def answered(self) -> bool:
        return all(place.answer.done() for place in self.places)


class JobPlace:
    """One job's place in an EngineBatch."""

    def __init__(self, name: str, batch: EngineBatch, answer: asyncio.Future[Any]) -> None:
        self.name = name
        self.batch = batch
        self.answer = answer
        self.state = RunState()
        answer.add_done_callback(_retrieved)

    async def generate(self, kind: str, payload: dict[str, Any]) -> dict[str, Any]:
        """This job's answer (the batch was given its body when it started)."""
        try:
            result: dict[str, Any] = await asyncio.shield(self.answer)
        except asyncio.CancelledError:
            self.state.cancel.set()  # the engine drops this job at its next step
            raise
        return result

    async def progress(self, *, with_image: bool = False) -> Progress:
        running = self.batch.running and not self.answer.done()
        return progress_of(self.state if running else None, with_image=with_image)

    async def interrupt(self) -> None:
        self.state.interrupt.set()

    async def skip(self) -> None:
        self.state.skip.set()


def _retrieved(future: asyncio.Future[Any]) -> None:
    """An answer nobody awaits any more (its job was given up) is not an unhandled error."""
    if not future.cancelled():
        future.exception()


def progress_of(state: RunState | None, *, with_image: bool) -> Progress:
    """A1111's progress of the engine's run `state` (None: nothing running)."""
    if state is None:
        return Progress(progress=0.0, eta_relative=None, started=False)
    if with_image:  # the engine makes previews while they are asked for (RunState.preview_due)
        state.preview_asked_at = time.monotonic()
    return Progress(
        progress=state.progress,
        eta_relative=state.eta,
        started=True,
        current_image=state.current_image if with_image else None,
    )
