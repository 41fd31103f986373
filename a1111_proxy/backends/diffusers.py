"""DiffusersBackend: the bundled engine as a backend slot (imports torch through the engine).

One slot runs one job, or one batch of compatible jobs (ENGINE_MAX_BATCH, engine/batch.py), at a
time on one device. The blocking pipeline runs in a single engine
thread, so a job that was cancelled while its thread still runs (shutdown) can never overlap the
next one. Progress comes from the engine's per-step callback; interrupt stops at the next step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

import torch

from a1111_proxy.backends.base import BackendRejected, Progress, Refresh
from a1111_proxy.backends.engine_batch import EngineBatch, JobPlace, progress_of
from a1111_proxy.engine import control, detect, device, embeddings, hires, ip_adapter, memory, vae
from a1111_proxy.engine.batch import Member, generate_batch
from a1111_proxy.engine.catalog import Catalog, Checkpoint
from a1111_proxy.engine.config import EngineConfig
from a1111_proxy.engine.controlnet import ControlNetCatalog
from a1111_proxy.engine.errors import Canceled, InvalidParams
from a1111_proxy.engine.lora import LoraCatalog
from a1111_proxy.engine.models import Models, free_memory
from a1111_proxy.engine.params import Params, problems
from a1111_proxy.engine.pipeline import RunState, generate
from a1111_proxy.engine.samplers import SAMPLERS, SCHEDULES

log = logging.getLogger("a1111_proxy.engine")


def _unexpected(exc: BaseException) -> bool:
    """Not one of the engine's own refusals: its traceback is worth keeping."""
    return not isinstance(exc, InvalidParams | Canceled | torch.cuda.OutOfMemoryError)


def _sd_model(catalog: Catalog, checkpoint: Checkpoint) -> dict[str, Any]:
    """An /sd-models entry as A1111 shows it (the hash once known; hashing is not done here)."""
    sha = catalog.known_hash(checkpoint)
    title = f"{checkpoint.name} [{sha[:10]}]" if sha else checkpoint.name
    return {
        "title": title,
        "model_name": checkpoint.model_name,
        "hash": sha[:10] if sha else None,
        "sha256": sha,
        "filename": str(checkpoint.path),
        "config": None,
    }


# A1111's schedules made from the model's own sigmas (its /sdapi/v1/schedulers "need_inner_model").
INNER_MODEL_SCHEDULES = frozenset({"uniform", "sgm_uniform", "simple", "normal", "ddim", "beta"})


class DiffusersBackend:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.models = Models(config, Catalog(config.models_dir))
        # A backend runs one job at a time across workers (by name): name this machine's GPU.
        self.name = f"diffusers:{socket.gethostname()}:{self.models.device}"
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="engine")
        self._lock = asyncio.Lock()
        self._state: RunState | None = None
        self.max_batch = config.max_batch
        self._members: list[Member] = []  # the batch running now
        self._sd_vae = vae.AUTOMATIC[0]  # POST /options' sd_vae, for jobs that send none

    async def generate(self, kind: str, payload: dict[str, Any]) -> dict[str, Any]:
        if kind not in ("txt2img", "img2img"):
            return await self._other_job(kind, payload)
        try:
            params = self._params(kind, payload)
        except InvalidParams as exc:
            raise BackendRejected(
                f"the diffusers engine refused the {kind} request: {exc}"
            ) from None
        async with self._lock:
            state = self._state = RunState()
            run = asyncio.get_running_loop().run_in_executor(self._thread, self._run, params, state)
            try:
                return await asyncio.shield(run)
            except asyncio.CancelledError:
                state.cancel.set()  # stop the thread at its next step before giving the slot up
                await asyncio.gather(run, return_exceptions=True)
                raise
            finally:
                self._state = None

    async def _other_job(self, kind: str, payload: dict[str, Any]) -> dict[str, Any]:
        """ControlNet's detect with the weight-free preprocessors; the rest is refused."""
        found = problems(kind, payload)
        if found:
            raise BackendRejected(f"the diffusers engine refused the {kind} request: {found[0]}")
        async with self._lock:
            loop = asyncio.get_running_loop()
            try:
                return await loop.run_in_executor(self._thread, detect.run, payload)
            except InvalidParams as exc:
                raise BackendRejected(
                    f"the diffusers engine refused the {kind} request: {exc}"
                ) from None

    def _run(self, params: Params, state: RunState) -> dict[str, Any]:
        try:
            return generate(self.models, self.config, params, state)
        except Exception as exc:
            raise self._refusal(params, exc) from (exc if _unexpected(exc) else None)

    def _refusal(self, params: Params, exc: BaseException) -> BackendRejected:
        """How a job's failure reads (A1111 answers 500 with the error; the job ends so)."""
        if isinstance(exc, BackendRejected):
            return exc
        if isinstance(exc, InvalidParams):
            return BackendRejected(f"the diffusers engine refused the {params.kind} request: {exc}")
        if isinstance(exc, Canceled):
            return BackendRejected("canceled while running")
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            free_memory()
            return BackendRejected(
                f"the GPU ran out of memory for {params.batch_size} image(s) of "
                f"{params.width}x{params.height} on {self.models.device}; lower batch_size or the "
                "size (or ENGINE_MAX_BATCH), or set A1111_PROXY_ENGINE_CPU_OFFLOAD=true (memory "
                "was freed)"
            )
        log.error("the diffusers engine failed", exc_info=exc)
        return BackendRejected(f"the diffusers engine failed: {type(exc).__name__}: {exc}")

    def _params(self, kind: str, payload: dict[str, Any]) -> Params:
        """The job's parameters, with POST /options' sd_vae when it names none."""
        params = Params.from_payload(kind, payload)
        if params.sd_vae is None:
            params = dataclasses.replace(params, sd_vae=self._sd_vae)
        return params

    def batch(self, jobs: list[tuple[str, dict[str, Any]]]) -> EngineBatch:
        """Start `jobs` as one batch (engine/batch.py) after the job running now; a job whose
        body the engine refuses is answered at once, the others run."""
        made = EngineBatch(self.name, len(jobs))
        loop = asyncio.get_running_loop()
        members = []
        for place, (kind, payload) in zip(made.places, jobs, strict=True):
            try:
                params = self._params(kind, payload)
            except InvalidParams as exc:
                place.answer.set_exception(
                    BackendRejected(f"the diffusers engine refused the {kind} request: {exc}")
                )
                continue
            members.append(Member(params, place.state, self._answering(loop, place, params)))
        made.task = asyncio.create_task(self._run_batch(made, members), name="engine batch")
        return made

    def _answering(
        self, loop: asyncio.AbstractEventLoop, place: JobPlace, params: Params
    ) -> Callable[[dict[str, Any] | BaseException], None]:
        """The engine thread's way to answer `place` (on the event loop)."""

        def settle(value: dict[str, Any] | BaseException) -> None:
            if place.answer.done():
                return
            if isinstance(value, BaseException):
                place.answer.set_exception(self._refusal(params, value))
            else:
                place.answer.set_result(value)

        def answer(value: dict[str, Any] | BaseException) -> None:
            loop.call_soon_threadsafe(settle, value)

        return answer

    async def _run_batch(self, made: EngineBatch, members: list[Member]) -> None:
        if not members:
            return
        async with self._lock:
            made.running, self._members = True, members
            for member in members:
                member.state.started_at = time.monotonic()
            loop = asyncio.get_running_loop()
            run = loop.run_in_executor(
                self._thread, generate_batch, self.models, self.config, members
            )
            try:
                await asyncio.shield(run)
            except asyncio.CancelledError:
                for member in members:
                    member.state.cancel.set()
                await asyncio.gather(run, return_exceptions=True)
                raise
            finally:
                self._members = []

    async def progress(self, *, with_image: bool = False) -> Progress:
        return progress_of(self._state, with_image=with_image)

    async def interrupt(self) -> None:
        state = self._state
        if state is not None:
            state.interrupt.set()

    async def skip(self) -> None:
        """As A1111: the current batch ends at the next step with what it has; the next runs."""
        state = self._state
        if state is not None:
            state.skip.set()

    async def catalogue_entry(self, name: str) -> Any:
        """The catalogue as A1111 would answer it, from MODELS_DIR and the engine's tables;
        None for what the engine lacks (hypernetworks, extensions, ...)."""
        answer = self._catalogue().get(name)
        return None if answer is None else answer()

    def _catalogue(self) -> dict[str, Callable[[], Any]]:
        """Each entry's answer, made when asked (LoRAs and ControlNets are scanned afresh)."""
        models_dir = self.config.models_dir
        return {
            "sd-models": self._sd_models,
            "samplers": lambda: [
                {"name": s.name, "aliases": list(s.aliases), "options": {}} for s in SAMPLERS
            ],
            "schedulers": lambda: [
                {
                    "name": key,
                    "label": label,
                    "aliases": ["SGMUniform"] if key == "sgm_uniform" else None,
                    "default_rho": {"karras": 7.0, "polyexponential": 1.0}.get(key, -1.0),
                    "need_inner_model": key in INNER_MODEL_SCHEDULES,
                }
                for key, label in SCHEDULES.items()
            ],
            "options": self._options,
            "upscalers": hires.upscalers,  # hires fix's image upscalers
            "latent-upscale-modes": hires.latent_upscale_modes,
            "memory": lambda: memory.report(self.models.device),
            "device": lambda: device.facts(self.models),
            "scripts": lambda: {"txt2img": [], "img2img": []},
            "loras": lambda: LoraCatalog(models_dir).entries(),
            "sd-vae": lambda: vae.entries(models_dir),
            "embeddings": self._embeddings,
            "controlnet-version": lambda: ControlNetCatalog(models_dir).version(),
            "controlnet-model_list": lambda: ControlNetCatalog(models_dir).model_list(),
            "controlnet-module_list": lambda: ControlNetCatalog(models_dir).module_list(),
        }

    def _sd_models(self) -> list[dict[str, Any]]:
        catalog = self.models.catalog
        catalog.checkpoints = catalog.scan()
        return [_sd_model(catalog, c) for c in catalog.checkpoints if not c.pickled]

    def _options(self) -> dict[str, Any]:
        first = next((c for c in self.models.catalog.checkpoints if not c.pickled), None)
        return {
            "sd_model_checkpoint": first.name if first else None,
            "samples_format": "png",
            "CLIP_stop_at_last_layers": 1,
            "sd_vae": self._sd_vae,
        }

    def _embeddings(self) -> dict[str, Any]:
        """A1111's answer for its current model: the checkpoint used last, else the default."""
        catalog = self.models.catalog
        loaded = self.models.loaded()
        try:
            current = catalog.find(loaded[-1] if loaded else None)
        except InvalidParams:  # no checkpoints: A1111 without a model loads every embedding
            return embeddings.folder(self.config.models_dir).split(None).entries()
        widths = embeddings.checkpoint_widths(current)
        return embeddings.folder(self.config.models_dir).split(widths).entries()

    async def apply_options(self, options: dict[str, Any]) -> None:
        """`sd_vae` becomes the default of jobs that send none; the checkpoint comes with each
        job (override_settings), and other options are the job's own."""
        value = options.get("sd_vae")
        if isinstance(value, str) and value:
            self._sd_vae = value

    async def refresh(self, what: Refresh) -> None:
        """Rescan MODELS_DIR (LoRAs and ControlNets are read afresh for every answer)."""
        self.models.catalog.checkpoints = self.models.catalog.scan()

    async def unload_checkpoint(self) -> None:
        """Free every loaded model, between jobs."""
        await self._in_engine(self._unload)

    async def reload_checkpoint(self, checkpoint: str | None) -> None:
        """Load `checkpoint`, else the checkpoint used last, else the first."""
        await self._in_engine(self._reload, checkpoint)

    async def _in_engine(self, action: Any, *args: Any) -> Any:
        """Run `action` on the engine thread, never beside a job."""
        async with self._lock:
            return await asyncio.get_running_loop().run_in_executor(self._thread, action, *args)

    def _unload(self) -> None:
        names = self.models.loaded()
        control.unload(self.models)
        ip_adapter.unload(self.models)
        self.models.unload_all()
        log.info("unloaded %s", ", ".join(names) or "nothing (no model was loaded)")

    def _reload(self, wanted: str | None) -> None:
        try:
            self.models.get(wanted)
        except InvalidParams as exc:
            raise BackendRejected(
                f"the diffusers engine could not reload a checkpoint: {exc}"
            ) from None

    async def aclose(self) -> None:
        state = self._state
        if state is not None:
            state.cancel.set()
        for member in self._members:
            member.state.cancel.set()
        await asyncio.get_running_loop().run_in_executor(None, self._thread.shutdown, True)
        self.models.unload_all()
