"""Submitting jobs and reading, listing and canceling them (their images: routes/images.py)."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from a1111_proxy import egress
from a1111_proxy.catalogue import checkpoint_names, find_checkpoint
from a1111_proxy.db.tables import STATUSES
from a1111_proxy.errors import InvalidRequest, JobNotFound, validation_detail
from a1111_proxy.images import ImageRules, Resized, check_images, fetch_image_urls
from a1111_proxy.jobs import TERMINAL, JobFilter, JobRecord, JobRepository, NewJob
from a1111_proxy.routes import context
from a1111_proxy.routes.context import (
    caller,
    choice,
    find_job,
    int_param,
    read_json_object,
    text_param,
    visible_owner,
)
from a1111_proxy.schemas import (
    PROXY_FIELDS,
    REQUEST_MODELS,
    Caps,
    ProxyFields,
    job_json,
    render_job,
    stored_request,
)
from a1111_proxy.settings import Settings

MAX_PAGE = 200

log = logging.getLogger("a1111_proxy")


async def txt2img(request: Request) -> Response:
    return await submit(request, "txt2img")


async def img2img(request: Request) -> Response:
    return await submit(request, "img2img")


async def submit(request: Request, kind: str, *, wait_by_default: bool = False) -> Response:
    """Store the job, then answer 202 with it, or (wait mode) A1111's own answer once done."""
    body = await read_json_object(request)
    a1111_body = {key: value for key, value in body.items() if key not in PROXY_FIELDS}
    proxy = validate_submission(kind, body, a1111_body, caps(context.settings(request)))
    if context.settings(request).backend == "diffusers":
        refuse_what_the_engine_cannot_run(kind, a1111_body)
    if context.settings(request).backend == "a1111":
        refuse_engine_only_fields(a1111_body)
    resized = await check_input_images(request, kind, a1111_body)
    key = idempotency_key(request)
    timeout = deadline_seconds(request, proxy.timeout)
    wait = wait_preference(
        request, default_wait=wait_by_default, has_webhook=proxy.webhook_url is not None
    )
    payload = json.dumps(a1111_body)
    shown = stored_request(a1111_body, [item.as_dict() for item in resized])
    new = NewJob(
        type=kind,
        # Most bodies carry no image or credential to leave out: then the two are the same text.
        request=payload if shown == a1111_body else json.dumps(shown),
        payload=payload,
        priority=proxy.priority,
        webhook_url=proxy.webhook_url,
        webhook_secret=proxy.webhook_secret,
        webhook_events=json.dumps(proxy.webhook_events) if proxy.webhook_url else None,
        idempotency_key=key,
        request_hash=_fingerprint(body) if key else None,
        checkpoint=_requested_checkpoint(a1111_body),
        timeout=timeout,
        owner=caller(request).tenant,
    )
    submitted = await context.repo(request).submit(new)
    headers = {"Location": f"/sdapi/v1/jobs/{submitted.job.id}", "X-Job-Id": submitted.job.id}
    if submitted.replayed:
        headers["Idempotent-Replayed"] = "true"
    if wait is not None:
        return await answer_when_done(request, submitted.job, wait, headers)
    status = 200 if submitted.replayed else 202
    # No queue_position here (a count per submit would slow bulk submits): GET the job for it.
    return job_response(submitted.job, status, headers)


def job_response(row: JobRecord, status: int, headers: dict[str, str]) -> Response:
    return Response(job_json(row), status, headers, media_type="application/json")


def _requested_checkpoint(body: dict[str, Any]) -> str | None:
    overrides = body.get("override_settings")
    if isinstance(overrides, dict) and isinstance(overrides.get("sd_model_checkpoint"), str):
        return overrides["sd_model_checkpoint"] or None
    return None


class Wait:
    def __init__(self, seconds: float, applied: str | None) -> None:
        self.seconds = seconds
        self.applied = applied  # the Preference-Applied value, when asked for in Prefer


def wait_preference(
    request: Request, *, default_wait: bool = False, has_webhook: bool = False
) -> Wait | None:
    """RFC 7240: `Prefer: wait` (until done), `wait=N` (N seconds), `respond-async` (202).

    Without a preference, RESPONSE_MODE decides: `auto` holds the request as A1111 does unless
    the body has a `webhook_url` (a webhook-driven caller never wants to hold the connection);
    `wait` always holds; `async` answers 202 (but for the routes whose clients always expect
    the answer in the response: extras, interrogate, ControlNet detect)."""
    settings = context.settings(request)
    tokens = [t.strip().lower() for t in request.headers.get("prefer", "").split(",")]
    for token in tokens:
        name, _, value = token.partition("=")
        if name.strip() != "wait":
            continue
        value = value.strip().strip('"')
        if not value:
            return Wait(settings.wait_seconds_max, "wait")
        try:
            seconds = min(float(value), settings.wait_seconds_max)
        except ValueError:
            break
        return Wait(max(0.0, seconds), f"wait={value}")
    if "respond-async" in tokens:
        return None
    mode = settings.response_mode
    if mode == "wait" or (mode == "auto" and not has_webhook) or (mode == "async" and default_wait):
        return Wait(settings.wait_seconds_max, None)
    return None


async def answer_when_done(
    request: Request, row: Any, wait: Wait, headers: dict[str, str]
) -> Response:
    """Hold the request until the job ends, then answer exactly as A1111 would.

    Fails fast with 503 (canceling the job) once no backend has answered for
    BACKEND_DOWN_GRACE seconds. A client that goes away before its job started cancels it
    (CANCEL_ON_DISCONNECT); a running job finishes and keeps its result. At the wait's deadline
    the answer is 202 with the job."""
    repo = context.repo(request)
    if wait.applied:
        headers = {**headers, "Preference-Applied": wait.applied, "Vary": "Prefer"}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait.seconds
    gone = asyncio.ensure_future(_client_gone(request))
    try:
        while row.status not in TERMINAL:
            end = await _first(context.waiter(request).wait(row.id, deadline - loop.time()), gone)
            if end == "gone":
                return await _abandoned(request, row.id)
            if end == "outage":
                answer = await _fail_fast(request, row.id, headers)
                if answer is not None:
                    return answer
            row = await repo.get(row.id)
            if end == "timeout":
                break
    finally:
        gone.cancel()
    if row.status not in TERMINAL:
        return job_response(row, 202, headers)
    return a1111_answer(row, await repo.images(row.seq), headers)


async def _first(waiting: Any, gone: asyncio.Future[None]) -> str:
    """What ended the wait: "done", "outage", "timeout" (from the waiter) or "gone"."""
    task = asyncio.ensure_future(waiting)
    await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    if not task.done():
        task.cancel()
        return "gone"
    return str(task.result())


async def _client_gone(request: Request) -> None:
    """Returns once the client has disconnected. The body is read by now, so the server's next
    message is the disconnect: no polling, whatever the number of waiting clients."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _abandoned(request: Request, job_id: str) -> Response:
    """The waiting client went away: cancel its job if it has not started, unless the request
    had an Idempotency-Key (its client will ask again with it, and must then get the job's
    outcome, not a job canceled because it asked once before)."""
    if request.headers.get("idempotency-key") is not None:
        outcome = "the job goes on (Idempotency-Key: the client can ask for it again)"
    elif not context.settings(request).cancel_on_disconnect:
        outcome = "the job goes on (CANCEL_ON_DISCONNECT=false)"
    elif await context.repo(request).cancel_queued(
        job_id, "client_gone", "the waiting client went away before the job started"
    ):
        outcome = "the job was canceled before it started"
    else:
        outcome = "the job had started and goes on"
    log.info("job %s: its waiting client went away; %s", job_id, outcome)
    return Response(status_code=499)  # nobody reads it


async def _fail_fast(request: Request, job_id: str, headers: dict[str, str]) -> Response | None:
    """503 in A1111's error shape when nothing can run the job, which is then canceled; None if
    the job started meanwhile (then it is waited for)."""
    outage = context.waiter(request).outage
    if outage is None:
        return None
    message = f"No backend can run this job: {outage.reason}."
    if not await context.repo(request).cancel_queued(job_id, "backend_unavailable", message):
        return None
    body = {
        "error": "BackendUnavailable",
        "detail": message,
        "body": "",
        "errors": message,
        "code": "backend_unavailable",
        "job_id": job_id,
    }
    return JSONResponse(body, status_code=503, headers={**headers, "Retry-After": "30"})


def a1111_answer(row: Any, images: list[bytes], headers: dict[str, str]) -> Response:
    """A finished job as A1111's own response: its body on success, its refusal (status and
    body) when A1111 refused the job, our error in A1111's shape otherwise (as the job view
    shows them: credentials left out)."""
    view = render_job(row, images)
    if view.get("render_error"):
        message = f"Job {row.id} ended {row.status}, but {view['render_error']}."
        view["error"] = {"code": "internal_error", "message": message}
    elif view["result"] is not None and row.status in ("completed", "canceled"):
        return JSONResponse(view["result"], headers=headers)
    error = view["error"] or {"code": "canceled", "message": "canceled"}
    code = error.get("code", "")
    status = ERROR_STATUS.get(code, 500)
    if code == "backend_rejected" and error.get("backend_status"):
        if error.get("backend_body") is not None:
            return _a1111_refusal(error["backend_status"], error["backend_body"], headers)
        status = error["backend_status"]
    if status == 503:
        headers = {**headers, "Retry-After": "30"}
    body = {
        "error": code or "error",
        "detail": error.get("message", ""),
        "body": "",
        "errors": error.get("message", ""),
        "code": code or None,
        "job_id": row.id,
    }
    return JSONResponse(body, status_code=status, headers=headers)


def _a1111_refusal(status: int, body: Any, headers: dict[str, str]) -> Response:
    if isinstance(body, str):
        return Response(body, status_code=status, headers=headers)
    return JSONResponse(body, status_code=status, headers=headers)


# A finished job's error as the status a held request answers with. A1111's own refusals
# (backend_rejected with A1111's status) answer with that status; a backend that stayed
# unavailable is 503 whatever A1111 last said (a bare 500 would read as our fault).
ERROR_STATUS = {
    "backend_unavailable": 503,
    "backend_bad_response": 502,
    "canceled": 409,
    "client_gone": 409,
    "deadline": 504,
    "worker_lost": 500,
    "internal_error": 500,
}


def caps(settings: Settings) -> Caps:
    return Caps(
        settings.max_steps, settings.max_n_iter, settings.max_batch_size, settings.max_width_height
    )


def validate_submission(
    kind: str, body: dict[str, Any], a1111_body: dict[str, Any], limits: Caps
) -> ProxyFields:
    """Check the A1111 part as A1111 would, then the operator's caps, and our own fields;
    report every problem at once."""
    errors: list[dict[str, Any]] = []
    model = REQUEST_MODELS.get(kind)
    try:
        if model is not None:
            errors += limits.problems(model.model_validate(a1111_body))
    except ValidationError as exc:
        errors += validation_detail(exc)
    try:
        proxy = ProxyFields.model_validate(body)
    except ValidationError as exc:
        errors += validation_detail(exc)
    if errors:
        raise InvalidRequest(errors)
    return proxy


async def check_input_images(request: Request, kind: str, body: dict[str, Any]) -> list[Resized]:
    """Check the body's images from their headers, each and all together (and, opt-in, resize
    the large ones), on the process's CpuPool; return the images that were resized."""
    if kind == "txt2img" and not body.get("alwayson_scripts"):
        return []
    settings = context.settings(request)
    rules = ImageRules(
        settings.image_max_pixels,
        settings.image_max_side,
        settings.image_urls,
        settings.request_max_pixels,
    )
    problems = []
    if rules.allow_urls:
        fetch = functools.partial(
            egress.fetch,
            allow_private=settings.webhook_allow_private,
            ca_bundle=settings.webhook_ca_bundle,
        )
        problems = await fetch_image_urls(kind, body, fetch, settings.max_body_bytes)
    checked = await context.cpu(request).run(check_images, kind, body, rules)
    problems += checked.problems
    if problems:
        raise InvalidRequest(
            [{"loc": ["body", *p.loc], "msg": p.message, "type": "image"} for p in problems]
        )
    return checked.resized


def refuse_engine_only_fields(a1111_body: dict[str, Any]) -> None:
    """Our extensions that only the bundled engine runs are refused, not silently dropped, when
    the backend is an A1111 server (it would make a different image than asked for)."""
    if a1111_body.get("noise_mask") is not None:
        raise InvalidRequest(
            [
                {
                    "loc": ["body", "noise_mask"],
                    "msg": "noise_mask is an a1111-proxy extension that only the bundled engine "
                    "runs (BACKEND=diffusers); an A1111 server has no such field. Leave it out",
                    "type": "unsupported",
                }
            ]
        )


def refuse_what_the_engine_cannot_run(kind: str, a1111_body: dict[str, Any]) -> None:
    """With the bundled engine, refuse at once what it would fail on (bad size, unknown sampler,
    unsupported features) instead of queueing a job that can only end in error."""
    from a1111_proxy.engine.params import problems  # plain Python: no torch in the API

    found = problems(kind, a1111_body)
    if found:
        raise InvalidRequest(
            [{"loc": ["body"], "msg": msg, "type": "value_error"} for msg in found]
        )


MAX_TIMEOUT_SECONDS = 30 * 86400.0


def deadline_seconds(request: Request, body_timeout: float | None) -> float | None:
    """`Cancel-After: <seconds>` or the body's `timeout`: the earlier deadline wins."""
    raw = request.headers.get("cancel-after")
    if raw is None:
        return body_timeout
    try:
        seconds = float(raw.strip())
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds <= MAX_TIMEOUT_SECONDS:  # also refuses nan and inf
        raise InvalidRequest(
            [
                {
                    "loc": ["header", "Cancel-After"],
                    "msg": "must be a number of seconds above 0 and at most "
                    f"{MAX_TIMEOUT_SECONDS:.0f} (e.g. Cancel-After: 90)",
                    "type": "value_error",
                }
            ]
        )
    return seconds if body_timeout is None else min(seconds, body_timeout)


def idempotency_key(request: Request) -> str | None:
    raw = request.headers.get("idempotency-key")
    if raw is None:
        return None
    key = raw.strip()
    if len(key) >= 2 and key[0] == key[-1] == '"':  # the draft's sf-string form
        key = key[1:-1]
    if not key or len(key) > 255 or not key.isprintable():
        raise InvalidRequest(
            [
                {
                    "loc": ["header", "Idempotency-Key"],
                    "msg": "must be 1 to 255 printable characters (a UUID is a good key)",
                    "type": "value_error",
                }
            ]
        )
    return key


def _fingerprint(body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


async def get_job(request: Request) -> Response:
    repo = context.repo(request)
    # A completed job's images, or those A1111 answered an interrupted one with (canceled).
    row, images, position = await context.find_job_shown(request, request.path_params["job_id"])
    if row.status == "processing":  # its worker reads its progress often while someone looks
        await repo.watch(row.seq)
    view = render_job(row, images) | {"queue_position": position}
    if row.status == "queued":
        outage = await context.backends(request).outage()
        view["waiting_reason"] = outage.reason if outage is not None else None
    return JSONResponse(view)


async def render_with_position(
    repo: JobRepository, row: Any, images: list[bytes] | None = None, *, with_result: bool = True
) -> dict[str, Any]:
    """The job as GET /jobs/{id} shows it: with `queue_position` (1 = next) while queued."""
    position = await repo.queue_position(row)
    return render_job(row, images, with_result=with_result) | {"queue_position": position}


def requested_steps(row: Any) -> int:
    """The sampling steps the job asked for (A1111's default, 50, when it did not say)."""
    try:
        steps = row.request.get("steps")
        return int(steps) if steps else 50
    except (ValueError, TypeError):
        return 50


async def list_jobs(request: Request) -> Response:
    status = choice(request, "status", STATUSES)
    kind = choice(request, "type", tuple(REQUEST_MODELS))
    limit = int_param(request, "limit", default=50, low=1, high=MAX_PAGE)
    cursor = int_param(request, "cursor", default=None, low=1, high=2**62)
    where = JobFilter(
        status=status,
        type=kind,
        owner=_listed_owner(request),
        checkpoints=await _checkpoint_names(request),
        prompt=text_param(request, "prompt", MAX_PROMPT_FILTER),
    )
    page = await context.repo(request).listing(where, before_seq=cursor, limit=limit)
    next_cursor = None if page.next_seq is None else str(page.next_seq)
    return JSONResponse(
        {
            "jobs": [render_job(row, with_result=False) for row in page.jobs],
            "next_cursor": next_cursor,
        }
    )


MAX_PROMPT_FILTER = 200


async def _checkpoint_names(request: Request) -> tuple[str, ...]:
    """`?model=`: the checkpoint under every name A1111 knows it by (a job stores the name its
    request gave), or only as given when the catalogue does not know it."""
    wanted = (request.query_params.get("model") or "").strip()
    if not wanted:
        return ()
    model = find_checkpoint(await context.catalogue(request).get("sd-models"), wanted)
    return tuple(sorted({wanted} | (checkpoint_names(model) if model else set())))


def _listed_owner(request: Request) -> str | None:
    """A tenant lists its own jobs; an admin everyone's, or one tenant's with `?owner=`."""
    owner = visible_owner(request)
    return owner if owner is not None else request.query_params.get("owner") or None


async def cancel_job(request: Request) -> Response:
    job = await find_job(request, request.path_params["job_id"])  # another tenant's: 404
    row = await context.repo(request).cancel(job.id)
    if row is None:
        raise JobNotFound()
    return JSONResponse(render_job(row, with_result=False))
