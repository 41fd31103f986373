"""CivitaiClient: the only code that talks to Civitai, and the only code that knows its answers.

`version(hash)` asks `GET {url}/api/v1/model-versions/by-hash/{hash}` and returns the summary the
API shows as `civitai`, or None when Civitai has no such version (404). Requests start at most one
per `min_interval` seconds (Civitai publishes no limit; one a second is what well-behaved clients
use). 429 and 5xx are retried with exponential backoff, waiting at least what `Retry-After` says;
when retries run out, or Civitai cannot be reached at all, `CivitaiUnavailable` says so.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

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
        headers = {"User-Agent": f"a1111-proxy/{__version__}", "Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.http = httpx.AsyncClient(
            base_url=self.url,
            headers=headers,
            transport=transport,
            timeout=httpx.Timeout(timeout, connect=10.0),
        )

    async def version(self, sha_or_short_hash: str) -> dict[str, Any] | None:
        """The `civitai` summary of the version with this file hash; None: not on Civitai."""
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(_Retryable),
            stop=stop_after_attempt(self.attempts) | _RetryAfterTooLong(self.max_retry_after),
            wait=self._wait,
            sleep=self.sleep,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                body = await self._get(f"/api/v1/model-versions/by-hash/{sha_or_short_hash}")
        return None if body is None else summarize(body, self.url)

    async def aclose(self) -> None:
        await self.http.aclose()

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
