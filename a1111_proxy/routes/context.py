"""What a route reads from its request, in one place: the lifespan's resources and the caller
(typed), a job by id, the worker's catalogue, the JSON body and query parameters.

Each request sees a shallow copy of the lifespan's `State` (ASGI's `scope["state"]`); TokenAuth
adds the `caller` to that copy. Every lookup that fails raises the error the API documents.
"""

from __future__ import annotations

import json
import time
from collections.abc import Collection
from typing import Any, TypedDict, cast, overload

from starlette.requests import Request

from a1111_proxy.availability import BackendWatch
from a1111_proxy.catalogue import CatalogueStore
from a1111_proxy.errors import CatalogueNotReady, InvalidRequest, JobNotFound
from a1111_proxy.jobs import JobRecord, JobRepository
from a1111_proxy.model_info import ModelInfoStore
from a1111_proxy.settings import Settings
from a1111_proxy.waiter import JobWaiter

TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off")


class State(TypedDict):
    """What the lifespan yields: the process's resources, shared by every request."""

    settings: Settings
    repo: JobRepository
    catalogue: CatalogueStore
    model_info: ModelInfoStore
    waiter: JobWaiter
    backends: BackendWatch
    schema_head: str


class RequestState(State, total=False):
    caller: str  # set by TokenAuth on every route it guards


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


def waiter(request: Request) -> JobWaiter:
    return request_state(request)["waiter"]


def backends(request: Request) -> BackendWatch:
    return request_state(request)["backends"]


def schema_head(request: Request) -> str:
    return request_state(request)["schema_head"]


def caller(request: Request) -> str:
    """Who is calling: the token's tenant, or the client's address when tokens are off."""
    return request_state(request)["caller"]


# --- lookups ---------------------------------------------------------------------------


async def find_job(request: Request, job_id: str) -> JobRecord:
    """The job with this id (404 JobNotFound otherwise)."""
    row = await repo(request).get(job_id)
    if row is None:
        raise JobNotFound(f"No job has the id {job_id!r}. List jobs with GET /sdapi/v1/jobs.")
    return row


async def read_catalogue(request: Request, name: str) -> tuple[Any, dict[str, str]]:
    """The worker's last fetch of `name` and an `Age` header (seconds since that fetch); None
    when the backends lack that entry. 503 (CatalogueNotReady) while no catalogue was ever
    fetched: an empty list would look like a backend without models."""
    store = catalogue(request)
    entry = await store.entry(name)
    if entry is not None:
        return entry.body, {"Age": str(max(0, int(time.time() - entry.fetched_at)))}
    if await store.ever_fetched():
        return None, {}
    outage = await backends(request).outage()
    why = outage.reason if outage is not None else "the worker has not reached a backend yet"
    raise CatalogueNotReady(
        f"No worker has fetched the backends' catalogue (models, samplers, options) yet: {why}. "
        "GET /health shows the workers and backends."
    )


# --- the body and the query ------------------------------------------------------------


async def read_json_object(request: Request) -> dict[str, Any]:
    """The body as a JSON object (422 naming the body otherwise)."""
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest(
            [{"loc": ["body"], "msg": f"the body is not valid JSON: {exc}", "type": "json_invalid"}]
        ) from None
    if not isinstance(body, dict):
        raise InvalidRequest(
            [{"loc": ["body"], "msg": "the body must be a JSON object", "type": "dict_type"}]
        )
    return body


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


def bool_param(request: Request, name: str, *, default: bool) -> bool:
    """The query parameter `name` as a yes or no: `default` when absent or not a word it knows;
    true/1/yes/on and false/0/no/off, in any case, say otherwise."""
    value = request.query_params.get(name)
    if value is None:
        return default
    word = value.strip().lower()
    return word not in FALSE_WORDS if default else word in TRUE_WORDS
