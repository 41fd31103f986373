"""Model downloads, for admins: `POST /sdapi/v1/models/downloads` adds one for a worker to fetch
into MODELS_DIR (worker/downloader.py); `GET` lists them and shows one with its progress, also as
Server-Sent Events; `POST .../{id}/cancel` stops one.

The API never talks to Civitai: it checks the request's shape (the source is one a worker can
resolve; a direct URL names its `kind`), stores the download `queued`, and answers 202.

Events (`.../{id}/events`): `progress` with the download, on connect and whenever it changes
(looked at every EVENTS_POLL_SECONDS), then one final `completed`, `failed` or `canceled` with
it, after which the stream ends; a `: ping` comment keeps an idle connection open. A client that
reconnects with `Last-Event-ID: final` is answered 204.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from a1111_proxy.civitai import parse_source, summarize
from a1111_proxy.db.tables import DOWNLOAD_STATUSES
from a1111_proxy.downloads import TERMINAL, DownloadRecord, DownloadStore
from a1111_proxy.errors import InvalidRequest, validation_detail
from a1111_proxy.routes import context
from a1111_proxy.routes.context import choice, find_download, int_param, read_json_object
from a1111_proxy.schemas import DownloadRequest, iso

PATH = "/sdapi/v1/models/downloads"
EVENTS_POLL_SECONDS = 0.5
RECONNECT_MS = 2000
FINAL_EVENT_ID = "final"
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def add_download(request: Request) -> Response:
    context.require_admin(request)
    asked = _download_request(await read_json_object(request), request)
    record = await context.downloads(request).add(
        asked.source.strip(),
        kind=asked.kind,
        file=asked.file,
        sha256=asked.sha256.lower() if asked.sha256 else None,
        requested_by=context.caller(request).tenant,
    )
    return JSONResponse(
        render_download(record, _site(request)),
        status_code=202,
        headers={"Location": f"{PATH}/{record.id}"},
    )


def _download_request(body: dict[str, Any], request: Request) -> DownloadRequest:
    """The body, checked: 422 naming the field otherwise."""
    try:
        asked = DownloadRequest.model_validate(body)
    except ValidationError as exc:
        raise InvalidRequest(validation_detail(exc)) from None
    try:
        source = parse_source(asked.source, _site(request))
    except ValueError as exc:
        raise InvalidRequest([_problem("source", str(exc))]) from None
    if source.kind == "url" and asked.kind is None:
        raise InvalidRequest([_problem("kind", "a direct URL needs `kind`")])
    return asked


def _problem(field: str, message: str) -> dict[str, Any]:
    return {"loc": ["body", field], "msg": message, "type": "value_error"}


async def list_downloads(request: Request) -> Response:
    context.require_admin(request)
    status = choice(request, "status", DOWNLOAD_STATUSES)
    limit = int_param(request, "limit", default=50, low=1, high=200)
    found = await context.downloads(request).page(status, limit)
    site = _site(request)
    return JSONResponse({"downloads": [render_download(r, site) for r in found]})


async def get_download(request: Request) -> Response:
    context.require_admin(request)
    record = await find_download(request, request.path_params["download_id"])
    return JSONResponse(render_download(record, _site(request)))


async def cancel_download(request: Request) -> Response:
    context.require_admin(request)
    record = await find_download(request, request.path_params["download_id"])
    canceled = await context.downloads(request).cancel(record.id)
    return JSONResponse(render_download(canceled or record, _site(request)))


async def download_events(request: Request) -> Response:
    context.require_admin(request)
    record = await find_download(request, request.path_params["download_id"])
    if request.headers.get("last-event-id", "").strip() == FINAL_EVENT_ID:
        return Response(status_code=204)  # it has the final event: nothing more will come
    stream = _events(
        context.downloads(request),
        record,
        _site(request),
        ping_seconds=context.settings(request).sse_ping_seconds,
    )
    return StreamingResponse(stream, media_type="text/event-stream", headers=STREAM_HEADERS)


async def _events(
    store: DownloadStore, record: DownloadRecord, site: str, *, ping_seconds: float
) -> AsyncIterator[str]:
    yield f"retry: {RECONNECT_MS}\n\n"
    shown: dict[str, Any] | None = None
    count, quiet_since = 0, time.monotonic()
    current: DownloadRecord | None = record
    while current is not None:
        view = render_download(current, site)
        if current.status in TERMINAL:
            yield _event(current.status, FINAL_EVENT_ID, view)
            return
        if view != shown:
            shown, count, quiet_since = view, count + 1, time.monotonic()
            yield _event("progress", str(count), view)
        elif time.monotonic() - quiet_since >= ping_seconds:
            quiet_since = time.monotonic()
            yield ": ping\n\n"
        await asyncio.sleep(EVENTS_POLL_SECONDS)
        current = await store.get(record.id)


def _event(name: str, event_id: str, data: Any) -> str:
    return f"id: {event_id}\nevent: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def _site(request: Request) -> str:
    return context.settings(request).civitai_url.rstrip("/")


def render_download(record: DownloadRecord, site: str) -> dict[str, Any]:
    """A download as the API shows it (schemas.Download)."""
    total, done, speed = record.bytes_total, record.bytes_done, record.speed
    running = record.status == "running"
    link = f"{PATH}/{record.id}"
    return {
        "id": record.id,
        "status": record.status,
        "source": record.source,
        "kind": record.kind,
        "file": record.file,
        "path": record.path,
        "sha256": record.sha256,
        "bytes_done": done,
        "bytes_total": total,
        "progress": min(1.0, done / total) if total else None,
        "speed": speed if running else None,
        "eta": (max(0.0, (total - done) / speed) if running and total and speed else None),
        "error": record.error,
        "attempts": record.attempts,
        "cancel_requested": record.cancel_requested_at is not None,
        "requested_by": record.requested_by,
        "civitai": None if record.version is None else summarize(record.version, site),
        "created_at": iso(record.created_at),
        "started_at": iso(record.started_at),
        "completed_at": iso(record.completed_at),
        "links": {"self": link, "cancel": f"{link}/cancel", "events": f"{link}/events"},
    }
