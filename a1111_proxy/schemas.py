"""The API contract: A1111 request bodies (parsed as leniently as A1111 does), our proxy fields,
and the job as clients see it."""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import httpx
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from a1111_proxy.jobs.records import JobRecord
from a1111_proxy.redaction import scrub_all
from a1111_proxy.signatures import signing_key


def _truncate_float(value: Any) -> Any:
    # A1111 runs pydantic v1, which turns 512.5 into 512; pydantic v2 would refuse it.
    if isinstance(value, float) and value.is_integer() is False and abs(value) < 2**63:
        return int(value)
    return value


LooseInt = Annotated[int, BeforeValidator(_truncate_float)]
log = logging.getLogger("a1111_proxy.jobs")


def _cap(setting: str, default: int) -> str:
    return f"at most A1111_PROXY_{setting} ({default} unless the operator changed it)"


class _Lenient(BaseModel):
    # Unknown keys are kept and passed on to A1111; numbers become strings where A1111 wants
    # strings ("prompt": 123), as pydantic v1 did.
    model_config = ConfigDict(extra="allow", coerce_numbers_to_str=True, populate_by_name=True)


class NoiseMask(BaseModel):
    """a1111-proxy extension (bundled engine only; A1111 has no such field): during the steps
    in [start, end) (fractions of the run's steps), fresh seeded noise is put back into the
    mask's white region after each step, so that region is re-imagined while the rest
    converges. docs/engine.md gives the formula."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mask: str = Field(
        min_length=1,
        description="base64 image (or data: URI); white re-imagines, black keeps, grey between; "
        "stretched to the image size",
    )
    strength: float = Field(
        1.0, ge=0, le=1, allow_inf_nan=False, description="0: no effect; 1: all noise fresh"
    )
    start: float = Field(
        0.0, ge=0, le=1, allow_inf_nan=False, description="first step, as a fraction of the steps"
    )
    end: float = Field(
        0.5, ge=0, le=1, allow_inf_nan=False, description="end of the range (not included)"
    )

    @model_validator(mode="after")
    def _ordered(self) -> NoiseMask:
        if self.start > self.end:
            raise ValueError(f"start ({self.start}) must not be after end ({self.end})")
        return self


class Txt2ImgRequest(_Lenient):
    """The body of A1111's `POST /sdapi/v1/txt2img` (A1111 v1.10.1 field set and defaults)."""

    prompt: str | None = ""
    negative_prompt: str | None = ""
    styles: list[str] | None = None
    seed: LooseInt | None = -1
    subseed: LooseInt | None = -1
    subseed_strength: float | None = 0
    seed_resize_from_h: LooseInt | None = -1
    seed_resize_from_w: LooseInt | None = -1
    sampler_name: str | None = None
    scheduler: str | None = None
    # The upper bounds are the operator's (`Caps` below), not A1111's: A1111 has none.
    batch_size: Annotated[LooseInt, Field(ge=1)] | None = Field(
        1, description=_cap("MAX_BATCH_SIZE", 64)
    )
    n_iter: Annotated[LooseInt, Field(ge=1)] | None = Field(1, description=_cap("MAX_N_ITER", 100))
    steps: Annotated[LooseInt, Field(ge=1)] | None = Field(50, description=_cap("MAX_STEPS", 500))
    cfg_scale: float | None = 7.0
    width: Annotated[LooseInt, Field(ge=8)] | None = Field(
        512, description=_cap("MAX_WIDTH_HEIGHT", 16384)
    )
    height: Annotated[LooseInt, Field(ge=8)] | None = Field(
        512, description=_cap("MAX_WIDTH_HEIGHT", 16384)
    )
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool | None = False
    do_not_save_grid: bool | None = False
    eta: float | None = None
    # A1111 reads anything above 1 as 0.999; below 0 its img2img schedule breaks.
    denoising_strength: Annotated[float, Field(ge=0)] | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool | None = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool | None = False
    firstpass_image: str | None = None
    comments: dict[str, Any] | None = None
    enable_hr: bool | None = False
    firstphase_width: LooseInt | None = 0
    firstphase_height: LooseInt | None = 0
    hr_scale: float | None = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: LooseInt | None = 0
    hr_resize_x: LooseInt | None = 0
    hr_resize_y: LooseInt | None = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str | None = ""
    hr_negative_prompt: str | None = ""
    force_task_id: str | None = None
    sampler_index: str = "Euler"
    script_name: str | None = None
    # Factories with the default shown in the spec: pydantic deep-copies a mutable default on
    # every validation, a cost on every submit.
    script_args: list[Any] = Field(default_factory=list, json_schema_extra={"default": []})
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(
        default_factory=dict, json_schema_extra={"default": {}}
    )
    infotext: str | None = None
    noise_mask: NoiseMask | None = Field(
        None,
        description="a1111-proxy extension, bundled engine only (refused with 422 when the "
        "backend is A1111): re-inject seeded noise in a masked region during a step range",
    )


class Img2ImgRequest(Txt2ImgRequest):
    """The body of A1111's `POST /sdapi/v1/img2img` (A1111 v1.10.1 field set and defaults)."""

    denoising_strength: Annotated[float, Field(ge=0)] = 0.75
    init_images: list[str] = Field(
        min_length=1, description="input images: raw base64 or data: URIs (required)"
    )
    resize_mode: LooseInt | None = 0
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur_x: LooseInt | None = 4
    mask_blur_y: LooseInt | None = 4
    mask_blur: LooseInt | None = None
    mask_round: bool | None = True
    inpainting_fill: LooseInt | None = 0
    inpaint_full_res: bool | None = True
    inpaint_full_res_padding: LooseInt | None = 0
    inpainting_mask_invert: LooseInt | None = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = False


REQUEST_MODELS: dict[str, type[Txt2ImgRequest]] = {
    "txt2img": Txt2ImgRequest,
    "img2img": Img2ImgRequest,
}


@dataclass(frozen=True)
class Caps:
    """The operator's limits on one txt2img/img2img job (settings `MAX_*`). A1111 has none; the
    defaults stop runaway jobs, not anything a client could reasonably mean."""

    steps: int = 500
    n_iter: int = 100
    batch_size: int = 64
    width_height: int = 16384

    def problems(self, request: Txt2ImgRequest) -> list[dict[str, Any]]:
        limits = {
            "steps": (self.steps, "MAX_STEPS"),
            "n_iter": (self.n_iter, "MAX_N_ITER"),
            "batch_size": (self.batch_size, "MAX_BATCH_SIZE"),
            "width": (self.width_height, "MAX_WIDTH_HEIGHT"),
            "height": (self.width_height, "MAX_WIDTH_HEIGHT"),
        }
        return [
            {
                "loc": ["body", name],
                "type": "less_than_equal",
                "msg": f"must be at most {limit} on this server (its operator can raise "
                f"A1111_PROXY_{setting})",
            }
            for name, (limit, setting) in limits.items()
            if (value := getattr(request, name)) is not None and value > limit
        ]


WebhookEvent = Literal["started", "progress", "completed"]


def _sendable_host(url: str, host: str) -> None:
    """What the webhook sender can send to: httpx parses the URL (it refuses IPv4 addresses with
    leading zeros or parts past 255) and a host name is valid IDNA (no empty label, none over 63
    characters)."""
    try:
        httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise ValueError(f"is not a URL the webhook sender can use: {exc}") from None
    if ":" in host or host.replace(".", "").isdigit():
        return  # an IP address, checked by httpx above
    try:
        host.encode("idna")
    except UnicodeError:
        raise ValueError(
            f"{host!r} is not a valid host name (an empty label, or one longer than 63 characters)"
        ) from None


def _completed_only() -> list[WebhookEvent]:
    return ["completed"]


class ProxyFields(BaseModel):
    """Fields a1111-proxy adds to A1111's body; they are never sent on to A1111."""

    model_config = ConfigDict(extra="ignore")

    webhook_url: str | None = Field(
        None,
        max_length=2048,
        description="a1111-proxy extension: http(s) URL called when the job starts/progresses/ends",
    )
    webhook_secret: str | None = Field(
        None,
        min_length=1,
        max_length=1024,
        description="a1111-proxy extension: key that signs this job's webhooks (never shown back)",
    )
    webhook_events: list[WebhookEvent] = Field(
        default_factory=_completed_only,
        json_schema_extra={"default": ["completed"]},
        description="a1111-proxy extension: which webhook events to send",
    )
    priority: LooseInt = Field(
        0, ge=-100, le=100, description="a1111-proxy extension: higher runs first, then older first"
    )
    timeout: float | None = Field(
        None,
        gt=0,
        le=30 * 86400,
        allow_inf_nan=False,
        description="a1111-proxy extension: seconds from submission; a job not finished by then "
        "ends canceled (error code deadline), running or not. Same as the Cancel-After header",
    )

    @field_validator("webhook_url")
    @classmethod
    def _http_url(cls, url: str | None) -> str | None:
        if url is None:
            return None
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        if parts.username is not None or parts.password is not None:
            raise ValueError("must not carry a user name or password; use webhook_secret to sign")
        if not url.isprintable() or " " in url:
            raise ValueError("must not contain spaces or control characters")
        parts.port  # noqa: B018 - raises ValueError for a port that is not 0..65535
        _sendable_host(url, parts.hostname)
        return url

    @field_validator("webhook_secret")
    @classmethod
    def _usable_secret(cls, secret: str | None) -> str | None:
        if secret is not None:
            signing_key(secret)  # raises ValueError for a whsec_ secret that is not base64
        return secret


PROXY_FIELDS = frozenset(ProxyFields.model_fields)

_BASE64ISH = re.compile(r"^[A-Za-z0-9+/=\s_-]+$")


def omit_images(value: Any) -> Any:
    """The body with inline images replaced by a short note, for storing and listing."""
    if isinstance(value, dict):
        return {key: omit_images(item) for key, item in value.items()}
    if isinstance(value, list):
        return [omit_images(item) for item in value]
    if isinstance(value, str) and len(value) > 1024:
        if value.startswith("data:") or _BASE64ISH.match(value[:4096]):
            return f"<image: {len(value)} characters omitted>"
    return value


# Credentials some clients put in the body: SillyTavern's "auto" source sends `auth` (the
# "user:password" it also sends as Basic auth), others `api_key`, `password` or `token`. They
# are passed on to A1111 as sent, and never shown (job views, lists, webhooks).
CREDENTIAL_KEYS = frozenset({"auth", "api_key", "password", "token"})


def without_credentials(value: Any, leaf: Callable[[Any], Any] = lambda item: item) -> Any:
    """`value` with every credential key (at any depth, in any letter case) left out; `leaf`
    applied to every other value that is neither an object nor a list."""
    if isinstance(value, dict):
        return {
            key: without_credentials(item, leaf)
            for key, item in value.items()
            if not (isinstance(key, str) and key.lower() in CREDENTIAL_KEYS)
        }
    if isinstance(value, list):
        return [without_credentials(item, leaf) for item in value]
    return leaf(value)


# Where the stored request keeps the opt-in resizes (IMAGE_MAX_SIDE) of its input images; the
# job view shows them as `input_images_resized`, never inside `request`.
RESIZED_KEY = "__a1111_proxy_input_images_resized__"


def stored_request(body: dict[str, Any], resized: list[dict[str, Any]]) -> dict[str, Any]:
    """The body as stored for users to see: credentials and images left out (one walk of
    `without_credentials` and `omit_images`), and the resizes, if any, noted."""
    stored: dict[str, Any] = without_credentials(body, omit_images)
    if resized:
        stored[RESIZED_KEY] = resized
    return stored


def encode_images(images: list[bytes]) -> list[str]:
    return [base64.b64encode(data).decode("ascii") for data in images]


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def render_job(
    row: JobRecord, images: list[bytes] | None = None, *, with_result: bool = True
) -> dict[str, Any]:
    """A job as the API shows it. `images` fills the result's image list (detail view only).

    Never raises for what is stored: a row with a damaged column, or holding a value JSON cannot
    carry (NaN from a backend, a lone surrogate), is shown with what did render and
    `render_error` saying what did not (logged once per job)."""
    problem = row.damage
    if problem is None:
        view = _job_view(row, images, with_result=with_result)
        problem = unencodable([view["request"], row.result if with_result else None, view["error"]])
        if problem is None:
            return view
    return _unrenderable_view(row, problem)


def _job_view(row: JobRecord, images: list[bytes] | None, *, with_result: bool) -> dict[str, Any]:
    result = None
    if with_result and row.result is not None:
        result = dict(row.result)  # a copy: the record is shared
        if "parameters" in result:  # some servers echo the body (and the backend's URL)
            result["parameters"] = scrub_all(without_credentials(result["parameters"]))
        if images is not None and "images" in result:
            result["images"] = encode_images(images)
    webhook = None
    if row.webhook_url:
        webhook = {"url": row.webhook_url, "events": list(row.webhook_events or [])}
    base = f"/sdapi/v1/jobs/{row.id}"
    request = dict(row.request)
    resized = request.pop(RESIZED_KEY, [])
    return {
        "id": row.id,
        "type": row.type,
        "status": row.status,
        "progress": row.progress,
        "eta_relative": row.eta_relative,
        "priority": row.priority,
        "attempts": row.attempts,
        "max_attempts": row.max_attempts,
        "backend": row.backend,
        "created_at": iso(row.created_at),
        "started_at": iso(row.started_at),
        "completed_at": iso(row.completed_at),
        # A backend's message or body may echo its URL, credentials and all.
        "error": scrub_all(without_credentials(row.error)) if row.error else None,
        "request": request,
        "owner": row.owner,
        "result": result,
        "image_urls": [f"{base}/images/{n}" for n in range(row.image_count)],
        "webhook": webhook,
        "links": {"self": base, "cancel": f"{base}/cancel", "events": f"{base}/events"},
        "deadline_at": iso(row.deadline_at),
        "queue_position": None,  # filled in by the detail view while queued
        "input_images_resized": resized,
    }


def job_json(row: JobRecord) -> bytes:
    """`render_job(row)` as a response body, encoded once, as Starlette's JSONResponse
    encodes (the submit path's answer: one encoding of the request instead of two)."""
    if row.damage is None:
        try:
            return json_bytes(_job_view(row, None, with_result=True))
        except (ValueError, TypeError, RecursionError):
            pass  # render_job says what, and shows what it can
    return json_bytes(render_job(row))


def json_bytes(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def unencodable(value: Any) -> str | None:
    """Why `value` cannot be sent as JSON (as Starlette's JSONResponse encodes it), or None."""
    try:
        json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (ValueError, TypeError, RecursionError) as exc:  # UnicodeEncodeError is a ValueError
        return f"it holds a value JSON cannot carry ({type(exc).__name__}: {exc})"
    return None


# Jobs whose unrenderable rows were logged (each once per process; forgotten past the bound).
_LOGGED_UNRENDERABLE: set[str] = set()


def _unrenderable_view(row: JobRecord, problem: str) -> dict[str, Any]:
    """The job without its stored JSON (request, result, error), and why."""
    if row.id not in _LOGGED_UNRENDERABLE:
        if len(_LOGGED_UNRENDERABLE) >= 10_000:
            _LOGGED_UNRENDERABLE.clear()
        _LOGGED_UNRENDERABLE.add(row.id)
        log.error("job %s cannot be shown as stored: %s", row.id, problem, extra={"job_id": row.id})
    bare = dataclasses.replace(row, request={}, result=None, error=None, webhook_events=None)
    return _job_view(bare, None, with_result=False) | {
        "render_error": f"this job's stored data cannot be shown: {problem}; the fields "
        "shown are those that could be (request, result and error are left out)"
    }


# --- responses (documented in the OpenAPI document) --------------------------------------


class JobError(BaseModel):
    code: str = Field(
        description="stable: backend_rejected, backend_unavailable, "
        "backend_bad_response, worker_lost, canceled, client_gone, deadline, "
        "internal_error"
    )
    message: str
    backend: str | None = None
    backend_status: int | None = Field(None, description="A1111's HTTP status, when it answered")
    backend_body: Any = Field(None, description="A1111's answer, when it answered")


class ResizedImage(BaseModel):
    loc: list[str | int] = Field(description="where the image is in the request body")
    from_: list[int] = Field(alias="from", description="[width, height] as the client sent it")
    to: list[int] = Field(description="[width, height] as A1111 received it")


class JobWebhook(BaseModel):
    url: str
    events: list[WebhookEvent]


class JobLinks(BaseModel):
    self: str
    cancel: str
    events: str = Field(description="its Server-Sent Events stream")


class A1111Result(BaseModel):
    """A1111's own txt2img/img2img response."""

    model_config = ConfigDict(extra="allow")

    images: list[str] | None = Field(None, description="raw base64 PNGs (no data: prefix)")
    parameters: dict[str, Any] = {}
    info: str = Field("", description="a JSON *string*, as A1111 sends it")


class Job(BaseModel):
    """A job: the A1111 request, where it is, and A1111's answer once completed."""

    id: str = Field(description="UUID")
    type: str = Field(
        description="txt2img, img2img, interrogate, extra-single-image, "
        "extra-batch-images or controlnet-detect"
    )
    status: Literal["queued", "processing", "completed", "error", "canceled"]
    progress: float = Field(ge=0, le=1)
    eta_relative: float | None = Field(description="seconds left, from A1111")
    priority: int
    attempts: int
    max_attempts: int
    backend: str | None = Field(description="the A1111 URL that ran (or runs) it")
    created_at: str
    started_at: str | None
    completed_at: str | None
    error: JobError | None = Field(
        description="why it failed; while queued after a failed attempt, the last attempt's error"
    )
    request: dict[str, Any] = Field(
        description="the body as stored: input images replaced by a short note, secrets removed"
    )
    owner: str | None = Field(
        None,
        description="who submitted it: the API token's tenant name, or the client "
        "address when tokens are off",
    )
    result: Any = Field(
        description="A1111's answer exactly (detail view, once completed); null in lists"
    )
    image_urls: list[str]
    webhook: JobWebhook | None
    links: JobLinks
    deadline_at: str | None = Field(
        None, description='a1111-proxy extension: when it is canceled ("deadline") unless done'
    )
    queue_position: int | None = Field(
        None, ge=1, description="1 = claimed next; detail view while queued, else null"
    )
    input_images_resized: list[ResizedImage] = Field(
        [],
        description="a1111-proxy extension: input images this server resized before A1111 "
        "got them (only when its operator set A1111_PROXY_IMAGE_MAX_SIDE); empty: none changed",
    )
    render_error: str | None = Field(
        None,
        description="a1111-proxy extension, only when the stored job cannot be shown whole "
        "(damaged data): why; `request`, `result` and `error` are then left out",
    )


class JobList(BaseModel):
    jobs: list[Job]
    next_cursor: str | None = Field(description="pass as `cursor` for the next (older) page")


class QueuedJob(BaseModel):
    position: int = Field(
        ge=1, description="1 = claimed next (priority, then owners take turns, then age)"
    )
    id: str
    type: str
    priority: int
    attempts: int
    created_at: str
    retry_at: str | None = Field(description="waiting out a retry backoff until then")
    deadline_at: str | None
    estimated_start_seconds: float | None = Field(description="null until a job has completed")


class RunningJob(BaseModel):
    backend: str | None = Field(description="the slot (A1111 URL) it runs on")
    id: str
    type: str
    priority: int
    attempts: int
    progress: float
    eta_relative: float | None
    started_at: str | None
    deadline_at: str | None


class QueueView(BaseModel):
    """The queue: waiting jobs in claim order, running jobs by slot, counts and estimates."""

    queued: list[QueuedJob] = Field(description="the first `limit` waiting jobs")
    queued_total: int
    running: list[RunningJob]
    counts: dict[str, int] = Field(description="jobs by status")
    slots: int = Field(description="usable backend slots of live workers (at least 1)")
    estimated_wait_seconds: float | None = Field(
        description="until a job submitted now, behind every queued one, starts"
    )
    mean_run_seconds: float | None = Field(description="of the last 20 jobs completed in 24 h")
    sample_size: int


class ValidationIssue(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ValidationFailed(BaseModel):
    """422: what is wrong with the request, field by field (FastAPI's and so A1111's shape)."""

    detail: list[ValidationIssue]


class A1111Error(BaseModel):
    """Every other error, in A1111's shape plus a stable `code`."""

    model_config = ConfigDict(extra="allow")

    error: str
    detail: Any
    body: Any = ""
    errors: Any = ""
    code: str | None = None


class RouteError(BaseModel):
    """404/405 for paths outside the API, as FastAPI answers them."""

    detail: str


class ProgressState(BaseModel):
    model_config = ConfigDict(extra="allow")

    skipped: bool
    interrupted: bool
    stopping_generation: bool
    job: str
    job_count: int
    job_timestamp: str
    job_no: int
    sampling_step: int
    sampling_steps: int


class ProgressResponse(BaseModel):
    """A1111's /progress, over the proxy's jobs."""

    progress: float
    eta_relative: float
    state: ProgressState
    current_image: str | None
    textinfo: str | None


class PngInfoRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    image: str = Field(description="raw base64 or a data: URI")


class PngInfoResponse(BaseModel):
    info: str
    items: dict[str, Any]
    parameters: dict[str, Any]


class Health(BaseModel):
    model_config = ConfigDict(extra="allow")

    status: Literal["ok", "unhealthy"]
    database: str
    workers: list[dict[str, Any]]
    backends: list[dict[str, Any]]
    queue: dict[str, int] | None
    problems: list[str]
    device: dict[str, Any] | None = Field(
        None,
        description="admins, bundled engine: what it runs on (type, name, memory total/used/"
        "free in bytes, utilization_percent and temperature_c where NVML answers, torch, dtype, "
        "vae_dtype, loaded_models with their dtypes, note on the CPU) as its worker last stored "
        "it, and age_seconds; null with A1111 backends",
    )


class Ready(BaseModel):
    model_config = ConfigDict(extra="allow")

    ready: bool
    reason: str | None = None
    schema_: str | None = Field(None, alias="schema")


class DeliveryAttempt(BaseModel):
    number: int
    trigger: str
    started_at: str | None
    duration_ms: int | None
    status_code: int | None
    response_body: str | None = Field(description="the first bytes of the receiver's answer")
    error: str | None
    address: str | None = Field(description="the IP address that was connected to")


class Delivery(BaseModel):
    id: str = Field(description="the webhook-id header, stable across attempts")
    type: str
    url: str
    status: str
    trigger: str
    attempt_count: int
    created_at: str | None
    next_attempt_at: str | None
    delivered_at: str | None
    last_status_code: int | None
    last_error: str | None
    attempts: list[DeliveryAttempt]


class DeliveryList(BaseModel):
    job_id: str
    deliveries: list[Delivery]


# --- model downloads ------------------------------------------------------------------------

DownloadKind = Literal["checkpoint", "lora", "controlnet", "vae", "embedding"]


class DownloadRequest(BaseModel):
    """POST /sdapi/v1/models/downloads."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(
        min_length=1,
        max_length=2048,
        description="a Civitai model-version id (`128713`), a civitai.com model URL (its "
        "newest version) or version URL (`?modelVersionId=`, `/api/download/models/<id>`), an "
        "AIR (`urn:air:sd1:lora:civitai:<model>@<version>`), a file's sha256 (Civitai finds "
        "its version), or a direct https URL",
    )
    kind: DownloadKind | None = Field(
        None,
        description="the folder it goes to (Stable-diffusion, Lora, ControlNet, VAE, "
        "embeddings); absent: from Civitai's model type (needed for a direct URL)",
    )
    file: str | None = Field(
        None,
        min_length=1,
        max_length=500,
        description="one of the version's files, by name or id (absent: its primary file); "
        "for a direct URL, the name to save it under (absent: the URL's last segment)",
    )
    sha256: str | None = Field(
        None,
        pattern="^[0-9a-fA-F]{64}$",
        description="for a direct URL, the SHA256 to check the file against (a Civitai "
        "file is checked against Civitai's)",
    )


class DownloadLinks(BaseModel):
    self: str
    cancel: str
    events: str = Field(description="its Server-Sent Events stream")


class Download(BaseModel):
    """A model download: where it comes from, where it goes, and how far it is."""

    id: str = Field(description="UUID")
    status: Literal["queued", "running", "completed", "failed", "canceled"]
    source: str = Field(description="as given")
    kind: DownloadKind | None = Field(description="null until the worker asked Civitai")
    file: str | None = Field(description="the file asked for, as given")
    path: str | None = Field(
        description="where the file goes inside MODELS_DIR (`Lora/name.safetensors`), once known"
    )
    sha256: str | None = Field(
        description="what the file is checked against; once completed, its own"
    )
    bytes_done: int
    bytes_total: int | None = Field(description="Civitai's size until the server announces it")
    progress: float | None = Field(None, ge=0, le=1)
    speed: float | None = Field(description="bytes per second, lately (while running)")
    eta: float | None = Field(description="seconds left at that speed (while running)")
    error: str | None = Field(
        description="why it failed; while queued after a failed try, that try's error"
    )
    attempts: int = Field(description="times a worker took it (a resume counts one more)")
    cancel_requested: bool
    requested_by: str | None = Field(description="the admin's tenant name")
    civitai: dict[str, Any] | None = Field(
        description="what Civitai says of the version (as `civitai` on /sd-models), once known"
    )
    created_at: str
    started_at: str | None
    completed_at: str | None
    links: DownloadLinks


class DownloadList(BaseModel):
    downloads: list[Download] = Field(description="newest first")
