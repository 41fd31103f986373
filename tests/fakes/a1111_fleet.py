"""Many cheap fake A1111s in one process: one port each, one asyncio event loop for all of them.

Each `FleetMember` answers what a worker asks of an A1111 (txt2img and img2img after the service
time, `/progress` with a live preview, `/interrupt`, `/skip`, `/options` and the catalogue
lists) over a bare HTTP/1.1 responder on asyncio streams: about a tenth of a millisecond of CPU a
request, so that 64 of them and their progress polls cost the machine little beside the proxy.
The full fake (`tests/fakes/a1111.py`) is the one to script failures with; this one only counts.

Like A1111, a member runs one generation at a time (a second request waits for the first). It
records each generation's wall-clock interval and the most generation requests it ever held at
once: more than one means two jobs were sent to the same backend together, which the claim path
must never do. `GET /fake/report` answers both. Run it standalone with
`python -m tests.fakes.a1111_fleet --count 64 --service-time 2 --ports-file ports.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from a1111_proxy.backends.fake import tiny_png
from tests.fakes.a1111 import IDLE_STATE, FakeA1111

_REFERENCE = FakeA1111()  # the catalogue a fresh A1111 answers, as the full fake has it
CATALOGUE: dict[str, Any] = {
    "sd-models": _REFERENCE.models,
    "options": _REFERENCE.options,
    **_REFERENCE.catalogue,
}
IMAGE = base64.b64encode(tiny_png("fleet")).decode()
PREVIEW = base64.b64encode(tiny_png("preview", 4)).decode()
REASONS = {200: "OK", 404: "Not Found", 400: "Bad Request"}


@dataclass
class FleetMember:
    """One fake A1111: its generations, one at a time, and what it recorded."""

    service_time: float
    name: str = "fleet"
    runs: list[tuple[float, float]] = field(default_factory=list)  # wall-clock start, end
    in_flight: int = 0  # generation requests being answered now
    max_in_flight: int = 0
    requests: int = 0
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _current: tuple[float, float, int] | None = None  # monotonic start, duration, steps

    def report(self) -> dict[str, Any]:
        return {"runs": self.runs, "max_in_flight": self.max_in_flight, "requests": self.requests}

    async def answer(self, method: str, path: str, query: str, body: bytes) -> tuple[int, Any]:
        """(status, JSON body) for one request."""
        self.requests += 1
        route = path.removeprefix("/sdapi/v1/")
        if method == "POST" and route in ("txt2img", "img2img"):
            return 200, await self._generate(json.loads(body or b"{}"))
        if route == "progress":
            return 200, self._progress(with_image="skip_current_image=false" in query)
        if method == "POST" and route in ("interrupt", "skip", "options"):
            return 200, {}
        if path == "/fake/report":
            return 200, self.report()
        if method == "GET" and route in CATALOGUE:
            return 200, CATALOGUE[route]
        return 404, {"detail": "Not Found"}

    async def _generate(self, body: dict[str, Any]) -> dict[str, Any]:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            async with self._lock:
                duration = float(body.get("fake_seconds", self.service_time))
                start = time.time()
                self._current = (time.monotonic(), duration, int(body.get("steps") or 20))
                try:
                    await asyncio.sleep(duration)
                finally:
                    self._current = None
                    self.runs.append((start, time.time()))
        finally:
            self.in_flight -= 1
        info = {"prompt": body.get("prompt", ""), "seed": 1, "all_seeds": [1], "infotexts": [""]}
        return {"images": [IMAGE], "parameters": body, "info": json.dumps(info)}

    def _progress(self, with_image: bool) -> dict[str, Any]:
        if self._current is None:
            return {
                "progress": 0.0,
                "eta_relative": 0.0,
                "state": IDLE_STATE,
                "current_image": None,
            }
        started, duration, steps = self._current
        elapsed = time.monotonic() - started
        fraction = min(1.0, elapsed / duration) if duration > 0 else 1.0
        progress = min(1.0, 0.01 + fraction)
        state = {**IDLE_STATE, "job_count": 1, "sampling_step": int(fraction * steps)}
        return {
            "progress": progress,
            "eta_relative": elapsed / progress - elapsed,
            "state": {**state, "sampling_steps": steps},
            "current_image": PREVIEW if with_image else None,
        }

    async def serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """HTTP/1.1 with keep-alive; bodies by Content-Length (what httpx sends)."""
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                method, target, headers = _parse_head(head)
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                path, _, query = target.partition("?")
                status, answer = await self.answer(method, path, query, body)
                writer.write(_response(status, answer))
                await writer.drain()
        writer.close()


def _parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return method, target, headers


def _response(status: int, answer: Any) -> bytes:
    data = json.dumps(answer).encode()
    head = (
        f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(data)}\r\n\r\n"
    )
    return head.encode() + data


@contextlib.asynccontextmanager
async def fleet(count: int, service_time: float) -> AsyncIterator[list[tuple[str, FleetMember]]]:
    """`count` members listening on loopback (ephemeral ports) in the running loop: (URL, member)
    pairs, closed when the block ends."""
    members = [FleetMember(service_time, name=f"fleet{i}") for i in range(count)]
    servers = [
        await asyncio.start_server(member.serve_connection, "127.0.0.1", 0) for member in members
    ]
    try:
        urls = [f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}" for server in servers]
        yield list(zip(urls, members, strict=True))
    finally:
        for server in servers:
            server.close()
        for server in servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1)


async def _main(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with fleet(args.count, args.service_time) as members:
        ports = Path(args.ports_file)
        ports.with_suffix(".tmp").write_text(json.dumps([url for url, _ in members]))
        ports.with_suffix(".tmp").replace(ports)  # whole, or not there yet
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--service-time", type=float, default=2.0)
    parser.add_argument("--ports-file", required=True, help="where the URLs are written (JSON)")
    asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()
