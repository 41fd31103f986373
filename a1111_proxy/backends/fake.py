"""FakeBackend: a scripted backend in the worker's own process (no HTTP, no GPU).

It answers in A1111's shapes, with tiny real PNGs, for worker tests, demos and benchmarks
(`A1111_PROXY_BACKEND=fake`). Like A1111 it runs one generation at a time (others wait in FIFO
order); its progress advances with time; an interrupt ends the running generation with what it
has; a skip ends the running batch and the next one runs. A generation takes `service_time`
seconds, or the request's own `fake_seconds`. Knobs script failures and hangs, and it records
what it was asked (`calls`, bounded).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import hashlib
import itertools
import json
import struct
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

from a1111_proxy.backends.base import (
    BackendError,
    BackendProtocolError,
    BackendRejected,
    BackendUnavailable,
    Progress,
    Refresh,
)

Failure = Literal["unavailable", "rejected", "bad_response"]
GENERATIONS = frozenset({"txt2img", "img2img"})
MAX_IMAGES = 64  # per generation, whatever n_iter x batch_size asks (a fake's PNGs are tiny)

MODEL = {
    "title": "fake-model.safetensors [f4ce0f4ce0]",
    "model_name": "fake-model",
    "hash": "f4ce0f4ce0",
    "sha256": "f4ce0f4ce0" + "0" * 54,
    "filename": "/models/Stable-diffusion/fake-model.safetensors",
    "config": None,
}
CATALOGUE: dict[str, Any] = {
    "sd-models": [MODEL],
    "loras": [],
    "samplers": [
        {"name": name, "aliases": aliases, "options": {}}
        for name, aliases in (
            ("Euler a", ["k_euler_a"]),
            ("Euler", ["k_euler"]),
            ("DPM++ 2M", ["k_dpmpp_2m"]),
        )
    ],
    "schedulers": [
        {
            "name": "automatic",
            "label": "Automatic",
            "aliases": None,
            "default_rho": -1.0,
            "need_inner_model": False,
        },
        {
            "name": "karras",
            "label": "Karras",
            "aliases": None,
            "default_rho": 7.0,
            "need_inner_model": False,
        },
    ],
    "upscalers": [
        {"name": "Lanczos", "model_name": None, "model_path": None, "model_url": None, "scale": 4}
    ],
    "latent-upscale-modes": [{"name": "Latent"}, {"name": "Latent (nearest-exact)"}],
    "sd-vae": [],
    "hypernetworks": [],
    "face-restorers": [],
    "realesrgan-models": [],
    "prompt-styles": [],
    "extensions": [],
    "script-info": [],
    "scripts": {"txt2img": [], "img2img": []},
    "embeddings": {"loaded": {}, "skipped": {}},
    # As A1111 shows them (the worker redacts credentials before storing them).
    "cmd-flags": {"api": True, "api_auth": "fake:fake", "nowebui": True, "port": 7860},
}


def tiny_png(text: str, size: int = 8) -> bytes:
    """A valid PNG (size x size) with a `parameters` text chunk, as A1111 writes: a diagonal
    blend of two colours taken from `text`'s hash, so that different images look different."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    digest = hashlib.sha256(text.encode()).digest()
    start, end = digest[:3], digest[3:6]

    def pixel(x: int, y: int) -> bytes:
        t = (x + y) / max(1, 2 * size - 2)
        return bytes(round(a + (b - a) * t) for a, b in zip(start, end, strict=True))

    raw = b"".join(b"\x00" + b"".join(pixel(x, y) for x in range(size)) for y in range(size))
    return b"".join(
        [
            b"\x89PNG\r\n\x1a\n",
            chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)),
            chunk(b"tEXt", b"parameters\x00" + text.encode("latin-1", "replace")),
            chunk(b"IDAT", zlib.compress(raw)),
            chunk(b"IEND", b""),
        ]
    )


@dataclass(frozen=True)
class Call:
    """One thing the backend was asked (progress reads and catalogue fetches are not kept)."""

    method: str  # generate, interrupt, skip, apply_options, refresh, unload/reload_checkpoint
    args: tuple[Any, ...] = ()


@dataclass
class Run:
    """The running generation: `batches` batches of `seconds / batches` each."""

    number: int
    kind: str
    steps: int
    batches: int
    seconds: float
    started: float = field(default_factory=time.monotonic)
    batch: int = 0
    batch_started: float = field(default_factory=time.monotonic)
    interrupted: bool = False
    finished: bool = False  # finish_current(): the rest runs at once
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def fraction(self, now: float) -> float:
        """How far the whole generation is, 0..1."""
        per_batch = self.seconds / self.batches
        done = 1.0 if per_batch <= 0 else min(1.0, (now - self.batch_started) / per_batch)
        return (self.batch + done) / self.batches

    def start_batch(self, batch: int) -> None:
        """As A1111, a skip asked between two batches is dropped."""
        self.batch, self.batch_started = batch, time.monotonic()
        if not self.finished and not self.interrupted:
            self.wake.clear()

    async def next_batch_ends(self) -> None:
        """Wait out the current batch: its time, or an interrupt, skip or finish."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wake.wait(), self.seconds / self.batches)


class FakeBackend:
    """A scripted backend slot (see the module docstring); `name` must differ per slot."""

    def __init__(
        self, name: str = "fake", *, service_time: float = 0.05, record_limit: int = 10_000
    ) -> None:
        self.name = name
        self.service_time = service_time
        self.calls: deque[Call] = deque(maxlen=record_limit)
        self.catalogue: dict[str, Any] = copy.deepcopy(CATALOGUE)
        self.options: dict[str, Any] = {
            "sd_model_checkpoint": MODEL["title"],
            "sd_checkpoint_hash": MODEL["sha256"],
            "samples_format": "png",
            "CLIP_stop_at_last_layers": 1,
        }
        self.down = False  # every call raises BackendUnavailable, as an unreachable A1111
        self.loaded = True  # the checkpoint: loaded on demand by a generation, as A1111
        self.current: Run | None = None
        self.completed = 0  # generations that ran to their end (not interrupted)
        self.interrupts = 0
        self.skips = 0
        self.progress_reads = 0
        self.in_flight = 0  # generations asked for and not answered yet (one runs at a time)
        self.max_in_flight = 0
        self.checkpoint_calls_while_generating = 0  # the worker never makes one
        self.timeline: deque[str] = deque(maxlen=record_limit)  # load, txt2img, unload-...
        self._plan: deque[tuple[str, BackendError | None]] = deque()
        self._numbers = itertools.count(1)
        self._lock = asyncio.Lock()

    # --- knobs ----------------------------------------------------------------------------

    def fail_next(
        self,
        n: int = 1,
        kind: Failure = "unavailable",
        *,
        status: int | None = None,
        body: Any = None,
    ) -> None:
        """The next `n` generations fail at once: `unavailable` (as A1111 unreachable after the
        in-process retries; the job is re-queued), `rejected` (A1111's own error answer) or
        `bad_response` (an answer that is not A1111's)."""
        self._plan.extend(("fail", self._failure(kind, status, body)) for _ in range(n))

    def hang_next(self, n: int = 1) -> None:
        """The next `n` generations are taken and never answered, and never show as running."""
        self._plan.extend(("hang", None) for _ in range(n))

    def finish_current(self) -> None:
        """The running generation ends now, with every image (as if its time were up)."""
        if self.current is not None:
            self.current.finished = True
            self.current.wake.set()

    def generation_requests(self) -> list[dict[str, Any]]:
        """The payloads of the generations asked for, oldest first."""
        return [call.args[1] for call in self.calls if call.method == "generate"]

    # --- the Backend protocol -------------------------------------------------------------

    async def generate(self, kind: str, payload: dict[str, Any]) -> dict[str, Any]:
        self._reachable()
        self.calls.append(Call("generate", (kind, payload)))
        action, failure = self._plan.popleft() if self._plan else ("ok", None)
        if failure is not None:
            raise failure
        if action == "hang":
            await asyncio.Event().wait()
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            async with self._lock:
                if kind in GENERATIONS:
                    return await self._run(kind, payload)
                return self._other(kind, payload)
        finally:
            self.in_flight -= 1

    async def progress(self, *, with_image: bool = False) -> Progress:
        self._reachable()
        self.progress_reads += 1
        run = self.current
        if run is None:
            return Progress(progress=0.0, eta_relative=None, started=False)
        now = time.monotonic()
        fraction = run.fraction(now)
        value = min(1.0, 0.01 + fraction)  # above 0 from the start, as A1111's
        elapsed = now - run.started
        step = int((fraction * run.batches - run.batch) * run.steps)
        image = base64.b64encode(tiny_png(f"preview {step}", 4)).decode() if with_image else None
        return Progress(
            progress=value,
            eta_relative=elapsed / value - elapsed,
            started=True,
            current_image=image,
            step=step,
            steps=run.steps,
        )

    async def interrupt(self) -> None:
        self._reachable()
        self.calls.append(Call("interrupt"))
        self.interrupts += 1
        if self.current is not None:
            self.current.interrupted = True
            self.current.wake.set()

    async def skip(self) -> None:
        self._reachable()
        self.calls.append(Call("skip"))
        self.skips += 1
        if self.current is not None:
            self.current.wake.set()

    async def catalogue_entry(self, name: str) -> Any:
        self._reachable()
        if name == "options":
            return dict(self.options)
        if name == "memory":
            return self._memory()
        return copy.deepcopy(self.catalogue.get(name))

    async def apply_options(self, options: dict[str, Any]) -> None:
        self._reachable()
        self.calls.append(Call("apply_options", (dict(options),)))
        self.options.update(options)

    async def refresh(self, what: Refresh) -> None:
        self._reachable()
        self.calls.append(Call("refresh", (what,)))

    async def unload_checkpoint(self) -> None:
        self._checkpoint_call(Call("unload_checkpoint"), loaded=False)

    async def reload_checkpoint(self, checkpoint: str | None) -> None:
        """As A1111: the checkpoint it had comes back (`checkpoint` is recorded, not used)."""
        self._checkpoint_call(Call("reload_checkpoint", (checkpoint,)), loaded=True)

    async def aclose(self) -> None:
        if self.current is not None:
            self.current.interrupted = True
            self.current.wake.set()

    # --- inside ---------------------------------------------------------------------------

    async def _run(self, kind: str, payload: dict[str, Any]) -> dict[str, Any]:
        if not self.loaded:
            self.loaded = True
            self.timeline.append("load")
        self.timeline.append(kind)
        seconds = max(0.0, _number(payload.get("fake_seconds"), self.service_time))
        per_batch = max(1, min(_whole(payload.get("batch_size"), 1), MAX_IMAGES))
        batches = max(1, min(_whole(payload.get("n_iter"), 1), MAX_IMAGES // per_batch))
        run = Run(
            next(self._numbers), kind, max(1, _whole(payload.get("steps"), 20)), batches, seconds
        )
        self.current = run
        made = 0
        try:
            for batch in range(batches):
                run.start_batch(batch)
                await run.next_batch_ends()
                made += per_batch  # a skipped or interrupted batch still has its images
                if run.interrupted:
                    break
        finally:
            self.current = None
        if not run.interrupted:
            self.completed += 1
        return self._answer(run, payload, made, per_batch * batches)

    def _answer(self, run: Run, payload: dict[str, Any], made: int, asked: int) -> dict[str, Any]:
        seed = _whole(payload.get("seed"), -1)
        seed = seed if seed != -1 else 1000 + run.number
        prompt = str(payload.get("prompt", ""))
        infotexts = [
            f"{prompt}\nSteps: {run.steps}, Seed: {seed + i}, fake: {self.name}#{run.number}"
            for i in range(made)
        ]
        override = payload.get("override_settings")
        model = override.get("sd_model_checkpoint") if isinstance(override, dict) else None
        return {
            "images": [base64.b64encode(tiny_png(text)).decode() for text in infotexts],
            "parameters": payload,
            "info": json.dumps(
                {
                    "prompt": prompt,
                    "seed": seed,
                    "all_seeds": [seed + i for i in range(asked)],
                    "sd_model_name": str(model or self.options["sd_model_checkpoint"]),
                    "width": payload.get("width", 512),
                    "height": payload.get("height", 512),
                    "infotexts": infotexts,
                    "fake_generation": run.number,
                }
            ),
        }

    def _other(self, kind: str, payload: dict[str, Any]) -> dict[str, Any]:
        """What A1111's other job endpoints answer (caption, upscaled images, detect maps)."""
        image = base64.b64encode(tiny_png(kind, 16)).decode()
        if kind == "interrogate":
            return {"caption": f"a fake caption by {payload.get('model', 'clip')}"}
        if kind == "extra-single-image":
            return {"html_info": "<p>upscaled</p>", "image": image}
        if kind == "extra-batch-images":
            count = len(payload.get("imageList") or [])
            return {"html_info": "<p>upscaled</p>", "images": [image] * count}
        if kind == "controlnet-detect":
            return {"images": [image], "info": "Success"}
        raise BackendRejected(f"the fake backend {self.name} does not run {kind!r} jobs")

    def _checkpoint_call(self, call: Call, *, loaded: bool) -> None:
        self._reachable()
        self.calls.append(call)
        if self.current is not None or self.in_flight:
            self.checkpoint_calls_while_generating += 1
        self.timeline.append(call.method.replace("_", "-"))
        self.loaded = loaded

    def _memory(self) -> dict[str, Any]:
        """A1111's /memory shape; the model's 2 GiB are allocated while it is loaded."""
        model = 2 * 2**30 if self.loaded else 0
        pair = {"current": model, "peak": 2 * 2**30}
        total = 24 * 2**30
        return {
            "ram": {"free": 60.0 * 2**30, "used": 4 * 2**30, "total": 64.0 * 2**30},
            "cuda": {
                "system": {"free": total - model - 2**30, "used": model + 2**30, "total": total},
                "active": pair,
                "allocated": pair,
                "reserved": pair,
                "inactive": {"current": 0, "peak": 0},
                "events": {"retries": 0, "oom": 0},
            },
        }

    def _reachable(self) -> None:
        if self.down:
            raise BackendUnavailable(f"the fake backend {self.name} is down (its `down` knob)")

    def _failure(self, kind: Failure, status: int | None, body: Any) -> BackendError:
        if kind == "unavailable":
            status = status or 503
            return BackendUnavailable(
                f"the fake backend {self.name} is unavailable: HTTP {status} (scripted)",
                status=status,
            )
        if kind == "rejected":
            status = status or 422
            body = (
                body
                if body is not None
                else {"error": "HTTPException", "detail": "fake failure", "body": "", "errors": ""}
            )
            detail = body.get("detail") if isinstance(body, dict) else body
            return BackendRejected(
                f"the fake backend {self.name} rejected the request with HTTP {status}: {detail}",
                status=status,
                body=body,
            )
        return BackendProtocolError(
            f"the fake backend {self.name} answered with something that is not an A1111 "
            "response (scripted)",
            status=status or 200,
        )


def _whole(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _number(value: Any, default: float) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default
