"""How the engine runs: device, precision, speed-ups, model cache (plain data, no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class EngineConfig:
    models_dir: Path
    device: str = "auto"  # auto (CUDA when present, else CPU), cpu, cuda, cuda:N
    dtype: str = "auto"  # auto (float16 on CUDA, float32 on CPU), float16, bfloat16, float32
    cached_models: int = 1  # checkpoints kept loaded
    compile: bool = False  # torch.compile the UNet (slow first run per image size)
    compile_mode: str = "default"  # torch.compile's mode: default, reduce-overhead, max-autotune...
    # Move idle components to the CPU (CUDA only): "auto" when the GPU's free memory cannot hold
    # the model plus working room (decided once, at load), "true" always, "false" never.
    cpu_offload: str = "auto"
    vae_tiling_pixels: int = 1536 * 1536  # decode larger images in tiles
    preview_steps: int = 5  # a cheap live preview every N steps (0: none)
    max_batch: int = 1  # compatible jobs run as one batch (engine/batch.py); 1: one at a time
    # Architecture -> diffusers config folder for single-file checkpoints; the package's own
    # skeletons when absent (tests point these at tiny models).
    skeletons: dict[str, Path] = field(default_factory=dict)
