"""A fake AUTOMATIC1111 server: a real HTTP app that behaves like A1111's API where we use it.

Like A1111 it runs one generation at a time (others wait in FIFO order), reports `/progress`
globally, and stops the running generation on `/interrupt`, answering 200 with what it has: the
images of the batches it finished and of the one it was on (A1111's sampler returns its last
latent when interrupted, and that is decoded and returned like a finished image). Tests tell it
to fail, hang or answer garbage, to ignore `/interrupt` (`ignores_interrupt`, as an A1111 stuck in
an extension or a model load does), to require `--api-auth` credentials (`api_auth`), and read
what it received. Run it standalone with
`python -m tests.fakes.a1111 --port 7860 --service-time 0.2`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from a1111_proxy.backends.fake import tiny_png

MODELS = [
    {
        "title": "v1-5-pruned-emaonly.safetensors [6ce0161689]",
        "model_name": "v1-5-pruned-emaonly",
        "hash": "6ce0161689",
        "sha256": "6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa",
        "filename": "/models/Stable-diffusion/v1-5-pruned-emaonly.safetensors",
        "config": None,
    },
    {
        "title": "SDXL/juggernautXL_v9.safetensors [c9e3e68f89]",
        "model_name": "SDXL_juggernautXL_v9",
        "hash": "c9e3e68f89",
        "sha256": "c9e3e68f89b8e38689e1097d4be4573cf308de4e3fd044c64ca697bdb4aa8bca",
        "filename": "/models/Stable-diffusion/SDXL/juggernautXL_v9.safetensors",
        "config": None,
    },
]
NEW_MODEL = {
    "title": "dreamshaper_8.safetensors [879db523c3]",
    "model_name": "dreamshaper_8",
    "hash": "879db523c3",
    "sha256": "879db523c30d3b9017143d56705015e15a2cb5628762c11d086fed9538abd7fd",
    "filename": "/models/Stable-diffusion/dreamshaper_8.safetensors",
    "config": None,
}

# What A1111 v1.10 answers on /sdapi/v1/latent-upscale-modes (shared.latent_upscale_modes).
LATENT_UPSCALE_MODES = [
    "Latent",
    "Latent (antialiased)",
    "Latent (bicubic)",
    "Latent (bicubic antialiased)",
    "Latent (nearest)",
    "Latent (nearest-exact)",
]

IDLE_STATE = {
    "skipped": False,
    "interrupted": False,
    "stopping_generation": False,
    "job": "",
    "job_count": 0,
    "job_timestamp": "0",
    "job_no": 0,
    "sampling_step": 0,
    "sampling_steps": 0,
}


@dataclass
class Generation:
    number: int
    kind: str
    steps: int
    started: float
    duration: float
    interrupted: bool = False
    ended: asyncio.Event = field(default_factory=asyncio.Event)  # interrupted or finished early
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop)

    def fraction(self) -> float:
        if self.duration <= 0:
            return 1.0
        return min(1.0, (time.monotonic() - self.started) / self.duration)

    def end(self) -> None:
        """End it now, from any thread (the fake runs in its server's thread)."""
        self.loop.call_soon_threadsafe(self.ended.set)


@dataclass
class Received:
    path: str
    body: Any
    at: float


class FakeA1111:
    """The fake's state and knobs; `app` is the ASGI application."""

    def __init__(
        self, service_time: float = 0.05, name: str = "fake", api_auth: str | None = None
    ) -> None:
        self.service_time = service_time
        self.name = name
        # `user:password` pairs, comma-separated, as A1111's --api-auth takes them: its /sdapi
        # routes then answer 401 without one of them (HTTP Basic).
        self.api_auth = api_auth
        self.refused: list[str] = []  # paths answered 401
        # True: /interrupt answers {} but the generation runs on (an A1111 that does not stop).
        self.ignores_interrupt = False
        self.received: list[Received] = []
        self.completed: list[dict[str, Any]] = []  # generations that ran to the end
        self.interrupts = 0
        self._plan: list[tuple[str, Any]] = []
        self._numbers = itertools.count(1)
        self._lock: asyncio.Lock | None = None
        self.current: Generation | None = None
        self.skips = 0
        self.in_flight = 0  # generation requests being answered now (A1111 runs one at a time)
        self.max_in_flight = 0
        self.models = [dict(m) for m in MODELS]
        self.options: dict[str, Any] = {
            "sd_model_checkpoint": self.models[0]["title"],
            "sd_checkpoint_hash": self.models[0]["sha256"],
            "samples_format": "png",
            "CLIP_stop_at_last_layers": 1,
            "live_previews_enable": True,
        }
        self.options_posted: list[dict[str, Any]] = []
        self.catalogue: dict[str, Any] = {
            "loras": [
                {
                    "name": "add_detail",
                    "alias": "add_detail",
                    "path": "/models/Lora/add_detail.safetensors",
                    "metadata": {"ss_output_name": "add_detail"},
                }
            ],
            "samplers": [
                {"name": "Euler a", "aliases": ["k_euler_a"], "options": {}},
                {"name": "DPM++ 2M", "aliases": ["k_dpmpp_2m"], "options": {}},
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
                {
                    "name": "Lanczos",
                    "model_name": None,
                    "model_path": None,
                    "model_url": None,
                    "scale": 4,
                }
            ],
            "latent-upscale-modes": [{"name": name} for name in LATENT_UPSCALE_MODES],
            "sd-vae": [],  # A1111 lists the files in models/VAE; tests add some
            "scripts": {"txt2img": ["x/y/z plot", "controlnet m2m"], "img2img": ["x/y/z plot"]},
            "cmd-flags": {
                "api": True,
                "api_auth": "user:hunter2",
                "gradio_auth": None,
                "port": 7860,
            },
            # The rest of A1111 v1.10's lists, as a fresh install answers them.
            "hypernetworks": [],
            "realesrgan-models": [],
            "prompt-styles": [],
            "face-restorers": [{"name": "CodeFormer", "cmd_dir": None}],
            "embeddings": {"loaded": {}, "skipped": {}},
            "script-info": [],
            "extensions": [],
        }
        # The checkpoint's place: A1111 loads it on demand when a generation needs it.
        self.loaded = True
        self.timeline: list[str] = []  # unload-checkpoint, reload-checkpoint, load, txt2img...
        self.checkpoint_calls_while_generating = 0  # A1111 would crash; the proxy never does it
        control = [
            Route("/sdapi/v1/txt2img", self._generate, methods=["POST"]),
            Route("/sdapi/v1/img2img", self._generate, methods=["POST"]),
            Route("/sdapi/v1/progress", self._progress, methods=["GET"]),
            Route("/sdapi/v1/interrupt", self._interrupt, methods=["POST"]),
            Route("/sdapi/v1/skip", self._skip, methods=["POST"]),
            Route("/sdapi/v1/sd-models", self._sd_models, methods=["GET"]),
            Route("/sdapi/v1/options", self._get_options, methods=["GET"]),
            Route("/sdapi/v1/options", self._set_options, methods=["POST"]),
            Route("/sdapi/v1/refresh-checkpoints", self._refresh, methods=["POST"]),
            *(
                Route(f"/sdapi/v1/refresh-{what}", self._refresh_other, methods=["POST"])
                for what in ("loras", "vae", "embeddings")
            ),
            Route("/sdapi/v1/unload-checkpoint", self._checkpoint, methods=["POST"]),
            Route("/sdapi/v1/reload-checkpoint", self._checkpoint, methods=["POST"]),
            Route("/sdapi/v1/memory", self._memory, methods=["GET"]),
            Route("/sdapi/v1/interrogate", self._interrogate, methods=["POST"]),
            Route("/sdapi/v1/extra-single-image", self._extra, methods=["POST"]),
            Route("/sdapi/v1/extra-batch-images", self._extra_batch, methods=["POST"]),
            Route("/controlnet/model_list", self._cn_models, methods=["GET"]),
            Route("/controlnet/detect", self._cn_detect, methods=["POST"]),
        ]
        listed = [
            Route(f"/sdapi/v1/{name}", self._listed, methods=["GET"]) for name in self.catalogue
        ]
        self.routes = Starlette(routes=control + listed)

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            await self._serve(scope, receive, send)

        self.app = app  # a plain function, as servers expect an ASGI app to be

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The routes, behind --api-auth's check when `api_auth` is set."""
        refusal = self._auth_refusal(scope)
        if refusal is not None:
            self.refused.append(scope["path"])
            await refusal(scope, receive, send)
            return
        await self.routes(scope, receive, send)

    def _auth_refusal(self, scope: Scope) -> Response | None:
        """A1111's 401 (its error shape, and no WWW-Authenticate) for a request to a route that
        --api-auth guards without one of its pairs; None when it may pass. A1111 guards the routes
        its API registers; the Lora extension's and other extensions' (/controlnet) are open."""
        if not self.api_auth or scope["type"] != "http" or not _guarded(scope["path"]):
            return None
        header = Headers(scope=scope).get("authorization", "")
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return _a1111_401("Not authenticated")
        try:
            given = base64.b64decode(encoded, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return _a1111_401("Invalid authentication credentials")
        if given not in self.api_auth.split(","):
            return _a1111_401("Incorrect username or password")
        return None

    # --- knobs ----------------------------------------------------------------------------

    def fail_next(self, n: int = 1, status: int = 503, body: Any = None) -> None:
        """The next `n` generation requests answer `status` at once (A1111's error shape by
        default for 4xx/500, a gateway's text for 502-504)."""
        self._plan += [("fail", (status, body))] * n

    def hang_next(self, n: int = 1) -> None:
        """The next `n` generation requests never answer."""
        self._plan += [("hang", None)] * n

    def garbage_next(self, n: int = 1) -> None:
        """The next `n` generation requests answer 200 with a body that is not JSON."""
        self._plan += [("garbage", None)] * n

    def finish_current(self) -> None:
        """The running generation ends now with its whole answer (from the test's thread)."""
        if self.current is not None:
            self.current.end()

    def generation_requests(self) -> list[Received]:
        return [r for r in self.received if r.path.endswith(("txt2img", "img2img"))]

    # --- routes ---------------------------------------------------------------------------

    async def _generate(self, request: Request) -> Response:
        kind = request.url.path.rsplit("/", 1)[-1]
        body = await request.json()
        self.received.append(Received(request.url.path, body, time.time()))
        action, arg = self._plan.pop(0) if self._plan else ("ok", None)
        if action == "fail":
            return _failure(*arg)
        if action == "hang":
            await asyncio.Event().wait()
        if action == "garbage":
            return Response(b"<html>502 Bad Gateway? no, just garbage", media_type="text/html")
        if self._lock is None:
            self._lock = asyncio.Lock()
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            async with self._lock:
                return await self._run(kind, body)
        finally:
            self.in_flight -= 1

    async def _run(self, kind: str, body: dict[str, Any]) -> Response:
        if not self.loaded:
            self.loaded = True
            self.timeline.append("load")
        self.timeline.append(kind)
        number = next(self._numbers)
        steps = int(body.get("steps") or 20)
        duration = float(body.get("fake_seconds", self.service_time))
        gen = Generation(number, kind, steps, time.monotonic(), duration)
        self.current = gen
        try:
            try:
                await asyncio.wait_for(gen.ended.wait(), duration)
            except TimeoutError:
                pass
            reached = gen.fraction()
        finally:
            self.current = None
        interrupted = gen.interrupted
        seed = int(body.get("seed", -1)) if str(body.get("seed", -1)).lstrip("-").isdigit() else -1
        seed = seed if seed != -1 else 1000 + number
        size, iterations = int(body.get("batch_size") or 1), int(body.get("n_iter") or 1)
        batch = size * iterations
        # Interrupted, A1111 skips the iterations it had not begun and returns the images of the
        # ones it finished and of the one it was on (denoised as far as it got).
        count = size * min(iterations, int(reached * iterations) + 1) if interrupted else batch
        infotexts = [
            f"{body.get('prompt', '')}\nSteps: {steps}, Seed: {seed + i}, "
            f"fake: {self.name}#{number}"
            for i in range(count)
        ]
        result = {
            "images": [base64.b64encode(tiny_png(text)).decode() for text in infotexts],
            "parameters": body,
            "info": json.dumps(
                {
                    "prompt": body.get("prompt", ""),
                    "seed": seed,
                    "sd_model_name": self._model_for(body),
                    "all_seeds": [seed + i for i in range(batch)],
                    "width": body.get("width", 512),
                    "height": body.get("height", 512),
                    "infotexts": infotexts,
                    "fake_generation": number,
                }
            ),
        }
        if not interrupted:
            self.completed.append({"number": number, "kind": kind, "body": body})
        return JSONResponse(result)

    def _model_for(self, body: dict[str, Any]) -> str:
        override = (body.get("override_settings") or {}).get("sd_model_checkpoint")
        return str(override or self.options["sd_model_checkpoint"])

    async def _progress(self, request: Request) -> Response:
        gen = self.current
        if gen is None:
            return JSONResponse(
                {
                    "progress": 0.0,
                    "eta_relative": 0.0,
                    "state": IDLE_STATE,
                    "current_image": None,
                    "textinfo": None,
                }
            )
        fraction = gen.fraction()
        step = int(fraction * gen.steps)
        elapsed = time.monotonic() - gen.started
        progress = min(1.0, 0.01 + fraction)
        state = {
            **IDLE_STATE,
            "job": f"scripts_{gen.kind}",
            "job_count": 1,
            "sampling_step": step,
            "sampling_steps": gen.steps,
            "interrupted": gen.interrupted,
        }
        skip_image = request.query_params.get("skip_current_image", "false") == "true"
        preview = None if skip_image else base64.b64encode(tiny_png(f"preview {step}", 4)).decode()
        return JSONResponse(
            {
                "progress": progress,
                "eta_relative": elapsed / progress - elapsed,
                "state": state,
                "current_image": preview,
                "textinfo": None,
            }
        )

    async def _interrupt(self, request: Request) -> Response:
        self.interrupts += 1
        gen = self.current
        if gen is not None and not self.ignores_interrupt:
            gen.interrupted = True
            gen.ended.set()
        return JSONResponse({})

    async def _skip(self, request: Request) -> Response:
        self.skips += 1
        return JSONResponse(None)

    async def _sd_models(self, request: Request) -> Response:
        return JSONResponse(self.models)

    async def _listed(self, request: Request) -> Response:
        return JSONResponse(self.catalogue[request.url.path.rsplit("/", 1)[-1]])

    async def _get_options(self, request: Request) -> Response:
        return JSONResponse(self.options)

    async def _set_options(self, request: Request) -> Response:
        body = await request.json()
        self.options_posted.append(body)
        self.options.update(body)
        return JSONResponse(None)

    async def _refresh(self, request: Request) -> Response:
        if NEW_MODEL not in self.models:
            self.models.append(dict(NEW_MODEL))
        return JSONResponse(None)

    async def _refresh_other(self, request: Request) -> Response:
        self.received.append(Received(request.url.path, None, time.time()))
        return JSONResponse(None)

    async def _checkpoint(self, request: Request) -> Response:
        """A1111's unloadapi/reloadapi: `{}` once the model is off (back on) the GPU."""
        raw = await request.body()
        body = json.loads(raw) if raw else None
        self.received.append(Received(request.url.path, body, time.time()))
        what = request.url.path.rsplit("/", 1)[-1]
        self.timeline.append(what)
        if self.current is not None or self.in_flight:
            self.checkpoint_calls_while_generating += 1
        self.loaded = what == "reload-checkpoint"
        return JSONResponse({})

    async def _memory(self, request: Request) -> Response:
        """A1111's get_memory shape; the model's 2 GiB are allocated while it is loaded."""
        model = 2 * 2**30 if self.loaded else 0
        pair = {"current": model, "peak": 2 * 2**30}
        total = 24 * 2**30
        return JSONResponse(
            {
                "ram": {"free": 60.0 * 2**30, "used": 4 * 2**30, "total": 64.0 * 2**30},
                "cuda": {
                    "system": {
                        "free": total - model - 2**30,
                        "used": model + 2**30,
                        "total": total,
                    },
                    "active": pair,
                    "allocated": pair,
                    "reserved": pair,
                    "inactive": {"current": 0, "peak": 0},
                    "events": {"retries": 0, "oom": 0},
                },
            }
        )

    async def _interrogate(self, request: Request) -> Response:
        body = await request.json()
        self.received.append(Received(request.url.path, body, time.time()))
        return JSONResponse({"caption": f"a fake caption by {body.get('model', 'clip')}"})

    async def _extra(self, request: Request) -> Response:
        body = await request.json()
        self.received.append(Received(request.url.path, body, time.time()))
        return JSONResponse(
            {
                "html_info": "<p>upscaled</p>",
                "image": base64.b64encode(tiny_png("upscaled", 16)).decode(),
            }
        )

    async def _extra_batch(self, request: Request) -> Response:
        body = await request.json()
        self.received.append(Received(request.url.path, body, time.time()))
        image = base64.b64encode(tiny_png("upscaled", 16)).decode()
        return JSONResponse(
            {"html_info": "<p>upscaled</p>", "images": [image for _ in body.get("imageList") or []]}
        )

    async def _cn_models(self, request: Request) -> Response:
        return JSONResponse({"model_list": ["control_v11p_sd15_canny [d14c016b]"]})

    async def _cn_detect(self, request: Request) -> Response:
        body = await request.json()
        self.received.append(Received(request.url.path, body, time.time()))
        return JSONResponse(
            {"images": [base64.b64encode(tiny_png("detected")).decode()], "info": "Success"}
        )


def _guarded(path: str) -> bool:
    return path.startswith("/sdapi/") and path not in ("/sdapi/v1/loras", "/sdapi/v1/refresh-loras")


def _a1111_401(detail: str) -> Response:
    return JSONResponse(
        {"error": "HTTPException", "detail": detail, "body": "", "errors": ""}, status_code=401
    )


def _failure(status: int, body: Any) -> Response:
    if body is not None:
        return JSONResponse(body, status_code=status)
    if status in (502, 503, 504):
        return Response(f"{status} from the gateway", status_code=status, media_type="text/plain")
    return JSONResponse(
        {
            "error": "HTTPException" if status < 500 else "RuntimeError",
            "detail": "fake failure" if status < 500 else "",
            "body": "",
            "errors": "" if status < 500 else "fake failure",
        },
        status_code=status,
    )


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--service-time", type=float, default=0.2)
    args = parser.parse_args()
    fake = FakeA1111(service_time=args.service_time)
    uvicorn.run(fake.app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
