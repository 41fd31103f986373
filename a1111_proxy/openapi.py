"""The OpenAPI 3.1 document, built with apispec from one explicit table of operations and the
pydantic models. `tests/unit/test_openapi.py` checks that every route is in the table and that
`openapi/openapi.json` is this document."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from apispec import APISpec
from pydantic import BaseModel

from a1111_proxy import __version__
from a1111_proxy import schemas as s

JSON = "application/json"


@dataclass(frozen=True)
class Op:
    method: str
    path: str
    summary: str
    tag: str
    responses: dict[int | str, type[BaseModel] | str | None]
    body: str | type[BaseModel] | None = None
    params: list[dict[str, Any]] = field(default_factory=list)
    description: str = ""
    open: bool = False  # needs no token


def _header(name: str, description: str) -> dict[str, Any]:
    return {
        "in": "header",
        "name": name,
        "required": False,
        "schema": {"type": "string"},
        "description": description,
    }


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "in": "query",
        "name": name,
        "required": False,
        "schema": schema,
        "description": description,
    }


def _path(name: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"in": "path", "name": name, "required": True, "schema": schema or {"type": "string"}}


CANCEL_AFTER = _header(
    "Cancel-After",
    "seconds (a positive number, e.g. 90): a job not "
    "finished by then ends canceled, error code deadline (same as `timeout`)",
)
PREFER = _header(
    "Prefer",
    "`respond-async` (202 + job at once), `wait` (until done) or "
    "`wait=N` (seconds). Without it the deployment's A1111_PROXY_RESPONSE_MODE "
    "decides; the default `auto` holds the request and answers as A1111 does, "
    "unless the body has a `webhook_url`",
)
IDEMPOTENCY = _header("Idempotency-Key", "a retry with the same key returns the same job")
JOB_ID = _path("job_id")
ANY_JSON: dict[str, Any] = {}
# In wait mode a job that failed answers with A1111's own status and body ("default").
SUBMIT: dict[int | str, Any] = {
    200: s.A1111Result,
    202: s.Job,
    413: s.A1111Error,
    429: s.A1111Error,
    422: "any",
    "default": "any",
}
WAITED: dict[int | str, Any] = {
    200: "any",
    202: s.Job,
    413: s.A1111Error,
    422: "any",
    "default": "any",
}
CALLERS_JOB = _query(
    "job_id",
    {"type": "string"},
    "a1111-proxy extension: act on this one of your jobs (404 when it is not yours)",
)
PER_CALLER = (
    "A1111 has one user; behind the proxy these act on the caller's own jobs: the API "
    "token's tenant, or the client address when tokens are off. `/progress` shows "
    "the oldest running one; `state.job_count` counts the caller's queued and running "
    "jobs."
)
CIVITAI = _query("civitai", {"type": "boolean"}, "false: leave out the civitai key")
DOWNLOADS = "/sdapi/v1/models/downloads"
DOWNLOAD_ID = _path("download_id")
CATALOGUE_LISTS = (
    "samplers",
    "schedulers",
    "upscalers",
    "latent-upscale-modes",
    "sd-vae",
    "script-info",
    "prompt-styles",
    "hypernetworks",
    "face-restorers",
    "realesrgan-models",
    "extensions",
)
CATALOGUE_OBJECTS = ("scripts", "embeddings", "memory", "cmd-flags")

OPERATIONS: list[Op] = [
    Op(
        "post",
        "/sdapi/v1/txt2img",
        "Queue a txt2img job",
        "generation",
        SUBMIT,
        body="Txt2ImgSubmit",
        params=[PREFER, IDEMPOTENCY, CANCEL_AFTER],
        description="A1111's body (all its fields, parsed as leniently as A1111 does; unknown "
        "keys are passed on) plus the proxy's fields. By default (RESPONSE_MODE=auto) 200 with "
        "A1111's own answer once the job ran, the job id in `Location` and `X-Job-Id`; with "
        "`Prefer: respond-async` or a `webhook_url`, 202 with the job at once. A1111's own error "
        "status and body come back as they are; 503 when no backend has answered for "
        "BACKEND_DOWN_GRACE seconds (the job is then canceled).",
    ),
    Op(
        "post",
        "/sdapi/v1/img2img",
        "Queue an img2img job",
        "generation",
        SUBMIT,
        body="Img2ImgSubmit",
        params=[PREFER, IDEMPOTENCY, CANCEL_AFTER],
    ),
    Op(
        "get",
        "/sdapi/v1/jobs",
        "List jobs, newest first (never image data)",
        "jobs",
        {200: s.JobList, 422: s.ValidationFailed},
        params=[
            _query(
                "status",
                {
                    "type": "string",
                    "enum": ["queued", "processing", "completed", "error", "canceled"],
                },
                "only these",
            ),
            _query("type", {"type": "string", "enum": ["txt2img", "img2img"]}, "only this type"),
            _query(
                "model",
                {"type": "string"},
                "only jobs that asked for this checkpoint (by any name A1111 knows it by: "
                "title, model name, file name, hash)",
            ),
            _query(
                "prompt",
                {"type": "string", "maxLength": 200},
                "only jobs whose prompt holds this text, ignoring case; a page then looks at "
                "no more than 2,000 jobs and may hold fewer than `limit` (even none) with a "
                "`next_cursor` to go on with",
            ),
            _query("owner", {"type": "string"}, "admins: only this tenant's jobs"),
            _query("limit", {"type": "integer", "minimum": 1, "maximum": 200}, "page size"),
            _query("cursor", {"type": "string"}, "next_cursor of the previous page"),
        ],
    ),
    Op(
        "get",
        "/sdapi/v1/jobs/{job_id}",
        "One job, with A1111's answer once completed",
        "jobs",
        {200: s.Job, 404: s.A1111Error},
        params=[JOB_ID],
    ),
    Op(
        "post",
        "/sdapi/v1/jobs/{job_id}/cancel",
        "Cancel a job",
        "jobs",
        {200: s.Job, 404: s.A1111Error},
        params=[JOB_ID],
        description="A queued job ends at once; a running one is interrupted on its A1111; a "
        "finished one is left as it is.",
    ),
    Op(
        "get",
        "/sdapi/v1/jobs/{job_id}/images/{n}",
        "One result image, or a thumbnail of it",
        "jobs",
        {200: "image", 404: s.A1111Error, 422: "any"},
        params=[
            JOB_ID,
            _path("n", {"type": "integer", "minimum": 0}),
            _query(
                "size",
                {"type": "integer", "enum": [64, 128, 256, 512]},
                "a thumbnail: the image scaled down (never up) so that its longer side is at "
                "most this, as WebP, cached",
            ),
        ],
        description="The image as stored (PNG as A1111 made it, or JPEG/WebP), or with `size` "
        "a thumbnail, kept in the API process's memory (THUMBNAIL_CACHE_BYTES). Both are "
        "`Cache-Control: private, max-age=86400`. 422 `thumbnail_unavailable` for an image "
        "that cannot be scaled (larger than 8192 x 8192, or not an image).",
    ),
    Op(
        "get",
        "/sdapi/v1/jobs/{job_id}/events",
        "Follow a job: status and progress as Server-Sent Events",
        "jobs",
        {200: "event-stream", 204: "empty", 404: s.A1111Error},
        params=[JOB_ID, _header("Last-Event-ID", "resume: the id of the last event received")],
        description="`text/event-stream`. Events: `status` (on connect and on every change; the "
        "job without its result), `progress` (`step`, `steps`, `progress`, `eta`, `preview`: a "
        "data: URI when a new live preview exists, else null; at most every 250 ms), then one of "
        "`completed`, `error`, `canceled` with the job as GET /sdapi/v1/jobs/{job_id} shows it, "
        "and the stream ends. Ids: `<attempt>-<status>-<n>` (status: n=0, progress: n>=1), "
        "`<attempt>-<status>` (the final event); with `Last-Event-ID` nothing already seen is "
        "sent again, a missed final event is, and a client that has the final event gets 204. "
        "A `: ping` comment every 15 s (A1111_PROXY_SSE_PING_SECONDS).",
    ),
    Op(
        "get",
        "/sdapi/v1/queue",
        "The queue: positions, running jobs by slot, estimated wait",
        "jobs",
        {200: s.QueueView, 422: s.ValidationFailed},
        params=[
            _query(
                "limit",
                {"type": "integer", "minimum": 1, "maximum": 1000},
                "how many queued jobs to list (default 100)",
            )
        ],
    ),
    Op(
        "get",
        "/sdapi/v1/jobs/{job_id}/webhooks",
        "The job's webhook deliveries and attempts",
        "webhooks",
        {200: s.DeliveryList, 404: s.A1111Error},
        params=[JOB_ID],
    ),
    Op(
        "post",
        "/sdapi/v1/jobs/{job_id}/webhooks/redeliver",
        "Send a webhook again",
        "webhooks",
        {202: s.Delivery, 404: s.A1111Error, 422: s.ValidationFailed},
        params=[JOB_ID],
        body="object",
        description="The same `webhook-id`, a fresh signature, one manual attempt. Body "
        '(optional): `{"delivery_id": "msg_..."}`; without it, the latest `job.completed`.',
    ),
    Op(
        "get",
        "/sdapi/v1/progress",
        "A1111's progress, over the caller's jobs",
        "a1111",
        {200: s.ProgressResponse, 404: s.A1111Error},
        params=[
            _query("skip_current_image", {"type": "boolean"}, "leave the live preview out"),
            CALLERS_JOB,
        ],
        description=PER_CALLER,
    ),
    Op(
        "post",
        "/sdapi/v1/interrupt",
        "Interrupt the caller's running jobs",
        "a1111",
        {200: "object", 404: s.A1111Error},
        params=[CALLERS_JOB],
        description=PER_CALLER,
    ),
    Op(
        "post",
        "/sdapi/v1/skip",
        "Skip the current batch of the caller's running jobs",
        "a1111",
        {200: "null", 404: s.A1111Error},
        params=[CALLERS_JOB],
        description=PER_CALLER,
    ),
    Op(
        "get",
        "/sdapi/v1/options",
        "The options (with the proxy's default checkpoint)",
        "a1111",
        {200: "object", 503: s.A1111Error},
    ),
    Op(
        "post",
        "/sdapi/v1/options",
        "Set options",
        "a1111",
        {200: "null", 422: "any", 503: s.A1111Error},
        body="object",
        description="`sd_model_checkpoint` becomes the checkpoint of jobs submitted afterwards; "
        "other options reach each backend between its jobs.",
    ),
    *(
        Op(
            "get",
            f"/sdapi/v1/{name}",
            f"A1111's {name}, each with its Civitai metadata when known",
            "models",
            {200: "array", 503: s.A1111Error},
            params=[CIVITAI],
        )
        for name in ("sd-models", "loras")
    ),
    *(
        Op(
            "get",
            f"/sdapi/v1/{name}/{{name}}",
            f"One of A1111's {name}, by {how}",
            "models",
            {200: "object", 404: s.A1111Error},
            params=[_path("name"), CIVITAI],
        )
        for name, how in (("sd-models", "title, name or hash"), ("loras", "name or alias"))
    ),
    Op(
        "post",
        DOWNLOADS,
        "Download a model from Civitai (or a URL) into MODELS_DIR (admins)",
        "models",
        {202: s.Download, 403: s.A1111Error, 422: s.ValidationFailed},
        body=s.DownloadRequest,
        description="Answers 202 with the download, `queued`; a worker resolves the source "
        "with Civitai, checks it (no pickle unless A1111_PROXY_DOWNLOAD_ALLOW_PICKLE; enough "
        "free disk), streams it into `<name>.part` (resumed with Range after a dropped "
        "connection or a restart), checks Civitai's SHA256, moves it into its kind's folder "
        "with A1111's `.civitai.info` and `.preview.png` sidecars, and asks the backends to "
        "rescan. Only the worker talks to Civitai.",
    ),
    Op(
        "get",
        DOWNLOADS,
        "Model downloads, newest first (admins)",
        "models",
        {200: s.DownloadList, 403: s.A1111Error, 422: s.ValidationFailed},
        params=[
            _query(
                "status",
                {
                    "type": "string",
                    "enum": ["queued", "running", "completed", "failed", "canceled"],
                },
                "only these",
            ),
            _query("limit", {"type": "integer", "minimum": 1, "maximum": 200}, "default 50"),
        ],
    ),
    Op(
        "get",
        f"{DOWNLOADS}/{{download_id}}",
        "One model download, with bytes done and total, speed and ETA (admins)",
        "models",
        {200: s.Download, 403: s.A1111Error, 404: s.A1111Error},
        params=[DOWNLOAD_ID],
    ),
    Op(
        "post",
        f"{DOWNLOADS}/{{download_id}}/cancel",
        "Cancel a model download (admins)",
        "models",
        {200: s.Download, 403: s.A1111Error, 404: s.A1111Error},
        params=[DOWNLOAD_ID],
        description="A queued download ends at once; a running one stops within a second and "
        "its part file is removed; a finished one is left as it is.",
    ),
    Op(
        "get",
        f"{DOWNLOADS}/{{download_id}}/events",
        "Follow a model download: its progress as Server-Sent Events (admins)",
        "models",
        {200: "event-stream", 204: "empty", 403: s.A1111Error, 404: s.A1111Error},
        params=[DOWNLOAD_ID, _header("Last-Event-ID", "`final`: answered 204")],
        description="`text/event-stream`: `progress` with the download (as GET shows it) on "
        "connect and whenever it changes, then one `completed`, `failed` or `canceled` (id "
        "`final`) and the stream ends. A `: ping` comment keeps an idle stream open.",
    ),
    *(
        Op(
            "get",
            f"/sdapi/v1/{name}",
            f"A1111's {name} (from the worker's catalogue)",
            "a1111",
            {200: "array", 503: s.A1111Error},
        )
        for name in CATALOGUE_LISTS
    ),
    *(
        Op(
            "get",
            f"/sdapi/v1/{name}",
            f"A1111's {name} (from the worker's catalogue)",
            "a1111",
            {200: "object", 503: s.A1111Error},
        )
        for name in CATALOGUE_OBJECTS
    ),
    *(
        Op(
            "post",
            f"/sdapi/v1/refresh-{what}",
            f"Ask the backends to rescan {what} (admins)",
            "a1111",
            {200: "null", 403: s.A1111Error},
        )
        for what in ("checkpoints", "loras", "vae", "embeddings")
    ),
    *(
        Op(
            "post",
            f"/sdapi/v1/{what}-checkpoint",
            summary,
            "a1111",
            {200: "object"},
            description="Applied to every backend between its jobs; answers `{}` (as A1111) once "
            "all have applied it, or after A1111_PROXY_CHECKPOINT_WAIT_SECONDS with `X-Proxy-Note` "
            "naming those still running a job. Backends load a model again when a job needs it.",
        )
        for what, summary in (
            ("unload", "Unload the backends' checkpoint (frees GPU memory)"),
            ("reload", "Reload the backends' checkpoint"),
        )
    ),
    Op(
        "post",
        "/sdapi/v1/png-info",
        "Read a PNG's generation parameters",
        "a1111",
        {200: s.PngInfoResponse, 413: s.A1111Error, 422: "any"},
        body=s.PngInfoRequest,
    ),
    *(
        Op(
            "post",
            f"/sdapi/v1/{kind}",
            f"A1111's {kind}, run as a job on a backend slot",
            "a1111",
            WAITED,
            body="object",
            params=[PREFER],
        )
        for kind in ("interrogate", "extra-single-image", "extra-batch-images")
    ),
    Op(
        "post",
        "/controlnet/detect",
        "ControlNet's detect, run as a job on a backend slot",
        "controlnet",
        WAITED,
        body="object",
        params=[PREFER],
    ),
    *(
        Op(
            "get",
            f"/controlnet/{name}",
            f"ControlNet's {name} (from the catalogue)",
            "controlnet",
            {200: "object", 404: s.A1111Error},
        )
        for name in ("version", "model_list", "module_list")
    ),
    Op(
        "get",
        "/health",
        "Liveness, with details",
        "operations",
        {200: s.Health, 503: s.Health},
        open=True,
    ),
    Op(
        "get",
        "/ready",
        "Readiness: the database is reachable and migrated",
        "operations",
        {200: s.Ready, 503: s.Ready},
        open=True,
    ),
    Op(
        "get",
        "/metrics",
        "Prometheus metrics (text exposition format 0.0.4; admins)",
        "operations",
        {200: "text", 403: s.A1111Error},
        description="Jobs by status, queue depth and the oldest due job's age, claim latency "
        "and job duration (gauge histograms over the last METRICS_WINDOW_SECONDS), each "
        "backend's state (idle, busy, down), live workers, and webhook messages by event and "
        "outcome. Computed from the database, so every API replica reports the same numbers. "
        "Needs the token when API_TOKENS is set.",
    ),
]

MODELS: list[type[BaseModel]] = [
    s.Txt2ImgRequest,
    s.Img2ImgRequest,
    s.ProxyFields,
    s.Job,
    s.JobList,
    s.A1111Result,
    s.ValidationFailed,
    s.A1111Error,
    s.ProgressResponse,
    s.PngInfoRequest,
    s.PngInfoResponse,
    s.Health,
    s.Ready,
    s.DeliveryList,
    s.Delivery,
    s.QueueView,
    s.DownloadRequest,
    s.Download,
    s.DownloadList,
]


def build_spec() -> dict[str, Any]:
    spec = APISpec(
        title="a1111-proxy",
        version=__version__,
        openapi_version="3.1.0",
        info={
            "description": "An asynchronous, durable front door for Stable Diffusion that "
            "speaks the AUTOMATIC1111 API. Fields marked 'a1111-proxy extension' are ours; "
            "everything else is A1111's."
        },
    )
    _register_models(spec)
    spec.components.security_scheme("bearer", {"type": "http", "scheme": "bearer"})
    spec.components.security_scheme(
        "basic",
        {
            "type": "http",
            "scheme": "basic",
            "description": "any user name, the token as the password (A1111's --api-auth clients)",
        },
    )
    for op in OPERATIONS:
        spec.path(path=op.path, operations={op.method: _operation(op)})
    return spec.to_dict()


def _register_models(spec: APISpec) -> None:
    for model in MODELS:
        schema = model.model_json_schema(
            ref_template="#/components/schemas/{model}",
            mode="serialization" if model in _OUTPUTS else "validation",
        )
        for name, sub in schema.pop("$defs", {}).items():
            if name not in spec.components.schemas:
                spec.components.schema(name, sub)
        if model.__name__ not in spec.components.schemas:
            spec.components.schema(model.__name__, schema)
    for kind in ("Txt2Img", "Img2Img"):
        spec.components.schema(
            f"{kind}Submit",
            {
                "allOf": [
                    {"$ref": f"#/components/schemas/{kind}Request"},
                    {"$ref": "#/components/schemas/ProxyFields"},
                ]
            },
        )


_OUTPUTS = {
    s.Job,
    s.JobList,
    s.A1111Result,
    s.ValidationFailed,
    s.A1111Error,
    s.ProgressResponse,
    s.PngInfoResponse,
    s.Health,
    s.Ready,
    s.DeliveryList,
    s.Delivery,
    s.QueueView,
    s.Download,
    s.DownloadList,
}


def _operation_id(op: Op) -> str:
    path = op.path.strip("/").replace("/", "_").replace("-", "_")
    return f"{op.method}_{path}".replace("{", "").replace("}", "")


def _operation(op: Op) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": op.summary,
        "tags": [op.tag],
        "operationId": _operation_id(op),
        "responses": {str(code): _response(code, kind) for code, kind in op.responses.items()},
    }
    if op.description:
        operation["description"] = op.description
    if op.params:
        operation["parameters"] = op.params
    if op.body is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {JSON: {"schema": _schema(op.body)}},
        }
    if op.open:
        operation["security"] = []
    else:
        operation["security"] = [{"bearer": []}, {"basic": []}, {}]
        operation["responses"].setdefault("401", _response(401, s.A1111Error))
    return operation


def _response(code: int | str, kind: type[BaseModel] | str | None) -> dict[str, Any]:
    description = {
        200: "OK",
        202: "Accepted: the job",
        204: "Nothing more to send",
        401: "No or wrong token",
        403: "Needs an admin token (ADMIN_TOKENS)",
        429: "A tenant limit: retry after Retry-After seconds",
        404: "Not found",
        413: "Body too large",
        422: "Invalid request",
        503: "Unavailable",
        "default": "A1111's own error status and body (wait mode), or an error in A1111's shape",
    }.get(code, "")
    if kind == "empty":
        return {"description": description}
    if kind == "event-stream":
        return {
            "description": "The event stream",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        }
    if kind == "text":
        return {
            "description": description or "OK",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        }
    if kind == "image":
        return {
            "description": description,
            "content": {
                m: {"schema": {"type": "string", "contentMediaType": m}}
                for m in ("image/png", "image/jpeg", "image/webp")
            },
        }
    return {"description": description or "OK", "content": {JSON: {"schema": _schema(kind)}}}


def _schema(kind: type[BaseModel] | str | None) -> dict[str, Any]:
    if isinstance(kind, type):
        return {"$ref": f"#/components/schemas/{kind.__name__}"}
    if kind in ("object", "array", "null"):
        return {"type": kind}
    if kind in ("any", None):
        return ANY_JSON
    return {"$ref": f"#/components/schemas/{kind}"}
