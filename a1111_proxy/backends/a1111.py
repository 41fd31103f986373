"""A1111Backend: the one owner of A1111's HTTP API (its URL paths) on the worker's side."""

from __future__ import annotations

import functools
import json
import ssl
from typing import Any

import httpx
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from a1111_proxy import __version__
from a1111_proxy.backends.base import (
    BackendProtocolError,
    BackendRejected,
    BackendUnavailable,
    Progress,
    Refresh,
)
from a1111_proxy.redaction import backend_name

GATEWAY_STATUSES = frozenset({502, 503, 504})
# Where each job type goes on A1111. Generations return images we keep apart; the others return
# small answers kept as they are.
PATHS = {
    "txt2img": "/sdapi/v1/txt2img",
    "img2img": "/sdapi/v1/img2img",
    "extra-single-image": "/sdapi/v1/extra-single-image",
    "extra-batch-images": "/sdapi/v1/extra-batch-images",
    "interrogate": "/sdapi/v1/interrogate",
    "controlnet-detect": "/controlnet/detect",
}
GENERATIONS = frozenset({"txt2img", "img2img"})
# Where each catalogue entry (by the name the API serves it under) is read on A1111.
CATALOGUE_PATHS: dict[str, str] = {
    "sd-models": "/sdapi/v1/sd-models",
    "loras": "/sdapi/v1/loras",
    "samplers": "/sdapi/v1/samplers",
    "schedulers": "/sdapi/v1/schedulers",
    "upscalers": "/sdapi/v1/upscalers",
    "latent-upscale-modes": "/sdapi/v1/latent-upscale-modes",
    "sd-vae": "/sdapi/v1/sd-vae",
    "scripts": "/sdapi/v1/scripts",
    "script-info": "/sdapi/v1/script-info",
    "embeddings": "/sdapi/v1/embeddings",
    "prompt-styles": "/sdapi/v1/prompt-styles",
    "hypernetworks": "/sdapi/v1/hypernetworks",
    "face-restorers": "/sdapi/v1/face-restorers",
    "realesrgan-models": "/sdapi/v1/realesrgan-models",
    "extensions": "/sdapi/v1/extensions",
    "memory": "/sdapi/v1/memory",
    "cmd-flags": "/sdapi/v1/cmd-flags",
    "options": "/sdapi/v1/options",
    "controlnet-version": "/controlnet/version",
    "controlnet-model_list": "/controlnet/model_list",
    "controlnet-module_list": "/controlnet/module_list",
}
REFRESH_PATHS: dict[Refresh, str] = {
    "checkpoints": "/sdapi/v1/refresh-checkpoints",
    "loras": "/sdapi/v1/refresh-loras",
    "vae": "/sdapi/v1/refresh-vae",
    "embeddings": "/sdapi/v1/refresh-embeddings",
}
# Generation may take many minutes: no read timeout on it. Control calls are short.
GENERATE_TIMEOUT = httpx.Timeout(connect=10.0, read=None, write=120.0, pool=None)
CONTROL_TIMEOUT = httpx.Timeout(5.0)
# Refreshing checkpoints takes A1111's queue lock: it waits behind a running generation.
REFRESH_TIMEOUT = httpx.Timeout(connect=10.0, read=600.0, write=30.0, pool=None)


class A1111Backend:
    """One backend slot: one A1111 server that runs one job at a time."""

    def __init__(
        self,
        url: str,
        *,
        auth: tuple[str, str] | None = None,
        connect_retries: int = 3,
        retry_wait: float = 0.5,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        # Shown everywhere (health, metrics, jobs, errors, logs); the URL's own user name and
        # password, if any, go only to httpx, which sends them as Basic auth.
        self.name = backend_name(url)
        self.has_auth = auth is not None or self.name != url.rstrip("/")
        self.connect_retries = connect_retries
        self.retry_wait = retry_wait
        self._client = httpx.AsyncClient(
            base_url=url.rstrip("/"),
            auth=auth,
            transport=transport,
            headers={"user-agent": f"a1111-proxy/{__version__}"},
            follow_redirects=False,
            verify=tls_context(),
        )

    async def generate(self, kind: str, payload: dict[str, Any]) -> dict[str, Any]:
        """POST the job; retry only what cannot have started a generation (connect errors,
        gateway statuses). Raises BackendUnavailable, BackendRejected or BackendProtocolError."""
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(_NotStarted),
            stop=stop_after_attempt(self.connect_retries),
            wait=wait_random_exponential(multiplier=self.retry_wait, max=8.0),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await self._post_once(kind, payload)
        except _NotStarted as exc:
            raise BackendUnavailable(
                f"A1111 at {self.name} is unavailable: {exc} (tried {self.connect_retries} times)",
                status=exc.status,
            ) from None
        raise AssertionError("unreachable")

    async def _post_once(self, kind: str, payload: dict[str, Any]) -> dict[str, Any]:
        path = PATHS[kind]
        try:
            response = await self._client.post(path, json=payload, timeout=GENERATE_TIMEOUT)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise _NotStarted(f"cannot connect ({_describe(exc)})") from exc
        except httpx.HTTPError as exc:
            # The request may have reached A1111: never retried here, the job is re-queued.
            raise BackendUnavailable(
                f"A1111 at {self.name} dropped the {kind} request: {_describe(exc)}"
            ) from exc
        if response.status_code in GATEWAY_STATUSES:
            raise _NotStarted(f"HTTP {response.status_code}", status=response.status_code)
        self._check_credentials(response)
        return self._parse_generation(kind, response)

    def _check_credentials(self, response: httpx.Response) -> None:
        """A1111 started with --api-auth answers 401 to a request without one of its
        `user:password` pairs: unavailable (the slot rests, its jobs wait in the queue) until the
        worker runs with the right A1111_PROXY_A1111_AUTH. Never A1111's own 401 passed on to a
        client, who would take it for a refusal of its own credentials."""
        if response.status_code != 401:
            return
        detail = _a1111_message(_json_or_none(response)) or _snippet(response)
        given = (
            "refused the user and password in A1111_PROXY_A1111_AUTH (or in its URL)"
            if self.has_auth
            else "requires a user and password (it runs with --api-auth) and none is set"
        )
        raise BackendUnavailable(
            f"A1111 at {self.name} {given}: HTTP 401, {detail}. Set A1111_PROXY_A1111_AUTH="
            "user:password to one of the pairs of its --api-auth, and restart the worker",
            status=401,
        )

    def _parse_generation(self, kind: str, response: httpx.Response) -> dict[str, Any]:
        body = _json_or_none(response)
        misconfigured = _not_the_api(PATHS[kind], response.status_code, body)
        if misconfigured:
            # Not A1111 judging the request: replayed, it would tell the client that its own
            # credentials or route are wrong.
            raise BackendProtocolError(
                f"A1111 at {self.name} answered {kind} with HTTP {response.status_code} "
                f"({_a1111_message(body) or _snippet(response)}): {misconfigured}",
                status=response.status_code,
            )
        if response.status_code != 200:
            if response.status_code >= 500 and not _is_a1111_error(body):
                raise BackendUnavailable(
                    f"A1111 at {self.name} answered {kind} with HTTP {response.status_code}: "
                    f"{_snippet(response)}",
                    status=response.status_code,
                    body=body if body is not None else response.text[:2000],
                )
            raise BackendRejected(
                f"A1111 at {self.name} rejected the {kind} request with HTTP "
                f"{response.status_code}: {_a1111_message(body) or _snippet(response)}",
                status=response.status_code,
                body=body if body is not None else response.text[:2000],
            )
        expected_images = kind not in GENERATIONS or (
            isinstance(body, dict) and isinstance(body.get("images"), list | None)
        )
        if not isinstance(body, dict) or not expected_images:
            raise BackendProtocolError(
                f"A1111 at {self.name} answered {kind} with something that is not an A1111 "
                f"response (first bytes: {_snippet(response)}); is that URL really A1111 "
                "started with --api?",
                status=response.status_code,
            )
        return body

    async def progress(self, *, with_image: bool = False) -> Progress:
        response = await self._client.get(
            "/sdapi/v1/progress",
            params={"skip_current_image": "false" if with_image else "true"},
            timeout=CONTROL_TIMEOUT,
        )
        self._check_credentials(response)
        body = response.json()
        state = body.get("state") or {}
        job_count = state.get("job_count") or 0
        value = float(body.get("progress") or 0.0)
        eta = body.get("eta_relative")
        image = body.get("current_image")
        return Progress(
            progress=max(0.0, min(1.0, value)),
            eta_relative=float(eta) if isinstance(eta, int | float) else None,
            started=job_count != 0 or value > 0,
            current_image=image if isinstance(image, str) and image else None,
            step=_int_or_none(state.get("sampling_step")),
            steps=_int_or_none(state.get("sampling_steps")),
        )

    async def interrupt(self) -> None:
        await self._client.post("/sdapi/v1/interrupt", timeout=CONTROL_TIMEOUT)

    async def skip(self) -> None:
        await self._client.post("/sdapi/v1/skip", timeout=CONTROL_TIMEOUT)

    async def catalogue_entry(self, name: str) -> Any:
        if name not in CATALOGUE_PATHS:
            return None  # the engine's own facts (catalogue.ENGINE_FACTS): A1111 has none
        response = await self._client.get(CATALOGUE_PATHS[name], timeout=CONTROL_TIMEOUT)
        self._check_credentials(response)
        if response.status_code == 404:
            return None
        response.raise_for_status()
        return response.json()

    async def apply_options(self, options: dict[str, Any]) -> None:
        await self._post_control("/sdapi/v1/options", options)

    async def refresh(self, what: Refresh) -> None:
        await self._post_control(REFRESH_PATHS[what], None)

    async def unload_checkpoint(self) -> None:
        await self._post_control("/sdapi/v1/unload-checkpoint", None)

    async def reload_checkpoint(self, checkpoint: str | None) -> None:
        # A1111 reloads its own current checkpoint and ignores the body; it is sent all the same.
        body = {"sd_model_checkpoint": checkpoint} if checkpoint else None
        await self._post_control("/sdapi/v1/reload-checkpoint", body)

    async def _post_control(self, path: str, body: Any) -> None:
        """A control call between jobs; refreshes and (un)loads wait behind A1111's queue lock."""
        response = await self._client.post(path, json=body, timeout=REFRESH_TIMEOUT)
        self._check_credentials(response)
        response.raise_for_status()

    async def aclose(self) -> None:
        await self._client.aclose()


@functools.cache
def tls_context() -> ssl.SSLContext:
    """The one certificate store of every A1111 client in the process (https URLs). A client of
    its own would load the CA bundle again: about 30 ms of CPU and 1 MB of memory per backend,
    seconds and tens of MB at start for a worker that lists 64."""
    return httpx.create_ssl_context()


class _NotStarted(Exception):
    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) else None


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def _not_the_api(path: str, status: int, body: Any) -> str | None:
    """What to fix when a job's answer says the proxy reached no A1111 API it may use: its
    credentials were refused, or one of A1111's own routes does not exist there (a 404 or 405
    that names nothing, as any web server's does). None otherwise: a 404 naming what is missing,
    such as "Sampler not found", is A1111's judgement of the request, and an extension's route
    (/controlnet/detect) is missing where the extension is, which A1111 itself answers so."""
    if status in (401, 403):
        return "it refused a1111-proxy's credentials; set A1111_PROXY_A1111_AUTH to its --api-auth"
    detail = body.get("detail") if isinstance(body, dict) else None
    generic = detail in (None, "Not Found", "Method Not Allowed")
    if status in (404, 405) and generic and path.startswith("/sdapi/"):
        return (
            "it has no such API route; is it started with --api, and is A1111_PROXY_A1111_URLS "
            "its base address?"
        )
    return None


def _is_a1111_error(body: Any) -> bool:
    return isinstance(body, dict) and "error" in body and "errors" in body


def _a1111_message(body: Any) -> str | None:
    if not isinstance(body, dict):
        return None
    if _is_a1111_error(body):
        parts = [str(body.get(k)) for k in ("error", "detail", "errors") if body.get(k)]
        return ": ".join(parts) or None
    detail = body.get("detail")
    return json.dumps(detail) if detail is not None else None


def _snippet(response: httpx.Response) -> str:
    return repr(response.content[:200].decode("utf-8", "replace"))
