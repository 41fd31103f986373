"""A job's webhook delivery log, and sending a message again."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from a1111_proxy.errors import DeliveryNotFound, InvalidRequest
from a1111_proxy.routes import context
from a1111_proxy.routes.context import find_job
from a1111_proxy.schemas import iso


async def list_deliveries(request: Request) -> Response:
    repo = context.repo(request)
    job = await find_job(request, request.path_params["job_id"])
    deliveries = await repo.deliveries.for_job(job.seq)
    return JSONResponse(
        {
            "job_id": job.id,
            "deliveries": [render_delivery(d, attempts) for d, attempts in deliveries],
        }
    )


async def redeliver(request: Request) -> Response:
    """Send a message again now: the same `webhook-id`, a fresh timestamp and signature, one
    attempt. Body (optional): `{"delivery_id": "msg_..."}`; without it, the `job.completed`."""
    repo = context.repo(request)
    job = await find_job(request, request.path_params["job_id"])
    row = await repo.deliveries.redeliver(job.seq, await _delivery_id(request))
    if row is None:
        raise DeliveryNotFound(
            f"Job {job.id} has no such webhook delivery: it has no webhook_url, has not ended "
            "yet, or did not ask for that event. See GET .../webhooks."
        )
    return JSONResponse(render_delivery(row, []), status_code=202)


async def _delivery_id(request: Request) -> str | None:
    raw = await request.body()
    if not raw.strip():
        return None
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = None
    if not isinstance(body, dict) or not isinstance(body.get("delivery_id", ""), str | None):
        raise InvalidRequest(
            [
                {
                    "loc": ["body", "delivery_id"],
                    "msg": 'the body must be {"delivery_id": "msg_..."} or empty',
                    "type": "value_error",
                }
            ]
        )
    return body.get("delivery_id")


def render_delivery(row: Any, attempts: list[Any]) -> dict[str, Any]:
    """A delivery as the API shows it (never its body or the signing secret)."""
    return {
        "id": row.id,
        "type": f"job.{row.event}",
        "url": row.url,
        "status": row.status,
        "trigger": row.trigger,
        "attempt_count": row.attempts,
        "created_at": iso(row.created_at),
        "next_attempt_at": iso(row.next_attempt_at),
        "delivered_at": iso(row.delivered_at),
        "last_status_code": row.last_status_code,
        "last_error": row.last_error,
        "attempts": [render_attempt(a) for a in attempts],
    }


def render_attempt(row: Any) -> dict[str, Any]:
    return {
        "number": row.number,
        "trigger": row.trigger,
        "started_at": iso(row.started_at),
        "duration_ms": row.duration_ms,
        "status_code": row.status_code,
        "response_body": row.response_body,
        "error": row.error,
        "address": row.address,
    }
