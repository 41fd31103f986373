"""Loading checkpoints into diffusers pipelines, and the small cache of loaded ones (torch).

Single-file checkpoints load with `from_single_file(config=<skeleton>)`, so nothing is fetched
from the hub; diffusers folders with `from_pretrained`. Each loaded model is placed on the device
once, with the speed-ups decided once (channels_last, SDPA by default, CPU offload); runs then
share its components. ENGINE_COMPILE compiles the UNet per size bucket as jobs need it
(engine/compiled.py).
"""

from __future__ import annotations

import gc
import inspect
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import diffusers
import torch
import transformers
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from a1111_proxy.engine.catalog import Catalog, Checkpoint, architecture
from a1111_proxy.engine.compiled import Buckets, Compiler, unet_compiler
from a1111_proxy.engine.config import EngineConfig
from a1111_proxy.engine.errors import InvalidParams
from a1111_proxy.engine.infotext import ModelInfo
from a1111_proxy.engine.precision import (
    fell_back,
    keep_latents_fp32,
    match_vae_input,
    upcast_sdxl_vae,
)
from a1111_proxy.engine.previews import Previews
from a1111_proxy.engine.skeletons import skeleton

log = logging.getLogger("a1111_proxy.engine")
diffusers.utils.logging.set_verbosity_error()
diffusers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()


@dataclass
class Loaded:
    checkpoint: Checkpoint
    architecture: str
    pipe: Any  # a StableDiffusionPipeline or StableDiffusionXLPipeline
    sha256: str | None
    buckets: Buckets | None = None  # ENGINE_COMPILE's compiled UNets (engine/compiled.py)

    @property
    def sdxl(self) -> bool:
        return self.architecture.startswith("sdxl")

    @property
    def inpainting(self) -> bool:
        return self.architecture.endswith("_inpaint")

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(self.checkpoint.stem, self.sha256[:10] if self.sha256 else None)


def pick_device(config: EngineConfig) -> torch.device:
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"A1111_PROXY_ENGINE_DEVICE={config.device} but torch sees no CUDA device"
        )
    return device


def pick_dtype(config: EngineConfig, device: torch.device) -> torch.dtype:
    if config.dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {
        "float16": torch.float16,
        "fp16": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float32": torch.float32,
        "fp32": torch.float32,
    }[config.dtype]


class Models:
    """Loaded checkpoints, least recently used dropped first. Used from one thread at a time."""

    def __init__(self, config: EngineConfig, catalog: Catalog) -> None:
        self.config = config
        self.catalog = catalog
        self.device = pick_device(config)
        self.dtype = pick_dtype(config, self.device)
        self.previews = Previews(config.models_dir, self.device, self.dtype)
        # A1111's dtype_vae: float32 once a half-precision decode made NaNs (precision.py).
        self.vae_fp32 = False
        # ENGINE_COMPILE's, per bucket, in ENGINE_COMPILE_MODE's mode (compiled.py)
        self.compiler: Compiler = unet_compiler(config.compile_mode)
        self._loaded: OrderedDict[str, Loaded] = OrderedDict()
        self._current: str | None = None
        self._lock = threading.Lock()

    def get(self, wanted: str | None) -> Loaded:
        """The checkpoint asked for; None: the one used last (A1111's current model)."""
        with self._lock:
            self._note_fp32_vae()
            name = wanted or self._current
            checkpoint = self.catalog.find(name)
            if checkpoint.name not in self._loaded:
                self._make_room()
                self._loaded[checkpoint.name] = self._load(checkpoint)
            self._loaded.move_to_end(checkpoint.name)
            self._current = checkpoint.name
            return self._loaded[checkpoint.name]

    def unload_all(self) -> None:
        """Drop every loaded model (checkpoints, preview decoders) and free their memory; the
        next job loads what it needs again (the checkpoint used last when it names none)."""
        with self._lock:
            self._loaded.clear()
            self.previews.unload()
            free_memory()

    def loaded(self) -> list[str]:
        """Names of the loaded checkpoints, least recently used first."""
        with self._lock:
            return list(self._loaded)

    def describe(self) -> list[dict[str, Any]] | str:
        """The loaded checkpoints with their parts' dtypes, least recently used first; a
        sentence instead while a model is being loaded (never waits for it)."""
        if not self._lock.acquire(timeout=0.1):
            return "busy: a checkpoint is being loaded or unloaded"
        try:
            return [_describe(loaded) for loaded in self._loaded.values()]
        finally:
            self._lock.release()

    def _note_fp32_vae(self) -> None:
        """A VAE that fell back to fp32 (precision.decode) keeps every later model's VAE fp32."""
        if any(fell_back(m.pipe.vae) for m in self._loaded.values()):
            self.vae_fp32 = True

    def _make_room(self) -> None:
        while len(self._loaded) >= max(self.config.cached_models, 1):
            name, _ = self._loaded.popitem(last=False)
            log.info("unloading %s", name)
            free_memory()

    def _load(self, checkpoint: Checkpoint) -> Loaded:
        arch = architecture(checkpoint)
        cls = StableDiffusionXLPipeline if arch.startswith("sdxl") else StableDiffusionPipeline
        log.info("loading %s (%s) on %s as %s", checkpoint.name, arch, self.device, self.dtype)
        try:
            pipe = self._from_files(cls, checkpoint, arch)
        except InvalidParams:
            raise
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise InvalidParams(
                f"cannot load checkpoint {checkpoint.name} as {arch}: {type(exc).__name__}: {exc}"
            ) from exc
        self._place(pipe, sdxl=arch.startswith("sdxl"))
        buckets = Buckets(self.compiler) if self.config.compile else None
        return Loaded(checkpoint, arch, pipe, self.catalog.sha256(checkpoint), buckets)

    def _from_files(self, cls: Any, checkpoint: Checkpoint, arch: str) -> Any:
        extra: dict[str, Any] = {}
        if not arch.startswith("sdxl"):
            extra = {
                "safety_checker": None,
                "feature_extractor": None,
                "requires_safety_checker": False,
            }
        if checkpoint.folder:
            return cls.from_pretrained(
                checkpoint.path, local_files_only=True, dtype=self.dtype, **extra
            )
        config = self.config.skeletons.get(arch) or skeleton(arch)
        return cls.from_single_file(
            str(checkpoint.path),
            config=str(config),
            local_files_only=True,
            dtype=self.dtype,
            **extra,
        )

    def _place(self, pipe: Any, *, sdxl: bool) -> None:
        pipe.set_progress_bar_config(disable=True)
        cuda = self.device.type == "cuda"
        if cuda and self._offload(pipe):
            pipe.enable_model_cpu_offload(device=self.device)
        else:
            pipe.to(self.device)
        if cuda:
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
        if self.vae_fp32:
            pipe.vae.to(dtype=torch.float32)
        elif sdxl and upcast_sdxl_vae(pipe.vae):
            log.info("the SDXL VAE runs in float32 (its config's force_upcast)")
        keep_latents_fp32(pipe.unet)
        match_vae_input(pipe.vae)

    def _offload(self, pipe: Any) -> bool:
        if self.config.cpu_offload != "auto":
            return self.config.cpu_offload == "true"
        free, _ = torch.cuda.mem_get_info(self.device)
        weights = sum(
            p.numel() * p.element_size()
            for part in pipe.components.values()
            if isinstance(part, torch.nn.Module)
            for p in part.parameters()
        )
        short = vram_is_short(weights, free)
        if short:
            log.warning(
                "model CPU offload on: %.1f GiB of weights, %.1f GiB of GPU memory free "
                "(slower; set A1111_PROXY_ENGINE_CPU_OFFLOAD=false to refuse it)",
                weights / 2**30,
                free / 2**30,
            )
        return short


def _describe(loaded: Loaded) -> dict[str, Any]:
    pipe = loaded.pipe
    parts = ("unet", "vae", "text_encoder", "text_encoder_2")
    dtypes = {
        part: str(getattr(pipe, part).dtype).removeprefix("torch.")
        for part in parts
        if getattr(pipe, part, None) is not None
    }
    return {"name": loaded.checkpoint.name, "architecture": loaded.architecture, **dtypes}


def vram_is_short(weight_bytes: int, free_bytes: int) -> bool:
    """Whether the weights plus working room for a generation (activations, the VAE decode;
    half the weights, at least 2 GiB) exceed the free GPU memory."""
    return weight_bytes + max(weight_bytes // 2, 2 * 2**30) > free_bytes


def assemble(cls: Any, components: dict[str, Any], **replaced: Any) -> Any:
    """A pipeline of class `cls` sharing `components` (no weights are copied), with `replaced`
    parts swapped in; no safety checker, no watermarker, no progress bar."""
    accepted = set(inspect.signature(cls.__init__).parameters)
    parts = {k: v for k, v in components.items() if k in accepted} | replaced
    for key in ("requires_safety_checker", "add_watermarker"):
        if key in accepted:
            parts[key] = False
    pipe = cls(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
