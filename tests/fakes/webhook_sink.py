"""A webhook receiver: a real HTTP app that records every request it gets.

It answers 200 unless a test scripts otherwise: `answer(500)`, `answer(429, headers=...)`,
`answer(302, headers={"location": ...})`, `hang()` (never answers), `always(500)`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from standardwebhooks.webhooks import Webhook
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    def verify(self, secret: str | bytes) -> Any:
        """The payload, if the signature verifies under `secret` (raises otherwise)."""
        return Webhook(secret).verify(self.body, self.headers)


@dataclass(frozen=True)
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: str = "ok"
    hang: bool = False


class WebhookSink:
    def __init__(self) -> None:
        self.received: list[Received] = []
        self._script: list[Reply] = []
        self._default = Reply()
        self.app = Starlette(routes=[Route("/{path:path}", self._receive, methods=["POST"])])

    def answer(
        self, status: int, *, times: int = 1, headers: dict[str, str] | None = None, body: str = ""
    ) -> None:
        self._script += [Reply(status, headers or {}, body)] * times

    def hang(self, times: int = 1) -> None:
        self._script += [Reply(hang=True)] * times

    def always(self, status: int = 200, *, hang: bool = False) -> None:
        self._default = Reply(status, hang=hang)

    def at(self, path: str) -> list[Received]:
        return [r for r in self.received if r.path == path]

    async def _receive(self, request: Request) -> Response:
        self.received.append(
            Received(
                path=request.url.path,
                headers=dict(request.headers),
                body=await request.body(),
                at=time.time(),
            )
        )
        reply = self._script.pop(0) if self._script else self._default
        if reply.hang:
            await asyncio.sleep(3600)  # the sender's timeout ends this
        return Response(reply.body, status_code=reply.status, headers=reply.headers)
