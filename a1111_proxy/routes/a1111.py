"""The rest of A1111's /sdapi/v1, answered over the proxy's jobs and the worker's catalogue.

Nothing here waits on a backend: progress and control act on jobs in the database, and the
catalogue (models, samplers, options, ...) is what the worker last fetched.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match

from a1111_proxy.catalogue import (
    DEFAULT_CHECKPOINT,
    PENDING_OPTIONS,
    REFRESH_REQUESTED,
    CatalogueStore,
    checkpoint_titles,
    find_checkpoint,
)
from a1111_proxy.errors import (
    CatalogueNotReady,
    ControlNetMissing,
    JobNotFound,
    UnknownCheckpoint,
    UnknownImage,
    UnsupportedRoute,
    a1111_error,
)
from a1111_proxy.memory import unknown as memory_unknown
from a1111_proxy.pnginfo import decode_image, parse_infotext, text_chunks
from a1111_proxy.routes import context
from a1111_proxy.routes.context import (
    bool_param,
    caller,
    find_job,
    read_catalogue,
    read_json_object,
)
from a1111_proxy.routes.jobs import requested_steps, submit

log = logging.getLogger("a1111_proxy")

IDLE_STATE = {
    "skipped": False,
    "interrupted": False,
    "stopping_generation": False,
    "job": "",
    "job_count": 0,
    "job_timestamp": "0",
    "job_no": 0,
    "sampling_step": 0,
    "sampling_steps": 0,
}

# What each catalogue path answers before any worker has fetched it.
CATALOGUE_EMPTY: dict[str, Any] = {
    "sd-models": [],
    "loras": [],
    "samplers": [],
    "schedulers": [],
    "upscalers": [],
    "latent-upscale-modes": [],
    "sd-vae": [],
    "hypernetworks": [],
    "face-restorers": [],
    "realesrgan-models": [],
    "prompt-styles": [],
    "extensions": [],
    "script-info": [],
    "scripts": {"txt2img": [], "img2img": []},
    "embeddings": {"loaded": {}, "skipped": {}},
    "memory": {},
    "cmd-flags": {},
}


# --- progress and control ---------------------------------------------------------------


async def progress(request: Request) -> Response:
    """A1111's /progress over the caller's jobs (A1111 has one user, a proxy many): the
    caller's oldest running job, or the one `job_id` names, and job_count counting the caller's
    queued and running jobs (0 and progress 0.0 when idle)."""
    repo = context.repo(request)
    picked = await _picked_job(request)
    skip_image = bool_param(request, "skip_current_image", default=False)
    job, job_count, preview = await repo.progress_of(
        caller(request).tenant, picked, with_preview=not skip_image
    )
    if job is None:
        return JSONResponse(
            {
                "progress": 0.0,
                "eta_relative": 0.0,
                "state": {**IDLE_STATE, "job_count": job_count},
                "current_image": None,
                "textinfo": None,
            }
        )
    # The worker reads progress often, and fetches previews when asked for, while someone looks.
    await repo.watch(job.seq, preview=not skip_image)
    steps = requested_steps(job)
    state = {
        **IDLE_STATE,
        "interrupted": job.cancel_requested_at is not None,
        "job": f"scripts_{job.type}",
        "job_count": job_count,
        "job_timestamp": datetime.fromtimestamp(job.started_at or job.created_at, UTC).strftime(
            "%Y%m%d%H%M%S"
        ),
        "sampling_step": round(job.progress * steps),
        "sampling_steps": steps,
    }
    return JSONResponse(
        {
            "progress": job.progress,
            "eta_relative": job.eta_relative or 0.0,
            "state": state,
            "current_image": preview,
            "textinfo": None,
        }
    )


async def interrupt(request: Request) -> Response:
    """Stops the caller's running jobs (or the one `job_id` names) after their current step
    (A1111 answers `{}`)."""
    picked = await _picked_job(request)
    owner = None if picked is not None else caller(request).tenant
    await context.repo(request).interrupt_running(owner=owner, job_id=picked)
    return JSONResponse({})


async def skip(request: Request) -> Response:
    """Skips the current batch of the caller's running jobs (or of the one `job_id` names)
    (A1111 answers `null`)."""
    picked = await _picked_job(request)
    owner = None if picked is not None else caller(request).tenant
    await context.repo(request).skip_running(owner=owner, job_id=picked)
    return JSONResponse(None)


async def _picked_job(request: Request) -> str | None:
    """The `job_id` query parameter, once it names a job the caller may see: its own, or any
    for an admin (404 otherwise)."""
    job_id = request.query_params.get("job_id")
    if job_id is None:
        return None
    try:
        return (await find_job(request, job_id)).id
    except JobNotFound:
        raise JobNotFound(
            f"You have no job with the id {job_id!r} (another caller's jobs are not yours to "
            "watch or stop). List jobs with GET /sdapi/v1/jobs."
        ) from None


# --- the catalogue ----------------------------------------------------------------------


async def catalogue_entry(request: Request) -> Response:
    name = request.url.path.rsplit("/", 1)[-1]
    body, headers = await read_catalogue(request, name)
    return JSONResponse(CATALOGUE_EMPTY.get(name) if body is None else body, headers=headers)


async def get_options(request: Request) -> Response:
    store = context.catalogue(request)
    stored, headers = await read_catalogue(request, "options")
    options = dict(stored or {})
    pending = await store.get_control(PENDING_OPTIONS)
    if pending:
        options.update(pending["options"])
    default = await store.get_control(DEFAULT_CHECKPOINT)
    if not context.is_admin(request):  # a tenant reads what it set over what all share
        own = await store.tenant_options(caller(request).tenant)
        options.update(own.get("options") or {})
        default = own.get("checkpoint") or default
    if default:
        model = find_checkpoint(await store.get("sd-models"), default) or {}
        options["sd_model_checkpoint"] = default
        options["sd_checkpoint_hash"] = model.get("sha256") or options.get("sd_checkpoint_hash")
    return JSONResponse(options, headers=headers)


async def set_options(request: Request) -> Response:
    """`sd_model_checkpoint` becomes the default for jobs submitted from now on (applied per job,
    so it never races a running one); other options reach the backends between jobs.

    Sent by a tenant (not an admin), both are that tenant's own: its jobs take the checkpoint
    and carry the options in their `override_settings` (A1111 clients such as open-webui pick
    their model this way, and one tenant must not change another's)."""
    body = await read_json_object(request)
    store = context.catalogue(request)
    checkpoint = body.pop("sd_model_checkpoint", None)
    if not context.is_admin(request):
        title = None if checkpoint is None else await _resolve_checkpoint(store, checkpoint)
        await store.set_tenant_options(caller(request).tenant, body, title)
        return JSONResponse(None)
    if checkpoint is not None:
        await store.set_control(DEFAULT_CHECKPOINT, await _resolve_checkpoint(store, checkpoint))
    if body:
        await store.merge_pending_options(body)
    return JSONResponse(None)


async def _resolve_checkpoint(store: CatalogueStore, wanted: Any) -> str:
    models = await store.get("sd-models")
    if models is None:
        raise CatalogueNotReady()
    model = find_checkpoint(models, str(wanted))
    if model is None:
        titles = checkpoint_titles(models)
        raise UnknownCheckpoint(
            f"No checkpoint is called {wanted!r}. Known checkpoints: {', '.join(titles) or 'none'}"
            " (GET /sdapi/v1/sd-models; POST /sdapi/v1/refresh-checkpoints after adding files)."
        )
    return str(model["title"])


async def refresh_checkpoints(request: Request) -> Response:
    await _request_refresh(request, ["checkpoints"])
    return JSONResponse(None)


async def refresh_loras(request: Request) -> Response:
    await _request_refresh(request, ["loras"])
    return JSONResponse(None)


async def refresh_vae(request: Request) -> Response:
    await _request_refresh(request, ["vae"])
    return JSONResponse(None)


async def refresh_embeddings(request: Request) -> Response:
    await _request_refresh(request, ["embeddings"])
    return JSONResponse(None)


async def _request_refresh(request: Request, what: list[str]) -> None:
    context.require_admin(request)  # the worker refetches every backend's lists for everyone
    store = context.catalogue(request)
    await store.set_control(REFRESH_REQUESTED, {"at": time.time(), "what": what})


# --- checkpoint and memory --------------------------------------------------------------

CHECKPOINT_POLL_SECONDS = 0.05
NO_MEMORY_YET = (
    "no backend has reported its memory yet: the worker reads it from its first backend with "
    "the rest of the catalogue (is `a1111-proxy worker` running? see /health); this is the "
    "API process's own RAM"
)


async def unload_checkpoint(request: Request) -> Response:
    """Frees the backends' GPU memory (text-generation-webui calls it to share VRAM)."""
    return await _checkpoint(request, loaded=False)


async def reload_checkpoint(request: Request) -> Response:
    return await _checkpoint(request, loaded=True)


async def _checkpoint(request: Request, *, loaded: bool) -> Response:
    """A1111 answers `{}` once it has unloaded (reloaded) its model. Here the request is
    recorded, every worker applies it to each of its backends between jobs, and the answer
    waits for that, up to CHECKPOINT_WAIT_SECONDS. A backend still running a job then applies
    it after that job; the answer is `{}` all the same (as A1111's), and `X-Proxy-Note` and the
    log say what is pending. A job submitted afterwards runs: backends load on demand."""
    version = await context.catalogue(request).request_checkpoint(loaded)
    note = await _await_applied(request, version)
    if note is None:
        return JSONResponse({})
    what = "reload" if loaded else "unload"
    log.warning("%s-checkpoint: %s", what, note)
    return JSONResponse({}, headers={"X-Proxy-Note": f"{what}-checkpoint {note}"})


async def _await_applied(request: Request, version: int) -> str | None:
    """None once every live backend has applied request `version`; else what is pending."""
    settings = context.settings(request)
    deadline = time.monotonic() + settings.checkpoint_wait_seconds
    while True:
        workers = await context.repo(request).live_workers(settings.worker_stale_seconds)
        waiting, down = _not_applied(workers, version)
        if not workers or not waiting or time.monotonic() >= deadline:
            break
        await asyncio.sleep(CHECKPOINT_POLL_SECONDS)
    if not workers:
        return (
            "recorded, but no worker is running to apply it: start `a1111-proxy worker` "
            "(a backend loads its model again when a job needs it)"
        )
    parts = []
    if waiting:
        parts.append(f"pending on {', '.join(waiting)} until its running job ends")
    if down:
        parts.append(f"pending on {', '.join(down)}, unreachable now")
    return "; ".join(parts) or None


def _not_applied(workers: list[Any], version: int) -> tuple[list[str], list[str]]:
    """Backends of live workers that have not applied request `version`: (up, down). A slot
    that has not looked yet (None) will start past it."""
    waiting: set[str] = set()
    down: set[str] = set()
    for row in workers:
        for slot in row.slots:
            applied = slot.get("checkpoint_version")
            if applied is not None and applied < version:
                (down if slot.get("state") == "down" else waiting).add(slot["backend"])
    return sorted(waiting), sorted(down - waiting)


async def memory(request: Request) -> Response:
    """The backend's own answer (A1111's `{ram, cuda}`) as the worker last fetched it; never
    `{}`: before any backend reported, this process's RAM and a `cuda.error` saying why."""
    body = await context.catalogue(request).get("memory")
    return JSONResponse(body if body else memory_unknown(NO_MEMORY_YET))


async def controlnet_entry(request: Request) -> Response:
    name = "controlnet-" + request.url.path.rsplit("/", 1)[-1]
    body = await context.catalogue(request).get(name)
    if body is None:
        raise ControlNetMissing()
    return JSONResponse(body)


# --- other A1111 routes -----------------------------------------------------------------


async def png_info(request: Request) -> Response:
    """Answered locally, exactly: the PNG's text chunks and its parsed infotext."""
    body = await read_json_object(request)
    try:  # off the event loop: a large PNG takes a while to walk
        chunks = await context.cpu(request).run(_read_png_text, str(body.get("image") or ""))
    except ValueError as exc:
        raise UnknownImage(str(exc)) from None
    info = chunks.pop("parameters", "")
    return JSONResponse(
        {"info": info, "items": chunks, "parameters": parse_infotext(info) if info else {}}
    )


def _read_png_text(image: str) -> dict[str, str]:
    return text_chunks(decode_image(image))


def queued_route(kind: str) -> Callable[[Request], Awaitable[Response]]:
    """Routes that need a backend run as jobs on a slot, like generations, and answer in wait
    mode by default (these clients expect the answer in the response)."""

    async def endpoint(request: Request) -> Response:
        return await submit(request, kind, wait_by_default=True)

    endpoint.__name__ = kind.replace("-", "_")
    return endpoint


_TRAINING = (
    "The proxy does not run training, which holds a GPU for hours outside any queue. Train on an "
    "A1111 directly (its Train tab, or its own API at one of A1111_URLS), then POST "
    "/sdapi/v1/{refresh} here and use it in prompts ({listed} lists them)."
)
_SERVER = (
    "it {does} the A1111 process (A1111 offers it only with --api-server-stop). The proxy does "
    "not let API clients stop its backends or itself: restart an A1111 on its own machine (the "
    "worker notices when it is back; see /health), and stop or restart the proxy with its "
    "process manager (SIGTERM to `a1111-proxy serve` and `a1111-proxy worker`, supervisorctl, "
    "docker compose restart)."
)
_EMBEDDINGS = {"refresh": "refresh-embeddings", "listed": "GET /sdapi/v1/embeddings"}
_HYPERNETWORKS = {"refresh": "refresh-checkpoints", "listed": "GET /sdapi/v1/hypernetworks"}
# A1111 v1.10 routes (modules/api/api.py) that the proxy does not offer: what each is, why not,
# and what to use instead. Every other A1111 route works (tests/processes/test_a1111_routes.py).
NOT_OFFERED: dict[str, str] = {
    "/sdapi/v1/create/embedding": "it creates an empty textual-inversion embedding for "
    "training. " + _TRAINING.format(**_EMBEDDINGS),
    "/sdapi/v1/train/embedding": "it trains a textual-inversion embedding. "
    + _TRAINING.format(**_EMBEDDINGS),
    "/sdapi/v1/create/hypernetwork": "it creates an empty hypernetwork for training. "
    + _TRAINING.format(**_HYPERNETWORKS),
    "/sdapi/v1/train/hypernetwork": "it trains a hypernetwork. "
    + _TRAINING.format(**_HYPERNETWORKS),
    "/sdapi/v1/server-kill": _SERVER.format(does="kills"),
    "/sdapi/v1/server-restart": _SERVER.format(does="restarts"),
    "/sdapi/v1/server-stop": _SERVER.format(does="stops"),
}


async def unsupported(request: Request) -> Response:
    """405 when the path exists with another method; a 404 saying why and what to use instead
    for the A1111 routes not offered; otherwise a 404 that says what is offered."""
    for route in request.app.router.routes:
        if getattr(route, "endpoint", None) is unsupported:
            continue
        match, _ = route.matches({**request.scope, "method": "__none__"})
        if match is Match.PARTIAL:
            return a1111_error(405, "HTTPException", "Method Not Allowed", "method_not_allowed")
    reason = NOT_OFFERED.get(request.url.path.rstrip("/"))
    if reason is not None:
        raise UnsupportedRoute(
            f"a1111-proxy does not offer {request.method} {request.url.path}: {reason}"
        )
    raise UnsupportedRoute(
        f"a1111-proxy does not offer {request.method} {request.url.path}. It offers txt2img, "
        "img2img, the job API (/sdapi/v1/jobs), progress, interrupt, skip, options, the model "
        "catalogue, png-info, interrogate, extras and ControlNet's detect; see /doc."
    )
