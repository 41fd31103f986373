"""The one `Settings` object. Built by the CLI and passed down; nothing reads it at import."""

from __future__ import annotations

import hashlib
import ipaddress
import os
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from a1111_proxy.db.engine import POOL_SIZE
from a1111_proxy.redaction import backend_name

CommaList = Annotated[list[str], NoDecode]


def _split_commas(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


# SERVE_PROCESSES=0 on a many-core GPU host: past this, more API processes only hold more memory
# and database connections (the API is rarely the bottleneck there).
MAX_AUTO_PROCESSES = 8


class Settings(BaseSettings):
    """Every setting, read from `A1111_PROXY_*` environment variables and `.env`."""

    # hide_input_in_errors: `serve` prints a bad setting's error, and values carry secrets
    # (API_TOKENS, a DATABASE_URL's password); messages name the setting and the reason instead.
    model_config = SettingsConfigDict(
        env_prefix="A1111_PROXY_", env_file=".env", extra="ignore", hide_input_in_errors=True
    )

    database_url: str = Field(
        "sqlite+aiosqlite:///./data/a1111_proxy.db",
        description="the job database; `postgresql+asyncpg://user:pass@host/db` to scale out",
    )
    sqlite_synchronous: Literal["normal", "full"] = Field(
        "normal",
        description="SQLite's durability (WAL mode): `normal`, an acknowledged job survives any "
        "crash of our processes and reaches the disk at the next checkpoint, within about 5 s "
        "(a power cut may lose the last few seconds); `full`, each commit is fsynced before "
        "the answer (survives a power cut; each submit batch waits for the disk)",
    )
    database_pool_size: int = Field(
        POOL_SIZE,
        ge=1,
        le=100,
        description="PostgreSQL: the connections each process keeps open for its transactions "
        "(never more: one that finds them all busy waits for one); SQLite ignores it",
    )
    host: str = Field("127.0.0.1", description="where the API listens")
    port: int = Field(7861, ge=0, le=65535, description="the API's port")
    serve_processes: int = Field(
        0,
        ge=0,
        description="API processes sharing the port (`serve` supervises them and restarts one "
        "that dies); 0: one per CPU core, at most 8",
    )
    api_tokens: CommaList = Field(
        [],
        description="comma-separated; each `name:token` (a tenant) or a plain token (its own "
        "tenant); empty disables auth, allowed only on a loopback HOST (`serve` refuses to start "
        "otherwise and says so)",
    )
    admin_tokens: CommaList = Field(
        [],
        description="comma-separated, the same forms as API_TOKENS: tokens whose tenant is an "
        "admin, who sees every tenant's jobs and webhooks and alone changes the options all "
        "tenants share, refreshes catalogues and reads /metrics and the detailed /health",
    )
    tenant_max_queued: int = Field(
        0,
        ge=0,
        description="the most queued jobs one tenant may have; a submit beyond it answers 429 "
        "with Retry-After (0: no limit)",
    )
    tenant_submits_per_minute: int = Field(
        0,
        ge=0,
        description="the most jobs one tenant may submit in any 60 seconds, counted in the "
        "database across API processes; a submit beyond it answers 429 with Retry-After "
        "(0: no limit)",
    )
    backend: Literal["a1111", "diffusers", "fake"] = Field(
        "a1111",
        description="`a1111`: remote A1111 servers (A1111_URLS); `diffusers`: the "
        "bundled engine (docs/engine.md); `fake`: a scripted backend inside the worker that "
        "answers like A1111 with tiny images, for demos and benchmarks (no A1111, no GPU)",
    )
    a1111_urls: CommaList = Field(
        ["http://127.0.0.1:7860"],
        description="comma-separated; each URL is one backend slot that runs one job at a time. "
        "A URL may carry `user:password@` for an A1111 started with `--api-auth` (sent as Basic "
        "auth); the backend is shown everywhere (health, metrics, jobs, logs) without them",
    )
    a1111_auth: SecretStr = Field(
        SecretStr(""),
        description="`user:password`, one of the pairs of an A1111 started with `--api-auth`; "
        "without the right one that A1111 answers 401, and the worker keeps its jobs queued and "
        "shows the backend `down` in /health, saying to set this",
    )
    models_dir: str = Field(
        "./models",
        description="A1111 layout (`Stable-diffusion/`, `Lora/`, `ControlNet/`, `VAE/`, "
        "`embeddings/`): the worker hashes the checkpoints and LoRAs there for Civitai "
        "(nothing happens while it does not exist) and puts model downloads there; also where "
        "the bundled engine finds its models",
    )
    response_mode: Literal["auto", "async", "wait"] = Field(
        "auto",
        description="how generation routes answer a request that sends no `Prefer` "
        "header: `auto` as A1111 does (200 with A1111's body once done), but 202 + job when the "
        "body has a `webhook_url`; `async` 202 + job (extras, interrogate and ControlNet detect "
        "still wait); `wait` always holds (docs/api.md)",
    )
    backend_down_grace: float = Field(
        30.0,
        ge=0,
        description="seconds with no backend answering (or no worker running) before a waiting "
        "request gets 503 and its job is canceled; async jobs wait on",
    )
    cancel_on_disconnect: bool = Field(
        True,
        description="cancel a waiting request's job (error code `client_gone`) when its client "
        "goes away before the job started; a running job finishes and keeps its result",
    )
    webhook_secret: SecretStr = Field(
        SecretStr(""),
        description="signing key for jobs that give no `webhook_secret` "
        "(`whsec_<base64>`, or any string used as its UTF-8 bytes); empty: such jobs' webhooks "
        "go unsigned",
    )
    webhook_allow_private: bool = Field(
        False,
        description="allow webhook URLs (and IMAGE_URLS, and model downloads' hosts other "
        "than CIVITAI_URL) that resolve to loopback, "
        "private and other internal addresses (receivers on your own network)",
    )
    webhook_ca_bundle: str = Field(
        "",
        description="a PEM file of CA certificates to trust, besides the public CAs, for "
        "https webhook URLs (and IMAGE_URLS and model downloads): receivers whose "
        "certificates come from your own CA; empty: the public CAs only. The certificate is "
        "always checked for the URL's host name, also when private addresses are allowed",
    )
    webhook_images: Literal["base64", "url", "none"] = Field(
        "base64",
        description="images in `job.completed`: `base64` (in `data.result.images`), "
        "`url` (left out; `data.image_urls` made absolute with PUBLIC_URL), `none` (left out)",
    )
    webhook_retry_seconds: Annotated[list[Annotated[float, Field(ge=0)]], NoDecode] = Field(
        [5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0],
        description="`job.completed` is sent at once, then after a failed attempt again after "
        "each of these waits in turn (seconds, each ±20 %); when they are used up it is `failed` "
        "(about a day in all by default)",
    )
    webhook_lease_seconds: float = Field(
        120.0,
        gt=0,
        description="how long a worker holds a webhook delivery it took up to send; one whose "
        "worker died is sent again, by another, after this long. Keep it well above the 15 s one "
        "attempt may take",
    )
    public_url: str = Field(
        "",
        description="this API's address as webhook receivers reach it, for "
        "`WEBHOOK_IMAGES=url` (e.g. `https://sd.example.com`); empty: `http://<HOST>:<PORT>`",
    )
    civitai_enabled: bool = Field(
        True,
        description="Civitai metadata on `sd-models` and `loras`; `false` turns the "
        "lookups and the `civitai` key off",
    )
    civitai_url: str = Field(
        "https://civitai.com",
        description="the Civitai site to ask (trusted by model downloads' egress guard: it may "
        "be a mirror on your network)",
    )
    civitai_token: SecretStr = Field(
        SecretStr(""),
        description="a Civitai API key, sent as a bearer token to CIVITAI_URL only (optional: "
        "by-hash lookups are public; model downloads that need a login or early access need it)",
    )
    civitai_ttl_seconds: float = Field(
        604800.0,
        gt=0,
        description="how long a Civitai answer (a 404 too) is kept before the "
        "worker asks again (604800: 7 days)",
    )
    download_allow_pickle: bool = Field(
        False,
        description="let POST /sdapi/v1/models/downloads fetch pickle files (`.ckpt`, `.pt`, "
        "`.pth`, `.bin`), which can run code when A1111 loads them; `false` refuses them (the "
        "download fails saying so) and takes `.safetensors` and `.gguf` only",
    )
    download_reserve_bytes: int = Field(
        1 << 30,
        ge=0,
        description="free space a model download must leave on MODELS_DIR's disk: one that "
        "would leave less (by the size Civitai or the server reports) fails before it starts "
        "(1073741824: 1 GiB)",
    )
    retention_seconds: int = Field(
        604800,
        ge=0,
        description="the worker deletes finished jobs (completed, error, canceled) "
        "that ended longer ago than this, with their images, payloads, previews and webhook "
        "log; 0: keep forever (604800: 7 days)",
    )
    retention_check_seconds: float = Field(
        60.0, gt=0, description="how often the worker looks for jobs to delete"
    )
    deadline_check_seconds: float = Field(
        1.0,
        gt=0,
        description="how often the worker ends jobs past their `Cancel-After` or "
        "`timeout` deadline",
    )
    cors_origins: CommaList = Field(
        [],
        description="comma-separated origins allowed to call the API from a browser (`*`: "
        "any); empty: no CORS headers",
    )
    sse_ping_seconds: float = Field(
        15.0, gt=0, description="a `: ping` comment on idle event streams this often"
    )

    # Input images (img2img, masks, ControlNet units, extras).
    image_max_pixels: int = Field(
        16384 * 16384,
        ge=1,
        description="input images with more pixels are refused, read from the image header "
        "before anything is decoded (decompression bombs)",
    )
    request_max_pixels: int = Field(
        4 * 4096 * 4096,
        ge=1,
        description="the most pixels all the input images of one request may have together, "
        "read from their headers (67108864: four 4096x4096 images, or an init image, a mask "
        "and ControlNet units well past SDXL sizes); a request over it is refused (422 naming "
        "the image that takes it over) before any of them is decoded. It bounds what one "
        "request costs the API (decoding, resizing) and A1111",
    )
    image_max_side: int = Field(
        0,
        ge=0,
        description="opt-in: resize input images whose longer side exceeds this (LANCZOS, "
        "aspect ratio kept; the job shows it in `input_images_resized`); 0: never, images reach "
        "A1111 as sent",
    )
    thumbnail_cache_bytes: int = Field(
        32 * 1024 * 1024,
        ge=0,
        description="how many bytes of thumbnails (`GET .../images/{n}?size=`, what the web UI "
        "lists) each API process keeps in memory, least recently used dropped first "
        "(33554432: 32 MiB); 0: none kept, each is made again",
    )
    image_urls: bool = Field(
        False,
        description="accept http(s) URLs as input images: the API fetches them through "
        "the webhooks' SSRF guard (WEBHOOK_ALLOW_PRIVATE opens internal hosts) and checks them "
        "like any image",
    )

    # Caps on what one txt2img/img2img job asks for (A1111 has none; these stop runaway jobs).
    max_steps: int = Field(500, ge=1, description="the most `steps` a job may ask for")
    max_n_iter: int = Field(100, ge=1, description="the most `n_iter` a job may ask for")
    max_batch_size: int = Field(64, ge=1, description="the largest `batch_size` a job may ask for")
    max_width_height: int = Field(16384, ge=8, description="the largest width or height")

    # Job execution and durability.
    max_body_bytes: int = Field(
        50 * 1024 * 1024, ge=1024, description="larger request bodies get 413 (52428800: 50 MiB)"
    )
    max_attempts: int = Field(
        3,
        ge=1,
        le=20,
        description="runs of a job before it ends `error` (worker lost, backend unavailable)",
    )
    lease_seconds: float = Field(
        30.0, gt=0, description="a running job's lease; a worker silent this long loses the job"
    )
    heartbeat_seconds: float = Field(
        10.0, gt=0, description="how often a running job's lease is renewed, at the least"
    )
    reap_seconds: float = Field(5.0, gt=0, description="how often workers look for expired leases")
    poll_seconds: float = Field(
        0.005,
        gt=0,
        description="how often an idle worker checks whether the database changed "
        "(a cheap in-memory check on SQLite)",
    )
    progress_seconds: float = Field(
        0.5,
        gt=0,
        description="how often a running job's progress is read from its backend "
        "(and stored when it changed) while someone looks at the job or asked for its progress "
        "webhooks; otherwise every 5 s "
        "([api.md](api.md#progress-and-live-previews-only-while-someone-looks))",
    )
    shutdown_grace_seconds: float = Field(
        30.0,
        ge=0,
        description="on SIGTERM, how long running jobs may finish before they are "
        "given back to the queue",
    )
    interrupt_grace_seconds: float = Field(
        30.0,
        ge=0,
        description="after a cancel, how long A1111 may take to stop before the job "
        "ends `canceled` anyway, with nothing kept; its slot then takes the next job, which "
        "that A1111 starts once the generation it did not stop has ended",
    )
    stall_seconds: float = Field(
        600.0,
        gt=0,
        description="a job whose A1111 shows no generation running this long "
        "(hung, restarted) goes back to the queue",
    )
    connect_retries: int = Field(
        3,
        ge=1,
        le=10,
        description="tries of a generation call that could not reach A1111, "
        "before the job is re-queued",
    )
    worker_stale_seconds: float = Field(
        30.0, gt=0, description="`/health` counts a worker alive if its heartbeat is this recent"
    )
    catalogue_seconds: float = Field(
        300.0,
        gt=0,
        description="how often the worker refetches models, samplers, options... from a backend",
    )
    wait_seconds_max: float = Field(
        3600.0,
        gt=0,
        description="the longest a request is held (wait mode, `Prefer: wait`) "
        "before it gets 202 and the job",
    )
    checkpoint_wait_seconds: float = Field(
        10.0,
        ge=0,
        description="how long unload-/reload-checkpoint wait for the backends to apply it before "
        "answering anyway",
    )
    log_level: str = Field("info", description="`debug`, `info`, `warning` or `error`")
    log_format: Literal["auto", "json", "text"] = Field(
        "auto",
        description="`json`: one JSON object a line, with `job_id`; `text`; `auto`: "
        "JSON unless stderr is a terminal",
    )
    metrics_window_seconds: float = Field(
        900.0, ge=10, description="the recent window the `/metrics` histograms describe"
    )

    # The bundled diffusers engine (BACKEND=diffusers).
    engine_device: str = Field(
        "auto",
        description="bundled engine: `auto` (CUDA when present, else CPU), `cpu`, "
        "`cuda` or `cuda:N`",
    )
    engine_dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto", description="bundled engine: `auto` is float16 on CUDA, float32 on CPU"
    )
    engine_cached_models: int = Field(
        1,
        ge=1,
        le=16,
        description="bundled engine: checkpoints kept loaded (the least recently used is dropped)",
    )
    engine_compile: bool = Field(
        False,
        description="bundled engine: `torch.compile` the UNet, once per (size, batch rows) bucket "
        "and reused by later jobs of it (slow first job per bucket)",
    )
    engine_compile_mode: Literal[
        "default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune"
    ] = Field(
        "default",
        description="bundled engine: `torch.compile`'s mode with ENGINE_COMPILE: `reduce-overhead` "
        "adds CUDA graphs (fewer kernel launches; more GPU memory per bucket), the `max-autotune` "
        "modes also tune kernels (minutes per bucket); see docs/engine.md",
    )
    engine_cpu_offload: Literal["auto", "true", "false"] = Field(
        "auto",
        description="bundled engine: offload idle parts to the CPU (CUDA only); `auto` "
        "decides once per model at load: when free GPU memory is below the weights plus half "
        "of them (at least 2 GiB) for working room; `true` always, `false` never",
    )
    engine_preview_steps: int = Field(
        5,
        ge=0,
        description="bundled engine: a cheap live preview every N steps while someone "
        "watches the job; 0: none",
    )
    engine_max_batch: int = Field(
        4,
        ge=1,
        le=64,
        description="bundled engine: up to this many compatible queued jobs (same checkpoint, "
        "size, sampler, steps, CFG, LoRA set, ...) are claimed together and run as one batch, "
        "each with its own prompt, seeds, progress and webhooks; 1: one job at a time",
    )
    engine_batch_wait_ms: int = Field(
        0,
        ge=0,
        le=10000,
        description="bundled engine: how long a batch that is not full waits for compatible "
        "jobs to join before it starts; 0: never (a lone job is never delayed)",
    )

    # The fake backend (BACKEND=fake).
    fake_seconds: float = Field(
        0.5,
        ge=0,
        description="fake backend: seconds each generation takes (a request's own "
        "`fake_seconds` field wins)",
    )
    fake_slots: int = Field(
        1, ge=1, le=64, description="fake backend: slots, each running one job at a time"
    )

    @field_validator("engine_cpu_offload", mode="before")
    @classmethod
    def _auto_or_bool(cls, value: object) -> object:
        words = {
            "1": "true",
            "yes": "true",
            "on": "true",
            "0": "false",
            "no": "false",
            "off": "false",
        }
        if isinstance(value, bool):
            return str(value).lower()
        if isinstance(value, str):
            return words.get(value.strip().lower(), value.strip().lower())
        return value

    @field_validator(
        "api_tokens",
        "admin_tokens",
        "a1111_urls",
        "cors_origins",
        "webhook_retry_seconds",
        mode="before",
    )
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        return _split_commas(value)

    @field_validator("api_tokens", "admin_tokens")
    @classmethod
    def _tokens_name_one_tenant_each(cls, entries: list[str]) -> list[str]:
        _one_tenant_per_token(parse_tokens(entries))  # raises ValueError naming the bad entry
        return entries

    @model_validator(mode="after")
    def _a_token_has_one_role(self) -> Settings:
        tenant_tokens = {token for _, token in parse_tokens(self.api_tokens)}
        if any(token in tenant_tokens for _, token in parse_tokens(self.admin_tokens)):
            raise ValueError(
                "a token is in both API_TOKENS and ADMIN_TOKENS; give it one role (an admin "
                "token already does everything a tenant token does)"
            )
        _one_tenant_per_token([*parse_tokens(self.api_tokens), *parse_tokens(self.admin_tokens)])
        return self

    def tenants(self) -> list[tuple[str, str]]:
        """API_TOKENS as (tenant name, token) pairs; several tokens may share a name."""
        return parse_tokens(self.api_tokens)

    def credentials(self) -> list[tuple[str, str, bool]]:
        """Every token as (tenant name, token, is admin): API_TOKENS, then ADMIN_TOKENS."""
        return [(name, token, False) for name, token in parse_tokens(self.api_tokens)] + [
            (name, token, True) for name, token in parse_tokens(self.admin_tokens)
        ]

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_tokens or self.admin_tokens)

    @field_validator("image_max_side")
    @classmethod
    def _off_or_a_real_size(cls, side: int) -> int:
        if 0 < side < 64:
            raise ValueError(f"{side} is too small to resize to: 0 (never resize) or 64 and up")
        return side

    @field_validator("a1111_urls")
    @classmethod
    def _urls_are_http(cls, urls: list[str]) -> list[str]:
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"{backend_name(url)!r} is not an http(s) URL")
        return [url.rstrip("/") for url in urls]

    @field_validator("public_url")
    @classmethod
    def _public_url_is_http(cls, url: str) -> str:
        if url and not url.startswith(("http://", "https://")):
            raise ValueError(f"{url!r} is not an http(s) URL (e.g. https://sd.example.com)")
        return url

    def host_is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def auth_problem(self) -> str | None:
        """Why `serve` must refuse to start, or None."""
        if self.auth_enabled or self.host_is_loopback():
            return None
        return (
            f"A1111_PROXY_API_TOKENS is empty but A1111_PROXY_HOST={self.host} is not a loopback "
            "address, so anyone on the network could use this server. Set "
            "A1111_PROXY_API_TOKENS=<token>[,<token>...] or A1111_PROXY_HOST=127.0.0.1."
        )

    def a1111_basic_auth(self) -> tuple[str, str] | None:
        raw = self.a1111_auth.get_secret_value()
        if not raw:
            return None
        user, _, password = raw.partition(":")
        return user, password

    def api_processes(self) -> int:
        """SERVE_PROCESSES, with 0 resolved to the core count (at most MAX_AUTO_PROCESSES)."""
        return self.serve_processes or max(1, min(os.cpu_count() or 1, MAX_AUTO_PROCESSES))

    def public_base_url(self) -> str:
        """PUBLIC_URL, or the address the API listens on."""
        return self.public_url.rstrip("/") or f"http://{self.host}:{self.port}"

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


def _one_tenant_per_token(tenants: list[tuple[str, str]]) -> None:
    by_token: dict[str, str] = {}
    for name, token in tenants:
        if by_token.setdefault(token, name) != name:
            raise ValueError(
                f"one token is given for two tenants, {by_token[token]!r} and "
                f"{name!r}; give each tenant its own token"
            )


def parse_tokens(entries: list[str]) -> list[tuple[str, str]]:
    """`name:token` names its tenant; a plain token is its own tenant, named `token-` and the
    first 8 hex digits of its SHA-256 (stable, and it does not reveal the token)."""
    tenants: list[tuple[str, str]] = []
    for entry in entries:
        name, colon, token = entry.partition(":")
        if not colon:
            name, token = "token-" + hashlib.sha256(entry.encode()).hexdigest()[:8], entry
        name, token = name.strip(), token.strip()
        if not name or not token:
            raise ValueError(
                "each entry is `name:token` or a plain token, with neither part empty "
                f"(entry {len(tenants) + 1} is not)"
            )
        tenants.append((name, token))
    return tenants
