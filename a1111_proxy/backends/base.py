"""The backend protocol and its error tree. Retry decisions look at the class, never the text."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


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


class Backend(Protocol):
    name: str

    async def generate(self, kind: str, payload: dict[str, Any]) -> dict[str, Any]:
        """Run one txt2img/img2img job; return A1111's response body."""
        ...

    async def progress(self, *, with_image: bool = False) -> Progress: ...

    async def interrupt(self) -> None: ...

    async def skip(self) -> None: ...

    async def fetch(self, path: str) -> Any:
        """GET a catalogue path (e.g. /sdapi/v1/sd-models); None if the backend lacks it."""
        ...

    async def post(self, path: str, body: Any) -> Any:
        """POST a control call (options, refresh) between jobs."""
        ...

    async def aclose(self) -> None: ...
