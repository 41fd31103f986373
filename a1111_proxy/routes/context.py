"""What a route reads from its request, in one place: the lifespan's resources and the caller
(typed), a job by id, the worker's catalogue, the JSON body and query parameters.

Each request sees a shallow copy of the lifespan's `State` (ASGI's `scope["state"]`); TokenAuth
adds the `caller` to that copy. Every lookup that fails raises the error the API documents.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Collection
from typing import Any, TypedDict, cast, overload

from starlette.requests import Request

from a1111_proxy.availability import BackendWatch
from a1111_proxy.catalogue import CatalogueStore
from a1111_proxy.cpu_pool import CpuPool
from a1111_proxy.downloads import DownloadRecord, DownloadStore
from a1111_proxy.errors import (
    AdminOnly,
    CatalogueNotReady,
    DownloadNotFound,
    InvalidRequest,
    JobNotFound,
)
from a1111_proxy.jobs import JobRecord, JobRepository
from a1111_proxy.middleware import Caller
from a1111_proxy.model_info import ModelInfoStore
from a1111_proxy.settings import Settings
from a1111_proxy.thumbnails import ThumbnailCache
from a1111_proxy.waiter import JobWaiter

TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off")


class State(TypedDict):
    """What the lifespan yields: the process's resources, shared by every request."""

    settings: Settings
    repo: JobRepository
    catalogue: CatalogueStore
    model_info: ModelInfoStore
    downloads: DownloadStore
    waiter: JobWaiter
    backends: BackendWatch
    schema_head: str
    cpu: CpuPool
    thumbnails: ThumbnailCache


class RequestState(State, total=False):
    caller: Caller  # set by TokenAuth on every route it guards (and open ones given a token)


def request_state(request: Request) -> RequestState:
    return cast(RequestState, request.scope["state"])


def settings(request: Request) -> Settings:
    return request_state(request)["settings"]


def repo(request: Request) -> JobRepository:
    return request_state(request)["repo"]


def catalogue(request: Request) -> CatalogueStore:
    return request_state(request)["catalogue"]


def model_info(request: Request) -> ModelInfoStore:
    return request_state(request)["model_info"]


def downloads(request: Request) -> DownloadStore:
    return request_state(request)["downloads"]


def waiter(request: Request) -> JobWaiter:
    return request_state(request)["waiter"]


def backends(request: Request) -> BackendWatch:
    return request_state(request)["backends"]


def schema_head(request: Request) -> str:
    return request_state(request)["schema_head"]


def cpu(request: Request) -> CpuPool:
    """The process's bounded pool for heavy work on what requests carry (cpu_pool.py)."""
    return request_state(request)["cpu"]


def thumbnails(request: Request) -> ThumbnailCache:
    """The process's cache of thumbnails (thumbnails.py)."""
    return request_state(request)["thumbnails"]


def caller(request: Request) -> Caller:
    """Who is calling: the token's tenant and role, or the client's address when tokens are
    off."""
    return request_state(request)["caller"]


def is_admin(request: Request) -> bool:
    """Whether the caller presented an admin token (open routes may have no caller at all)."""
    who = request_state(request).get("caller")
    return who is not None and who.admin


def require_admin(request: Request) -> None:
    """403 (AdminOnly) unless the caller is an admin: global options, catalogue refreshes,
    checkpoint loads, model downloads and /metrics act for every tenant."""
    if not is_admin(request):
        raise AdminOnly(
            f"{request.method} {request.url.path} changes or shows what every tenant shares, so "
            "it needs an admin token: send one of A1111_PROXY_ADMIN_TOKENS."
        )


def visible_owner(request: Request) -> str | None:
    """Whose jobs the caller may see: its own tenant's, or everyone's (None) for an admin."""
    who = caller(request)
    return None if who.admin else who.tenant


# --- lookups ---------------------------------------------------------------------------


async def find_job(request: Request, job_id: str) -> JobRecord:
    """The job with this id, if the caller may see it (404 JobNotFound otherwise: another
    tenant's job answers exactly as a job that does not exist)."""
    owner = visible_owner(request)
    store = repo(request)
    row = await (store.get(job_id) if owner is None else store.owned(owner, job_id))
    if row is None:
        raise _not_found(job_id)
    return row


async def find_job_shown(
    request: Request, job_id: str
) -> tuple[JobRecord, list[bytes] | None, int | None]:
    """find_job, with the job's images (None when it has none) and its queue position (None
    unless queued), read together."""
    found = await repo(request).shown(job_id, visible_owner(request))
    if found is None:
        raise _not_found(job_id)
    return found


def _not_found(job_id: str) -> JobNotFound:
    return JobNotFound(f"No job has the id {job_id!r}. List jobs with GET /sdapi/v1/jobs.")


async def find_download(request: Request, download_id: str) -> DownloadRecord:
    """The model download with this id (404 DownloadNotFound otherwise)."""
    found = await downloads(request).get(download_id)
    if found is None:
        raise DownloadNotFound(
            f"No model download has the id {download_id!r}. List them with "
            "GET /sdapi/v1/models/downloads."
        )
    return found


async def read_catalogue(request: Request, name: str) -> tuple[Any, dict[str, str]]:
    """The worker's last fetch of `name` and an `Age` header (seconds since that fetch); None
    when the backends lack that entry. 503 (CatalogueNotReady) while no catalogue was ever
    fetched: an empty list would look like a backend without models."""
    store = catalogue(request)
    entry = await store.entry(name)
    if entry is None and await store.ever_fetched():
        # Read again: the worker may have stored it between the two reads above (it stores
        # the model list first), and None would then read as a backend without models.
        entry = await store.entry(name)
        if entry is None:
            return None, {}
    if entry is not None:
        return entry.body, {"Age": str(max(0, int(time.time() - entry.fetched_at)))}
    outage = await backends(request).outage()
    why = outage.reason if outage is not None else "the worker has not reached a backend yet"
    raise CatalogueNotReady(
        f"No worker has fetched the backends' catalogue (models, samplers, options) yet: {why}. "
        "GET /health shows the workers and backends."
    )


# --- the body and the query ------------------------------------------------------------


async def read_json_object(request: Request) -> dict[str, Any]:
    """The body as a JSON object that can be stored and shown again: 422 naming the field for
    NaN/Infinity, a lone surrogate or nesting deeper than MAX_DEPTH (they would be stored, then
    fail every view of the job)."""
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        reason = "it is nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise InvalidRequest(
            [
                {
                    "loc": ["body"],
                    "msg": f"the body is not valid JSON: {reason}",
                    "type": "json_invalid",
                }
            ]
        ) from None
    if not isinstance(body, dict):
        raise InvalidRequest(
            [{"loc": ["body"], "msg": "the body must be a JSON object", "type": "dict_type"}]
        )
    if not _may_be_unstorable(raw):
        return body
    problem = unstorable(body, surrogates=_may_hold_surrogates(raw))
    if problem is not None:
        loc, msg = problem
        raise InvalidRequest([{"loc": ["body", *loc], "msg": msg, "type": "value_error"}])
    return body


MAX_DEPTH = 64  # A1111 bodies nest about 6 levels (alwayson_scripts -> args -> unit -> ...)
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _may_be_unstorable(raw: bytes) -> bool:
    """Whether the parsed body needs the walk of `unstorable`: only when its text has a NaN or
    Infinity token, a surrogate escape, or brackets enough to nest past MAX_DEPTH (a typical
    A1111 body has none of these, and the walk would cost every submit)."""
    return (
        b"NaN" in raw
        or b"Infinity" in raw
        or raw.count(b"{") + raw.count(b"[") > MAX_DEPTH
        or _may_hold_surrogates(raw)
    )


def _may_hold_surrogates(raw: bytes) -> bool:
    """Only a `\\uD800`-`\\uDFFF` escape makes a surrogate (raw bytes are valid UTF-8)."""
    return _SURROGATE_ESCAPE.search(raw) is not None


def unstorable(
    value: Any, *, surrogates: bool = True, limit: int = MAX_DEPTH
) -> tuple[list[str | int], str] | None:
    """Where `value` holds what JSON cannot store and show again, and why; None if nowhere."""
    stack: list[tuple[Any, list[str | int]]] = [(value, [])]
    while stack:
        item, path = stack.pop()
        if len(path) > limit:
            return path, f"nested deeper than {limit} levels; send a flatter body"
        if isinstance(item, float) and not math.isfinite(item):
            return path, f"{item} is not a JSON number (NaN and Infinity are refused)"
        if surrogates and isinstance(item, str) and _lone_surrogate(item):
            return path, "holds a lone surrogate (\\ud800-\\udfff), which is not valid Unicode"
        if isinstance(item, dict):
            for key, sub in item.items():
                if surrogates and _lone_surrogate(key):
                    shown = key.encode("utf-8", "backslashreplace").decode()  # answerable
                    return [*path, shown], "the key holds a lone surrogate (not valid Unicode)"
                stack.append((sub, [*path, key]))
        elif isinstance(item, list):
            stack.extend((sub, [*path, i]) for i, sub in enumerate(item))
    return None


def _lone_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def choice(request: Request, name: str, allowed: Collection[str]) -> str | None:
    """The query parameter `name`, one of `allowed` (None when absent; 422 otherwise)."""
    value = request.query_params.get(name)
    if value is None or value in allowed:
        return value
    raise InvalidRequest(
        [{"loc": ["query", name], "msg": f"must be one of {', '.join(allowed)}", "type": "enum"}]
    )


@overload
def int_param(request: Request, name: str, *, default: int, low: int, high: int) -> int: ...


@overload
def int_param(request: Request, name: str, *, default: None, low: int, high: int) -> int | None: ...


def int_param(
    request: Request, name: str, *, default: int | None, low: int, high: int
) -> int | None:
    """The query parameter `name`, a whole number from `low` to `high` (`default` when absent;
    422 otherwise)."""
    value = request.query_params.get(name)
    if value is None:
        return default
    if value.isdigit() and low <= int(value) <= high:
        return int(value)
    raise InvalidRequest(
        [
            {
                "loc": ["query", name],
                "msg": f"must be a whole number from {low} to {high}",
                "type": "int_parsing",
            }
        ]
    )


def text_param(request: Request, name: str, max_length: int) -> str | None:
    """The query parameter `name`, stripped (None when absent or blank; 422 when longer than
    `max_length` characters)."""
    value = (request.query_params.get(name) or "").strip()
    if len(value) > max_length:
        raise InvalidRequest(
            [
                {
                    "loc": ["query", name],
                    "msg": f"must be at most {max_length} characters",
                    "type": "string_too_long",
                }
            ]
        )
    return value or None


def bool_param(request: Request, name: str, *, default: bool) -> bool:
    """The query parameter `name` as a yes or no: `default` when absent or not a word it knows;
    true/1/yes/on and false/0/no/off, in any case, say otherwise."""
    value = request.query_params.get(name)
    if value is None:
        return default
    word = value.strip().lower()
    return word not in FALSE_WORDS if default else word in TRUE_WORDS
