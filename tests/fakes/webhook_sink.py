"""A webhook receiver: a real HTTP app that records every request it gets.

It answers 200 unless a test scripts otherwise: `answer(500)`, `answer(429, headers=...)`,
`answer(302, headers={"location": ...})`, `hang()` (never answers), `drop()` (cuts the connection
in the middle of its answer), `always(500)`, or `flaky(rng, rate, most)` (fails about `rate` of
the requests, with 500 or a cut connection, but never one message more than `most` times).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from standardwebhooks.webhooks import Webhook
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float
    answered: int | None = None  # the status sent in full; None: dropped, or still hanging

    def verify(self, secret: str | bytes) -> Any:
        """The payload, if the signature verifies under `secret` (raises otherwise)."""
        return Webhook(secret).verify(self.body, self.headers)


@dataclass(frozen=True)
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: str = "ok"
    hang: bool = False
    drop: bool = False


class Dropped(Response):
    """An answer cut off after its headers: the connection closes with the body unsent, so
    the sender reads no complete answer (it cannot tell whether the message was handled)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"content-length", b"64"), (b"content-type", b"text/plain")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        # Returning without the body: the server closes the connection.


class WebhookSink:
    def __init__(self) -> None:
        self.received: list[Received] = []
        self._script: list[Reply] = []
        self._default = Reply()
        self._flaky: tuple[random.Random, float, int] | None = None
        self._failed: Counter[str] = Counter()  # failures per webhook-id, for `flaky`
        self._slow = 0.0
        self.app = Starlette(routes=[Route("/{path:path}", self._receive, methods=["POST"])])

    def answer(
        self, status: int, *, times: int = 1, headers: dict[str, str] | None = None, body: str = ""
    ) -> None:
        self._script += [Reply(status, headers or {}, body)] * times

    def hang(self, times: int = 1) -> None:
        self._script += [Reply(hang=True)] * times

    def drop(self, times: int = 1) -> None:
        self._script += [Reply(drop=True)] * times

    def always(self, status: int = 200, *, hang: bool = False) -> None:
        self._default = Reply(status, hang=hang)

    def flaky(self, rng: random.Random, rate: float, most: int, slow: float = 0.0) -> None:
        """Unscripted requests fail with probability `rate` (a 500 or a dropped connection, half
        and half), each message (webhook-id) at most `most` times, so every one gets through;
        each answer takes up to `slow` seconds."""
        self._flaky = (rng, rate, most)
        self._slow = slow

    def at(self, path: str) -> list[Received]:
        return [r for r in self.received if r.path == path]

    def delivered(self, path: str) -> list[Received]:
        """What reached `path` and was answered with a 2xx."""
        return [r for r in self.at(path) if r.answered is not None and 200 <= r.answered < 300]

    async def _receive(self, request: Request) -> Response:
        body = await request.body()
        reply = self._reply(request.headers.get("webhook-id", ""))
        answered = None if reply.hang or reply.drop else reply.status
        self.received.append(
            Received(
                path=request.url.path,
                headers=dict(request.headers),
                body=body,
                at=time.time(),
                answered=answered,
            )
        )
        if reply.hang:
            await asyncio.sleep(3600)  # the sender's timeout ends this
        if self._flaky is not None and self._slow:
            await asyncio.sleep(self._flaky[0].uniform(0, self._slow))
        if reply.drop:
            return Dropped()
        return Response(reply.body, status_code=reply.status, headers=reply.headers)

    def _reply(self, message_id: str) -> Reply:
        if self._script:
            return self._script.pop(0)
        if self._flaky is None:
            return self._default
        rng, rate, most = self._flaky
        if self._failed[message_id] >= most or rng.random() >= rate:
            return self._default
        self._failed[message_id] += 1
        return Reply(500, body="flaky") if rng.random() < 0.5 else Reply(drop=True)
