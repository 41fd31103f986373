"""The backend protocol and its error tree. Retry decisions look at the class, never the text."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

# What POST /sdapi/v1/refresh-* asks the backends to rescan.
Refresh = Literal["checkpoints", "loras", "vae", "embeddings"]
REFRESHES: tuple[Refresh, ...] = ("checkpoints", "loras", "vae", "embeddings")


class BackendError(Exception):
    """The backend could not run the job."""

    code = "backend_error"

    def __init__(self, message: str, *, status: int | None = None, body: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.body = body


class BackendUnavailable(BackendError):
    """Unreachable, timed out, or a gateway error: worth trying again later."""

    code = "backend_unavailable"


class BackendRejected(BackendError):
    """The backend refused or failed this job (4xx, or A1111's own error answer): final."""

    code = "backend_rejected"


class BackendProtocolError(BackendError):
    """The backend answered something that is not an A1111 response: final."""

    code = "backend_bad_response"


@dataclass(frozen=True)
class Progress:
    progress: float
    eta_relative: float | None
    started: bool  # the backend reports a generation running
    current_image: str | None = None  # base64 live preview, when asked for and known
    step: int | None = None
    steps: int | None = None


class Runner(Protocol):
    """What runs one job: a backend slot, or one job's place in a batch (`Batching`).

    `generate` raises BackendUnavailable (worth another attempt later), BackendRejected or
    BackendProtocolError (final). The other calls are control calls: they may raise any
    exception, and callers treat them as best-effort (log, and go on)."""

    name: str  # one backend, however many workers and slots share it (A1111's URL)

    async def generate(self, kind: str, payload: dict[str, Any]) -> dict[str, Any]:
        """Run one job (txt2img, img2img, extra-single-image, ...); return A1111's response
        body. An interrupted generation answers with what it has, as A1111 does."""
        ...

    async def progress(self, *, with_image: bool = False) -> Progress: ...

    async def interrupt(self) -> None:
        """Stop the running generation at its next step; it answers with what it has."""
        ...

    async def skip(self) -> None:
        """End the running batch at its next step; the job goes on with the next batch."""
        ...


class Backend(Runner, Protocol):
    """One backend slot: runs one job at a time, and answers A1111's shapes."""

    async def catalogue_entry(self, name: str) -> Any:
        """One catalogue entry by the name the API serves it under (`sd-models`, `samplers`,
        `options`, `memory`, `controlnet-model_list`, ...: catalogue.ENTRIES), in A1111's
        shape; None if the backend lacks it."""
        ...

    async def apply_options(self, options: dict[str, Any]) -> None:
        """Set A1111 options (POST /sdapi/v1/options) between jobs."""
        ...

    async def refresh(self, what: Refresh) -> None:
        """Rescan one kind of model files (checkpoints, loras, vae, embeddings)."""
        ...

    async def unload_checkpoint(self) -> None:
        """Free the loaded checkpoint; the next job that needs it loads it again."""
        ...

    async def reload_checkpoint(self, checkpoint: str | None) -> None:
        """Load a checkpoint again after an unload: `checkpoint` (the default set through the
        API) where the backend can choose, else the one it used last. A1111 reloads its own
        current checkpoint and ignores `checkpoint`."""
        ...

    async def aclose(self) -> None: ...


class Batch(Protocol):
    """Jobs started together as one batch (`Batching.batch`): one runner per job, in order."""

    runners: list[Runner]

    def answered(self) -> bool:
        """Every job of the batch has its answer (the backend is free for the next one)."""
        ...


@runtime_checkable
class Batching(Protocol):
    """A backend that runs up to `max_batch` compatible jobs (same batch key) as one batch."""

    max_batch: int

    def batch(self, jobs: list[tuple[str, dict[str, Any]]]) -> Batch:
        """Start `jobs` ((kind, payload) each) as one batch; each job's runner answers it."""
        ...
