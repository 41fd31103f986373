"""Liveness with details, and readiness."""

from __future__ import annotations

import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from a1111_proxy import metrics as prometheus
from a1111_proxy.catalogue import DEVICE
from a1111_proxy.migrate import current_revision
from a1111_proxy.redaction import scrub
from a1111_proxy.routes import context


async def health(request: Request) -> Response:
    """200 when the database answers, a worker is alive and a backend slot is usable; else 503
    with the reasons."""
    repo = context.repo(request)
    stale_after = context.settings(request).worker_stale_seconds
    # Each problem twice: in full for an admin, and without addresses or errors for anyone.
    problems: list[tuple[str, str]] = []
    report: dict[str, Any] = {"database": "ok", "workers": [], "backends": [], "queue": None}
    try:
        await repo.ping()
        workers = await repo.live_workers(stale_after)
        report["queue"] = await repo.counts()
    except Exception as exc:
        report["database"] = scrub(f"unreachable: {type(exc).__name__}: {exc}")
        problems.append(("the database does not answer",) * 2)
        workers = []
    now = time.time()
    for row in workers:
        slots = row.slots
        report["workers"].append(
            {
                "id": row.id,
                "heartbeat_age_seconds": round(now - row.heartbeat_at, 3),
                "slots": slots,
            }
        )
        report["backends"] += slots
    if report["database"] == "ok" and not workers:
        no_worker = (
            f"no worker has sent a heartbeat in the last {stale_after:.0f} s: start one with "
            "`a1111-proxy worker`"
        )
        problems.append((no_worker, no_worker))
    if workers and all(slot["state"] == "down" for slot in report["backends"]):
        errors = "; ".join(f"{s['backend']}: {s['last_error']}" for s in report["backends"])
        problems.append((f"every backend slot is down: {errors}", "every backend slot is down"))
    report["device"] = await _device(request) if report["database"] == "ok" else None
    report["status"] = "ok" if not problems else "unhealthy"
    report["problems"] = [detailed for detailed, _ in problems]
    status = 200 if not problems else 503
    if not context.is_admin(request):
        public = [general for _, general in problems]
        return JSONResponse(_for_anyone(report, public), status_code=status)
    return JSONResponse(report, status_code=status)


async def _device(request: Request) -> dict[str, Any] | None:
    """The bundled engine's device facts as its worker last stored them (engine/device.py),
    with their age; None with A1111 backends, or before the first fetch."""
    entry = await context.catalogue(request).entry(DEVICE)
    if entry is None:
        return None
    return {**entry.body, "age_seconds": round(max(time.time() - entry.fetched_at, 0.0), 3)}


def _for_anyone(report: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    """What /health shows without an admin token: whether it is healthy and what to look at,
    with no backend address, worker host, job id or backend error (an open route must not hand
    an attacker the network's layout or a URL's credentials)."""
    slots = report["backends"]
    return {
        "status": report["status"],
        "database": "ok" if report["database"] == "ok" else "unreachable",
        "workers": len(report["workers"]),
        "backends": {
            "total": len(slots),
            "down": sum(1 for slot in slots if slot.get("state") == "down"),
        },
        "problems": problems,
        "detail": "send an admin token (A1111_PROXY_ADMIN_TOKENS) for workers, backends and "
        "their errors",
    }


async def ready(request: Request) -> Response:
    """200 once the database is reachable and migrated to this version's schema."""
    head = context.schema_head(request)
    try:
        revision = await current_revision(context.repo(request).db)
    except Exception as exc:
        return JSONResponse(
            {"ready": False, "reason": scrub(f"database unreachable: {type(exc).__name__}: {exc}")},
            503,
        )
    if revision != head:
        return JSONResponse(
            {
                "ready": False,
                "reason": f"database schema is at {revision}, this version needs {head}: "
                "run `a1111-proxy migrate`",
            },
            503,
        )
    return JSONResponse({"ready": True, "schema": revision})


async def metrics(request: Request) -> Response:
    """Prometheus text, computed from the database (every API replica answers the same);
    admins only: it names the backends and shows every tenant's load."""
    context.require_admin(request)
    settings = context.settings(request)
    body = await prometheus.render(
        context.repo(request), settings.metrics_window_seconds, settings.worker_stale_seconds
    )
    return Response(body, media_type=prometheus.CONTENT_TYPE)
