"""ASGI middleware: bearer/basic token auth (who calls, in which role) and the body limit."""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Iterable
from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from a1111_proxy.errors import BodyTooLarge, a1111_error

# /metrics is not open: it names the backends and shows the load (Prometheus sends an admin
# token with `authorization: {credentials: ...}` in its scrape config). /health answers anyone,
# and shows its details only to an admin. The web UI's page and assets (/ui, and / that
# redirects there) hold no data: its script sends the token on the API calls it makes.
OPEN_PATHS = ("/health", "/ready", "/doc", "/openapi.json", "/ui")


@dataclass(frozen=True, slots=True)
class Caller:
    """Who calls: `tenant` owns the jobs it submits (the token's name, or with tokens off the
    client's address); an `admin` sees every tenant's jobs and changes what all share."""

    tenant: str
    admin: bool = False


class TokenAuth:
    """`Authorization: Bearer <token>`, or HTTP Basic with the token as the password (so A1111
    clients configured for `--api-auth` work). Tokens are compared in constant time.

    Puts the caller on the request (`request.state.caller`, read with `routes.context.caller`):
    the tenant the token names and whether it is an admin token, or with tokens off the
    client's address as an admin (a loopback-only server has one user). A1111's global routes
    (/progress, /interrupt, /skip) act on that caller's jobs only. An open path takes a token
    when one is presented (an admin's /health shows details) and no caller otherwise."""

    def __init__(self, app: ASGIApp, tokens: Iterable[tuple[str, str, bool]]) -> None:
        self.app = app
        self.tokens = [(Caller(name, admin), token.encode()) for name, token, admin in tokens]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not self.tokens:
            _set_caller(scope, Caller(_client_address(scope), admin=True))
            await self.app(scope, receive, send)
            return
        presented = _presented_token(Headers(scope=scope).get("authorization"))
        found = self._caller(presented) if presented is not None else None
        if found is not None:
            _set_caller(scope, found)
        if found is not None or _is_open(scope["path"]):
            await self.app(scope, receive, send)
            return
        detail = "Not authenticated" if presented is None else "Incorrect username or password"
        response = a1111_error(
            401,
            "HTTPException",
            detail,
            "not_authenticated",
            {"WWW-Authenticate": 'Bearer realm="a1111-proxy", Basic realm="a1111-proxy"'},
        )
        await response(scope, receive, send)

    def _caller(self, presented: bytes) -> Caller | None:
        # Compare against every token so the time taken does not tell which one matched.
        found = None
        for who, token in self.tokens:
            if hmac.compare_digest(presented, token):
                found = who
        return found


def _set_caller(scope: Scope, who: Caller) -> None:
    scope.setdefault("state", {})["caller"] = who


def _client_address(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "local"  # no address: a Unix socket


def _is_open(path: str) -> bool:
    return path == "/" or any(path == p or path.startswith(p + "/") for p in OPEN_PATHS)


def _presented_token(header: str | None) -> bytes | None:
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    scheme = scheme.lower()
    if scheme == "bearer":
        return value.strip().encode()
    if scheme == "basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True)
        except (binascii.Error, ValueError):
            return b""
        return decoded.partition(b":")[2]
    return b""


class BodyLimit:
    """Refuse request bodies over `max_bytes` with 413, whether announced or streamed."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await _too_large(self.max_bytes)(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise BodyTooLarge(_too_large_text(self.max_bytes))
            return message

        await self.app(scope, counting_receive, send)


def _too_large_text(max_bytes: int) -> str:
    return (
        f"The request body is larger than {max_bytes} bytes. Send smaller images, or raise "
        "A1111_PROXY_MAX_BODY_BYTES."
    )


def _too_large(max_bytes: int) -> JSONResponse:
    return a1111_error(413, "HTTPException", _too_large_text(max_bytes), "body_too_large")
