"""`GET /sdapi/v1/jobs/{id}/events`: a job's status and progress as Server-Sent Events.

Events: `status` (on connect and whenever the status or attempt changes; the job without its
result), `progress` (step, steps, progress, eta, and a new live preview as a data: URI; at most
every 250 ms) and one final `completed`, `error` or `canceled` carrying the job as
`GET /sdapi/v1/jobs/{id}` shows it, after which the stream ends. A `: ping` comment keeps idle
connections open.

Event ids: `<attempt>-<status>-0` (status), `<attempt>-<status>-<n>` (progress, n from 1) and
`<attempt>-<status>` (the final event only). A client that reconnects with `Last-Event-ID` gets no
`status` event for the state it already saw and no old progress, only what changes from then on;
a final event it missed is sent (also when it saw the final `status`); one that has the final
event is answered 204 (EventSource stops reconnecting on 204).

The stream learns everything from the database through the process's one JobWaiter pump, so it
works behind any API process; it holds no database connection while it waits. While it is open,
the job's worker fetches live previews (JobControl.watch); nobody watching, it does not.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from a1111_proxy.db.tables import STATUSES
from a1111_proxy.jobs import TERMINAL, JobRepository
from a1111_proxy.routes import context
from a1111_proxy.routes.context import find_job
from a1111_proxy.routes.jobs import render_with_position, requested_steps
from a1111_proxy.schemas import render_job
from a1111_proxy.waiter import JobWaiter, Watch

PROGRESS_INTERVAL_SECONDS = 0.25
RECONNECT_MS = 2000
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass(frozen=True)
class EventId:
    attempt: int
    status: str
    final: bool = False  # the client has the final event

    def render(self, n: int = 0) -> str:
        return f"{self.attempt}-{self.status}-{n}"

    def render_final(self) -> str:
        return f"{self.attempt}-{self.status}"


def parse_event_id(raw: str | None) -> EventId | None:
    """The state a reconnecting client last saw; None (start afresh) when absent or not ours."""
    parts = (raw or "").strip().split("-")
    if len(parts) == 3 and not parts[2].isdigit():
        return None
    if len(parts) in (2, 3) and parts[0].isdigit() and parts[1] in STATUSES:
        return EventId(int(parts[0]), parts[1], final=len(parts) == 2 and parts[1] in TERMINAL)
    return None


async def job_events(request: Request) -> Response:
    row = await find_job(request, request.path_params["job_id"])
    resumed = parse_event_id(request.headers.get("last-event-id"))
    if resumed is not None and resumed.final:
        return Response(status_code=204)  # it has the final event: nothing more will come
    stream = JobStream(
        context.repo(request),
        context.waiter(request),
        row.id,
        resumed,
        ping_seconds=context.settings(request).sse_ping_seconds,
        steps=requested_steps(row),
    )
    return StreamingResponse(
        stream.events(), media_type="text/event-stream", headers=STREAM_HEADERS
    )


class JobStream:
    def __init__(
        self,
        repo: JobRepository,
        waiter: JobWaiter,
        job_id: str,
        resumed: EventId | None,
        *,
        ping_seconds: float,
        steps: int,
    ) -> None:
        self.repo = repo
        self.waiter = waiter
        self.job_id = job_id
        self.state = resumed and EventId(resumed.attempt, resumed.status)  # what the client knows
        self.done = False
        self.ping_seconds = ping_seconds
        self.steps = steps
        self.progress_key: tuple[Any, ...] | None = None
        self.preview_sent_at: float | None = None
        self.progress_sent_at = float("-inf")
        self.count = 0

    async def events(self) -> AsyncIterator[str]:
        """Ends after the final event, when the job is deleted, or (cancelled) when the client
        goes away; leaving the `with` block forgets this follower."""
        with self.waiter.watch(self.job_id) as watch:
            yield f"retry: {RECONNECT_MS}\n\n"
            snap = (await self.repo.snapshots([self.job_id])).get(self.job_id)
            if snap is not None and self.state is not None:
                self._seen(snap)  # resuming: no old progress again
            while snap is not None:
                if snap.status == "processing":  # its worker reads progress, previews while we look
                    await self.repo.watch(snap.seq, preview=True)
                async for event in self._changes(snap):
                    yield event
                if self.done:
                    return
                snap, ping = await self._next(watch, snap)
                if ping:
                    yield ": ping\n\n"

    async def _changes(self, snap: Any) -> AsyncIterator[str]:
        if EventId(snap.attempts, snap.status) != self.state or snap.status in TERMINAL:
            row = await self.repo.get(self.job_id)
            if row is None:
                return
            now = EventId(row.attempts, row.status)
            if now != self.state:
                self.state = now
                yield _event(
                    "status",
                    now.render(),
                    await render_with_position(self.repo, row, with_result=False),
                )
            if row.status in TERMINAL:
                images = await self.repo.images(row.seq) if row.image_count else None
                self.done = True
                yield _event(row.status, now.render_final(), render_job(row, images))
                return
        if snap.status == "processing" and self._progress_key(snap) != self.progress_key:
            if time.monotonic() - self.progress_sent_at >= PROGRESS_INTERVAL_SECONDS:
                yield await self._progress_event(snap)

    async def _progress_event(self, snap: Any) -> str:
        preview = None
        if snap.preview_at is not None and snap.preview_at != self.preview_sent_at:
            preview = data_uri(await self.repo.preview(snap.seq))
        self._seen(snap)
        self.progress_sent_at = time.monotonic()
        self.count += 1
        state = self.state or EventId(snap.attempts, snap.status)
        return _event(
            "progress",
            state.render(self.count),
            {
                "id": self.job_id,
                "step": round(snap.progress * self.steps),
                "steps": self.steps,
                "progress": snap.progress,
                "eta": snap.eta_relative,
                "preview": preview,
            },
        )

    def _seen(self, snap: Any) -> None:
        self.progress_key = self._progress_key(snap)
        self.preview_sent_at = snap.preview_at

    @staticmethod
    def _progress_key(snap: Any) -> tuple[Any, ...]:
        return (snap.attempts, snap.progress, snap.eta_relative, snap.preview_at)

    async def _next(self, watch: Watch, snap: Any) -> tuple[Any, bool]:
        """The next snapshot to look at, and whether the ping interval passed first. A
        progress change inside the throttle interval is looked at again once it has passed."""
        pending = snap.status == "processing" and self._progress_key(snap) != self.progress_key
        timeout = self.ping_seconds
        if pending:
            timeout = max(0.0, self.progress_sent_at + PROGRESS_INTERVAL_SECONDS - time.monotonic())
        try:
            await asyncio.wait_for(watch.changed.wait(), timeout)
        except TimeoutError:
            return (watch.latest if watch.latest is not None else snap), not pending
        watch.changed.clear()
        if watch.gone:
            return None, False
        return watch.latest if watch.latest is not None else snap, False


def _event(name: str, event_id: str, data: Any) -> str:
    return f"id: {event_id}\nevent: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def data_uri(image: str | None) -> str | None:
    """A stored live preview (raw base64, as A1111 gives it) as a data: URI."""
    if not image:
        return None
    if image.startswith("data:"):
        return image
    try:
        head = base64.b64decode(image[:16] + "=" * (-len(image[:16]) % 4))
    except (binascii.Error, ValueError):
        head = b""
    kind = "jpeg" if head.startswith(b"\xff\xd8") else ("webp" if head[8:12] == b"WEBP" else "png")
    return f"data:image/{kind};base64,{image}"
