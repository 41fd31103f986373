"""CivitaiClient: the only code that talks to Civitai's API, and the only code that knows its
answers and its addresses.

`version(hash)` asks `GET {url}/api/v1/model-versions/by-hash/{hash}` and returns the summary the
API shows as `civitai`, or None when Civitai has no such version (404). For downloads,
`model_version(source)` answers the whole model-version JSON that a `Source` names (by version
id, by hash, or a model's latest version through `GET /api/v1/models/{id}`); `parse_source`
reads what an admin gives (an id, a civitai.com URL, an AIR, a sha256 or a direct https URL),
`version_file` picks one of a version's files and `kind_of` maps Civitai's model type to ours.

Requests start at most one per `min_interval` seconds (Civitai publishes no limit; one a second
is what well-behaved clients use). 429 and 5xx are retried with exponential backoff, waiting at
least what `Retry-After` says; when retries run out, or Civitai cannot be reached at all,
`CivitaiUnavailable` says so.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Literal
from urllib.parse import parse_qs

import httpx
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt
from tenacity.stop import stop_base
from tenacity.wait import wait_exponential_jitter

from a1111_proxy import __version__


class CivitaiError(Exception):
    """Civitai gave an answer a1111-proxy cannot use."""


class CivitaiUnavailable(CivitaiError):
    """Civitai cannot be reached or keeps failing; try again later (after `retry_after`, if set)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class _Retryable(CivitaiUnavailable):
    """A 429 or 5xx: worth another try."""


class CivitaiClient:
    def __init__(
        self,
        url: str,
        token: str = "",
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        min_interval: float = 1.0,
        attempts: int = 4,
        max_retry_after: float = 300.0,
        timeout: float = 30.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url.rstrip("/")
        self.min_interval = min_interval
        self.attempts = attempts
        self.max_retry_after = max_retry_after
        self.sleep = sleep
        self.clock = clock
        self._last_start = float("-inf")
        self._turn = asyncio.Lock()
        self._backoff = wait_exponential_jitter(initial=1, max=60)
        self.credentials = {"Authorization": f"Bearer {token}"} if token else {}
        headers = {"User-Agent": f"a1111-proxy/{__version__}", "Accept": "application/json"}
        headers.update(self.credentials)
        self.http = httpx.AsyncClient(
            base_url=self.url,
            headers=headers,
            transport=transport,
            timeout=httpx.Timeout(timeout, connect=10.0),
        )

    async def version(self, sha_or_short_hash: str) -> dict[str, Any] | None:
        """The `civitai` summary of the version with this file hash; None: not on Civitai."""
        body = await self._get_retrying(f"/api/v1/model-versions/by-hash/{sha_or_short_hash}")
        return None if body is None else summarize(body, self.url)

    async def model_version(self, source: Source) -> dict[str, Any] | None:
        """The model-version JSON that `source` names (not a direct URL); None: Civitai has no
        such version (or the model has none)."""
        if source.kind == "hash":
            return await self._get_retrying(f"/api/v1/model-versions/by-hash/{source.value}")
        if source.kind == "model":
            model = await self._get_retrying(f"/api/v1/models/{source.value}")
            versions = [v for v in (model or {}).get("modelVersions") or [] if isinstance(v, dict)]
            if not versions or versions[0].get("id") is None:
                return None
            source = Source("version", str(versions[0]["id"]))  # the newest comes first
        return await self._get_retrying(f"/api/v1/model-versions/{source.value}")

    def is_civitai(self, url: str) -> bool:
        """Whether `url` is on the configured Civitai site (trusted; gets the token)."""
        return origin(url) == origin(self.url)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def _get_retrying(self, path: str) -> dict[str, Any] | None:
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(_Retryable),
            stop=stop_after_attempt(self.attempts) | _RetryAfterTooLong(self.max_retry_after),
            wait=self._wait,
            sleep=self.sleep,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                body = await self._get(path)
        return body

    async def _get(self, path: str) -> dict[str, Any] | None:
        await self._throttle()
        try:
            response = await self.http.get(path)
        except httpx.TransportError as exc:
            raise CivitaiUnavailable(f"{type(exc).__name__}: {exc}") from exc
        if response.status_code == 404:
            return None
        if response.status_code == 429 or response.status_code >= 500:
            raise _Retryable(f"HTTP {response.status_code}", retry_after_seconds(response))
        if response.status_code in (401, 403):
            raise CivitaiUnavailable(
                f"HTTP {response.status_code}: is A1111_PROXY_CIVITAI_TOKEN right?"
            )
        if response.status_code != 200:
            raise CivitaiError(f"HTTP {response.status_code}: {response.text[:200]}")
        try:
            body = response.json()
        except ValueError as exc:
            raise CivitaiError(f"not JSON: {response.text[:200]!r}") from exc
        if not isinstance(body, dict):
            raise CivitaiError(f"not a model version: {response.text[:200]!r}")
        return body

    async def _throttle(self) -> None:
        """Start requests at least `min_interval` apart, whoever asks."""
        async with self._turn:
            wait = self._last_start + self.min_interval - self.clock()
            if wait > 0:
                await self.sleep(wait)
            self._last_start = self.clock()

    def _wait(self, state: RetryCallState) -> float:
        return max(self._backoff(state), _retry_after(state) or 0.0)


class _RetryAfterTooLong(stop_base):
    """Stop rather than hold on for a Retry-After longer than `limit`: give up this round."""

    def __init__(self, limit: float) -> None:
        self.limit = limit

    def __call__(self, retry_state: RetryCallState) -> bool:
        return (_retry_after(retry_state) or 0.0) > self.limit


def _retry_after(state: RetryCallState) -> float | None:
    error = state.outcome.exception() if state.outcome else None
    return getattr(error, "retry_after", None)


def retry_after_seconds(response: httpx.Response) -> float | None:
    """`Retry-After` as seconds from now: delta-seconds or an HTTP date (RFC 9110 §10.2.3)."""
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def summarize(version: dict[str, Any], site: str) -> dict[str, Any]:
    """What the API shows of a Civitai model version (by-hash answer) as `civitai`."""
    model = version.get("model")
    if not isinstance(model, dict):
        model = {}
    model_id, version_id = version.get("modelId"), version.get("id")
    return {
        "model_id": model_id,
        "version_id": version_id,
        "model_name": model.get("name"),
        "version_name": version.get("name"),
        "type": model.get("type"),
        "base_model": version.get("baseModel"),
        "trained_words": list(version.get("trainedWords") or []),
        "nsfw": model.get("nsfw"),
        "nsfw_level": version.get("nsfwLevel"),
        "images": [_image(i) for i in version.get("images") or [] if isinstance(i, dict)],
        "download_url": version.get("downloadUrl"),
        "page_url": (
            f"{site}/models/{model_id}?modelVersionId={version_id}"
            if model_id is not None
            else None
        ),
    }


def _image(image: dict[str, Any]) -> dict[str, Any]:
    # Newer answers give a numeric nsfwLevel (1 PG ... 16+ X); older ones `nsfw` as a word or bool.
    level = image.get("nsfwLevel", image.get("nsfw"))
    return {
        "url": image.get("url"),
        "nsfw_level": level,
        "width": image.get("width"),
        "height": image.get("height"),
    }


# --- what a download's source names -----------------------------------------------------------

CIVITAI_HOSTS = frozenset({"civitai.com", "www.civitai.com", "civitai.green", "www.civitai.green"})
# urn:air:{ecosystem}:{type}:{source}:{id}[@{version}][:{layer}][.{format}]
_AIR = re.compile(r"^urn:air:[\w.-]+:[\w.-]+:([\w.-]+):(\d+)(?:@(\d+))?(?::[\w.-]+)?(?:\.\w+)?$")
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
_MODEL_PAGE = re.compile(r"^/models/(\d+)(?:/[^/]*)?/?$")
_VERSION_PATHS = (
    re.compile(r"^/api/download/models/(\d+)/?$"),
    re.compile(r"^/api/v1/model-versions/(\d+)/?$"),
)
_MODEL_API = re.compile(r"^/api/v1/models/(\d+)/?$")
SOURCE_FORMS = (
    "a Civitai model-version id (`128713`), a civitai.com model or version URL "
    "(`https://civitai.com/models/4201?modelVersionId=130072`), an AIR "
    "(`urn:air:sd1:checkpoint:civitai:4201@130072`), a file's sha256, or a direct https URL"
)


@dataclass(frozen=True)
class Source:
    """What a download's `source` names: a Civitai model version, a model (its newest version),
    a file hash (sha256, lower case), or a direct URL elsewhere."""

    kind: Literal["version", "model", "hash", "url"]
    value: str


def parse_source(text: str, site: str) -> Source:
    """`text` as a Source; `site` is CIVITAI_URL (its URLs are Civitai's too). Raises ValueError
    saying what is accepted."""
    text = text.strip()
    if text.isdigit() and len(text) <= 18:
        return Source("version", str(int(text)))
    if _SHA256.match(text):
        return Source("hash", text.lower())
    if text.lower().startswith("urn:air:"):
        return _air(text)
    if text.lower().startswith(("http://", "https://")):
        return _url_source(text, site)
    raise ValueError(f"not a source a1111-proxy knows; give {SOURCE_FORMS}")


def _air(text: str) -> Source:
    found = _AIR.match(text)
    if found is None:
        raise ValueError("not an AIR: give urn:air:<ecosystem>:<type>:civitai:<model>@<version>")
    if found.group(1).lower() != "civitai":
        raise ValueError(f"only Civitai's AIRs can be downloaded, not {found.group(1)}'s")
    if found.group(3):
        return Source("version", found.group(3))
    return Source("model", found.group(2))


def _url_source(text: str, site: str) -> Source:
    try:
        url = httpx.URL(text)
    except (httpx.InvalidURL, ValueError) as exc:
        raise ValueError(f"not a URL: {exc}") from None
    if not url.host:
        raise ValueError("the URL has no host")
    if url.host.lower() in CIVITAI_HOSTS or origin(text) == origin(site):
        return _civitai_url(url)
    if url.scheme != "https":
        raise ValueError("a direct URL must be https")
    return Source("url", text)


def _civitai_url(url: httpx.URL) -> Source:
    path = url.path
    query = parse_qs(url.query.decode())
    if found := _MODEL_PAGE.match(path):
        version = (query.get("modelVersionId") or [""])[0]
        return Source("version", version) if version.isdigit() else Source("model", found[1])
    for pattern in _VERSION_PATHS:
        if found := pattern.match(path):
            return Source("version", found[1])
    if found := _MODEL_API.match(path):
        return Source("model", found[1])
    raise ValueError(
        "a Civitai URL must name a model (/models/<id>) or a version (/models/<id>?"
        "modelVersionId=<id>, /api/download/models/<id>)"
    )


def origin(url: str) -> tuple[str, str, int]:
    """Scheme, host and port (the default one when not given), to compare sites."""
    parsed = httpx.URL(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    return parsed.scheme, parsed.host.lower(), port


# --- a version's files and types --------------------------------------------------------------

# Civitai's model types -> the kinds downloads know (a1111_proxy/model_layout.py).
KINDS_BY_TYPE = {
    "checkpoint": "checkpoint",
    "lora": "lora",
    "locon": "lora",
    "dora": "lora",
    "lycoris": "lora",
    "controlnet": "controlnet",
    "vae": "vae",
    "textualinversion": "embedding",
}


@dataclass(frozen=True)
class VersionFile:
    """One file of a model version, as a download needs it."""

    name: str
    url: str
    sha256: str | None  # lower case
    size: int | None  # bytes, from Civitai's sizeKB (approximate)
    type: str  # Model, VAE, Config, Training Data, ...
    pickle: bool  # Civitai calls its format PickleTensor


def version_file(version: dict[str, Any], wanted: str | None) -> VersionFile:
    """The file named `wanted` (or with that id), else the primary one, else the first model
    file. Raises ValueError naming the version's files."""
    files = [f for f in version.get("files") or [] if isinstance(f, dict) and f.get("name")]
    if wanted is not None:
        chosen = [f for f in files if wanted in (f.get("name"), str(f.get("id")))]
    else:
        chosen = [f for f in files if f.get("primary")] or [
            f for f in files if f.get("type") == "Model"
        ]
    if not chosen:
        names = ", ".join(repr(f["name"]) for f in files) or "none"
        missing = f"has no file {wanted!r}" if wanted is not None else "has no model file"
        raise ValueError(f"Civitai's version {version.get('id')} {missing}; its files: {names}")
    return _version_file(chosen[0], version)


def _version_file(file: dict[str, Any], version: dict[str, Any]) -> VersionFile:
    hashes = file.get("hashes") if isinstance(file.get("hashes"), dict) else {}
    sha = str((hashes or {}).get("SHA256") or "").lower() or None
    size_kb = file.get("sizeKB")
    metadata = file.get("metadata") if isinstance(file.get("metadata"), dict) else {}
    return VersionFile(
        name=str(file["name"]),
        url=str(file.get("downloadUrl") or version.get("downloadUrl") or ""),
        sha256=sha,
        size=round(float(size_kb) * 1024) if isinstance(size_kb, int | float) else None,
        type=str(file.get("type") or ""),
        pickle=(metadata or {}).get("format") == "PickleTensor",
    )


def kind_of(version: dict[str, Any], file: VersionFile) -> str | None:
    """Our kind for this file: a version's VAE file is a VAE; otherwise the model's type.
    None when Civitai's type is none of ours (a hypernetwork, a workflow, ...)."""
    if file.type.lower() == "vae":
        return "vae"
    model = version.get("model") if isinstance(version.get("model"), dict) else {}
    return KINDS_BY_TYPE.get(str((model or {}).get("type") or "").lower())


def civitai_type(version: dict[str, Any]) -> str:
    model = version.get("model") if isinstance(version.get("model"), dict) else {}
    return str((model or {}).get("type") or "unknown")
