"""Errors a client can meet, and the one place they become HTTP responses.

Validation errors answer 422 `{"detail": [{"loc", "msg", "type"}]}` as A1111 (FastAPI) does;
every other error answers in A1111's own shape `{"error", "detail", "body", "errors"}`, plus a
stable `code`. The docstring of each class is its default message.
"""

from __future__ import annotations

import logging
import math
import socket
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from a1111_proxy.db.engine import unavailable, why_unavailable

log = logging.getLogger("a1111_proxy")


class ProxyError(Exception):
    """Unexpected error in a1111-proxy."""

    status_code = 500
    code = "internal_error"

    def __init__(self, message: str | None = None) -> None:
        self.message = message or (self.__doc__ or "").strip()
        super().__init__(self.message)


class JobNotFound(ProxyError):
    """No job has this id. List jobs with GET /sdapi/v1/jobs."""

    status_code = 404
    code = "job_not_found"


class ImageNotFound(ProxyError):
    """This job has no image with that index."""

    status_code = 404
    code = "image_not_found"


class ThumbnailUnavailable(ProxyError):
    """This image cannot be scaled down (it is not an image Pillow reads, or too large to
    decode); GET it without `size`."""

    status_code = 422
    code = "thumbnail_unavailable"


class DeliveryNotFound(ProxyError):
    """This job has no such webhook delivery to send again."""

    status_code = 404
    code = "delivery_not_found"


class DownloadNotFound(ProxyError):
    """No model download has this id. List them with GET /sdapi/v1/models/downloads."""

    status_code = 404
    code = "download_not_found"


class IdempotencyKeyReused(ProxyError):
    """This Idempotency-Key was already used with a different request body. Use a new key for a
    new request, or send the original body to get the original job back."""

    status_code = 422
    code = "idempotency_key_reused"


class BodyTooLarge(ProxyError):
    """The request body is larger than A1111_PROXY_MAX_BODY_BYTES allows."""

    status_code = 413
    code = "body_too_large"


class NotAuthenticated(ProxyError):
    """Not authenticated"""

    status_code = 401
    code = "not_authenticated"


class AdminOnly(ProxyError):
    """Only an admin token may do this: send one of A1111_PROXY_ADMIN_TOKENS."""

    status_code = 403
    code = "admin_only"


class TenantLimitReached(ProxyError):
    """This tenant has reached a limit set by the operator; try again after Retry-After seconds."""

    status_code = 429
    code = "tenant_limit"

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = max(1, math.ceil(retry_after))


class InvalidRequest(ProxyError):
    """The request is not valid."""

    status_code = 422
    code = "invalid_request"

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors))


class ModelNotFound(ProxyError):
    """No model has that name."""

    status_code = 404
    code = "model_not_found"


class UnknownCheckpoint(ProxyError):
    """No checkpoint has that name."""

    status_code = 422
    code = "unknown_checkpoint"


class CatalogueNotReady(ProxyError):
    """No worker has fetched the backends' model list yet: start `a1111-proxy worker` and make
    sure it reaches an A1111 (see /health)."""

    status_code = 503
    code = "catalogue_not_ready"


class UnsupportedRoute(ProxyError):
    """a1111-proxy does not offer this A1111 route."""

    status_code = 404
    code = "unsupported_route"


class ControlNetMissing(ProxyError):
    """The backends have no ControlNet extension (or no worker has looked yet)."""

    status_code = 404
    code = "controlnet_missing"


class UnknownImage(ProxyError):
    """The image could not be read."""

    status_code = 422
    code = "invalid_image"


def a1111_error(
    status_code: int, error: str, detail: Any, code: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    body = {"error": error, "detail": detail, "body": "", "errors": "", "code": code}
    return JSONResponse(body, status_code=status_code, headers=headers)


def validation_detail(
    exc: ValidationError, prefix: tuple[str, ...] = ("body",)
) -> list[dict[str, Any]]:
    return [
        {"loc": [*prefix, *err["loc"]], "msg": err["msg"], "type": err["type"]}
        for err in exc.errors(include_url=False, include_context=False, include_input=False)
    ]


async def handle_proxy_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ProxyError)
    if isinstance(exc, InvalidRequest):
        return JSONResponse({"detail": exc.errors}, status_code=422)
    headers = (
        {"WWW-Authenticate": 'Basic realm="a1111-proxy", Bearer'}
        if exc.status_code == 401
        else None
    )
    if isinstance(exc, TenantLimitReached):
        headers = {"Retry-After": str(exc.retry_after)}
    return a1111_error(exc.status_code, "HTTPException", exc.message, exc.code, headers)


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    # Starlette raises these for unknown routes (404) and wrong methods (405). `detail` keeps
    # FastAPI's text ("Not Found"), so A1111 clients read it as before; the rest is our error shape.
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return a1111_error(exc.status_code, "HTTPException", exc.detail, code, exc.headers)


DATABASE_UNAVAILABLE = (
    "the database is unavailable (the server's log says why); jobs already accepted are kept. "
    "Please retry in a few seconds"
)
DATABASE_RETRY_SECONDS = 2


async def handle_unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return a1111_error(
        500, type(exc).__name__, "internal error; see the server log", "internal_error"
    )


async def handle_database_error(request: Request, exc: Exception) -> Response:
    """503 while the database is away (a restart, a failover: db.engine.unavailable), with the
    reason in the log only (it names hosts); any other database error is a bug of ours."""
    if not unavailable(exc):
        return await handle_unexpected(request, exc)
    log.warning(
        "database unavailable on %s %s: %s",
        request.method,
        request.url.path,
        why_unavailable(exc),
    )
    headers = {"Retry-After": str(DATABASE_RETRY_SECONDS)}
    return a1111_error(
        503, "DatabaseUnavailable", DATABASE_UNAVAILABLE, "database_unavailable", headers
    )


EXCEPTION_HANDLERS = {
    ProxyError: handle_proxy_error,
    HTTPException: handle_http_exception,
    # Not under Exception: starlette re-raises what that handler answers, and the server then
    # drops the connection.
    SQLAlchemyError: handle_database_error,
    ConnectionError: handle_database_error,
    socket.gaierror: handle_database_error,
    Exception: handle_unexpected,
}
