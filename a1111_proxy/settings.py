"""The one `Settings` object. Built by the CLI and passed down; nothing reads it at import."""

from __future__ import annotations

import hashlib
import ipaddress
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

CommaList = Annotated[list[str], NoDecode]


def _split_commas(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Every setting, read from `A1111_PROXY_*` environment variables and `.env`."""

    # hide_input_in_errors: `serve` prints a bad setting's error, and values carry secrets
    # (API_TOKENS, a DATABASE_URL's password); messages name the setting and the reason instead.
    model_config = SettingsConfigDict(env_prefix="A1111_PROXY_", env_file=".env", extra="ignore",
                                      hide_input_in_errors=True)

    database_url: str = "sqlite+aiosqlite:///./data/a1111_proxy.db"
    host: str = "127.0.0.1"
    port: int = Field(7861, ge=0, le=65535)
    api_tokens: CommaList = []
    backend: Literal["a1111", "diffusers"] = "a1111"
    a1111_urls: CommaList = ["http://127.0.0.1:7860"]
    a1111_auth: SecretStr = SecretStr("")
    models_dir: str = "./models"
    response_mode: Literal["auto", "async", "wait"] = Field(
        "auto", description="auto: answer as A1111 does (hold until done) unless the request sends "
        "`Prefer: respond-async` or a webhook_url; async: always 202 + job; wait: always hold")
    backend_down_grace: float = Field(
        30.0, ge=0, description="seconds with no backend answering before a waiting request "
        "gets 503 (and its job is canceled) instead of waiting on")
    cancel_on_disconnect: bool = Field(
        True, description="cancel a waiting request's job when its client goes away before "
        "the job started (a running job finishes and keeps its result)")
    webhook_secret: SecretStr = SecretStr("")
    webhook_allow_private: bool = False
    webhook_images: Literal["base64", "url", "none"] = "base64"
    public_url: str = Field("", description="this API's address as receivers reach it")
    civitai_enabled: bool = True
    civitai_url: str = "https://civitai.com"
    civitai_token: SecretStr = SecretStr("")
    civitai_ttl_seconds: float = Field(604800.0, gt=0, description="how long Civitai answers last")
    retention_seconds: int = Field(
        604800, ge=0, description="finished jobs older than this are deleted; 0: keep forever")
    retention_check_seconds: float = Field(60.0, gt=0, description="how often the worker deletes expired jobs")
    deadline_check_seconds: float = Field(1.0, gt=0, description="how often the worker enforces deadlines")
    cors_origins: CommaList = Field([], description="browser origins allowed to call the API; empty: no CORS")
    sse_ping_seconds: float = Field(15.0, gt=0, description="heartbeat comment interval on event streams")

    # Input images (img2img, masks, ControlNet units, extras).
    image_max_pixels: int = Field(
        16384 * 16384, ge=1, description="larger input images are refused, read from the header")
    image_max_side: int = Field(
        0, ge=0, description="opt-in: resize input images with a longer side to this; 0: never")
    image_urls: bool = False
    # Caps on what one txt2img/img2img job asks for (A1111 has none; these stop runaway jobs).
    max_steps: int = Field(500, ge=1)
    max_n_iter: int = Field(100, ge=1)
    max_batch_size: int = Field(64, ge=1)
    max_width_height: int = Field(16384, ge=8, description="the largest width or height")

    # Job execution and durability.
    max_body_bytes: int = Field(50 * 1024 * 1024, ge=1024)
    max_attempts: int = Field(3, ge=1, le=20)
    lease_seconds: float = Field(30.0, gt=0)
    heartbeat_seconds: float = Field(10.0, gt=0)
    reap_seconds: float = Field(5.0, gt=0)
    poll_seconds: float = Field(0.005, gt=0, description="how often an idle worker checks for work")
    progress_seconds: float = Field(0.5, gt=0, description="how often a running job's progress is read")
    shutdown_grace_seconds: float = Field(30.0, ge=0)
    interrupt_grace_seconds: float = Field(30.0, ge=0)
    stall_seconds: float = Field(600.0, gt=0, description="requeue a job whose A1111 shows no generation this long")
    connect_retries: int = Field(3, ge=1, le=10)
    worker_stale_seconds: float = Field(30.0, gt=0)
    catalogue_seconds: float = Field(300.0, gt=0, description="how often the worker refetches models, samplers, options")
    wait_seconds_max: float = Field(3600.0, gt=0, description="the longest a request may wait in wait mode")
    checkpoint_wait_seconds: float = Field(
        10.0, ge=0, description="how long unload/reload-checkpoint wait for backends to apply it")
    log_level: str = "info"
    log_format: Literal["auto", "json", "text"] = Field(
        "auto", description="json: one JSON object a line; auto: json unless stderr is a terminal")
    metrics_window_seconds: float = Field(
        900.0, ge=10, description="the recent window /metrics histograms describe")

    # The bundled diffusers engine (BACKEND=diffusers).
    engine_device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    engine_dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    engine_cached_models: int = Field(1, ge=1, le=16, description="checkpoints kept loaded")
    engine_compile: bool = Field(False, description="torch.compile the UNet (slow first run)")
    engine_cpu_offload: Literal["auto", "true", "false"] = Field(
        "auto", description="offload idle parts to the CPU (CUDA only); auto: when VRAM is short")
    engine_preview_steps: int = Field(5, ge=0, description="a live preview every N steps; 0: none")

    @field_validator("engine_cpu_offload", mode="before")
    @classmethod
    def _auto_or_bool(cls, value: object) -> object:
        words = {"1": "true", "yes": "true", "on": "true", "0": "false", "no": "false",
                 "off": "false"}
        if isinstance(value, bool):
            return str(value).lower()
        if isinstance(value, str):
            return words.get(value.strip().lower(), value.strip().lower())
        return value

    @field_validator("api_tokens", "a1111_urls", "cors_origins", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        return _split_commas(value)

    @field_validator("api_tokens")
    @classmethod
    def _tokens_name_one_tenant_each(cls, entries: list[str]) -> list[str]:
        tenants = parse_tokens(entries)  # raises ValueError naming the bad entry
        by_token: dict[str, str] = {}
        for name, token in tenants:
            if by_token.setdefault(token, name) != name:
                raise ValueError(f"one token is given for two tenants, {by_token[token]!r} and "
                                 f"{name!r}; give each tenant its own token")
        return entries

    def tenants(self) -> list[tuple[str, str]]:
        """API_TOKENS as (tenant name, token) pairs; several tokens may share a name."""
        return parse_tokens(self.api_tokens)

    @field_validator("a1111_urls")
    @classmethod
    def _urls_are_http(cls, urls: list[str]) -> list[str]:
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"{url!r} is not an http(s) URL")
        return [url.rstrip("/") for url in urls]

    @field_validator("public_url")
    @classmethod
    def _public_url_is_http(cls, url: str) -> str:
        if url and not url.startswith(("http://", "https://")):
            raise ValueError(f"{url!r} is not an http(s) URL (e.g. https://sd.example.com)")
        return url

    @field_validator("image_max_side")
    @classmethod
    def _off_or_a_real_size(cls, side: int) -> int:
        if 0 < side < 64:
            raise ValueError(f"{side} is too small to resize to: 0 (never resize) or 64 and up")
        return side

    def host_is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def auth_problem(self) -> str | None:
        """Why `serve` must refuse to start, or None."""
        if self.api_tokens or self.host_is_loopback():
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

    def public_base_url(self) -> str:
        """PUBLIC_URL, or the address the API listens on."""
        return self.public_url.rstrip("/") or f"http://{self.host}:{self.port}"

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


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
                f"(entry {len(tenants) + 1} is not)")
        tenants.append((name, token))
    return tenants
