"""Benchmark of the bundled diffusers engine: prints figures, asserts nothing.

Runs the real DiffusersBackend (the same code path a job takes) offline on models it builds:

  tiny   the tests' tiny random-weight SD1.5 (single-file checkpoint), 64x64: measures the
         engine's own overhead per step and per image (prompt encoding, PNG, infotext).
  real   (--real) a random-weight model with real SD1.5 shapes (860M UNet) built from the shipped
         config skeleton, 512x512 - on a GPU this gives the real it/s; on a CPU it is very slow.

For each: load time, then it/s (denoising steps per second, CFG on) and per-image latency for
batch 1 and batch 4, median of a few runs after a warm-up. Uses CUDA when torch sees it
(`--device cpu` to force), fp16 there, fp32 on the CPU.

Run: `.venv/bin/python bench/engine.py [--real] [--steps 20] [--runs 3] [--device cuda]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from a1111_proxy.backends.diffusers import DiffusersBackend
from a1111_proxy.engine.config import EngineConfig


def build_tiny(root: Path) -> dict[str, Path]:
    from tests.fakes import tiny_sd

    source = tiny_sd.sd15(root / "configs" / "sd15")
    tiny_sd.write_single_file(source, root / "models" / "Stable-diffusion" / "tiny15.safetensors")
    return {"sd15": root / "configs" / "sd15"}


def build_real(root: Path, dtype: torch.dtype) -> None:
    """Real SD1.5 shapes, random weights, saved as a diffusers folder (no download)."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from a1111_proxy.engine.skeletons import skeleton

    config = skeleton("sd15")
    pipe = StableDiffusionPipeline(
        unet=UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config / "unet")),
        vae=AutoencoderKL.from_config(AutoencoderKL.load_config(config / "vae")),
        text_encoder=CLIPTextModel(CLIPTextConfig.from_pretrained(config / "text_encoder")),
        tokenizer=CLIPTokenizer.from_pretrained(config / "tokenizer"),
        scheduler=EulerDiscreteScheduler.from_pretrained(config / "scheduler"),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.to(dtype).save_pretrained(root / "models" / "Stable-diffusion" / "real15")


async def measure(backend: DiffusersBackend, label: str, size: int, steps: int, runs: int) -> None:
    body = {
        "prompt": "a lighthouse at dusk, (oil painting:1.2)",
        "negative_prompt": "blurry",
        "steps": steps,
        "width": size,
        "height": size,
        "seed": 1,
        "sampler_name": "Euler a",
    }
    started = time.perf_counter()
    await backend.generate("txt2img", {**body, "steps": 2})  # loads the model, warms up
    print(
        f"{label}: load + warm-up {time.perf_counter() - started:.2f} s "
        f"({backend.name}, {backend.models.dtype})"
    )
    for batch in (1, 4):
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            result = await backend.generate("txt2img", {**body, "batch_size": batch})
            times.append(time.perf_counter() - t)
            assert len(result["images"]) == batch and json.loads(result["info"])["seed"] == 1
        median = statistics.median(times)
        print(
            f"  {label} {size}x{size} batch {batch}, {steps} steps: {steps / median:6.2f} it/s, "
            f"{median / batch * 1000:8.1f} ms per image, {median:.3f} s per job (median of {runs})"
        )


def measure_plain_diffusers(folder: Path, device: str, steps: int, runs: int) -> None:
    """The same tiny model through a bare diffusers pipeline: the engine's overhead baseline."""
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(
        "cuda"
        if device == "auto" and torch.cuda.is_available()
        else "cpu"
        if device == "auto"
        else device
    )
    call = dict(
        prompt="a lighthouse at dusk, oil painting",
        negative_prompt="blurry",
        num_inference_steps=steps,
        height=64,
        width=64,
    )
    pipe(**{**call, "num_inference_steps": 2})
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        pipe(**call)
        times.append(time.perf_counter() - t)
    median = statistics.median(times)
    print(
        f"  plain diffusers 64x64 batch 1, {steps} steps: {steps / median:6.2f} it/s, "
        f"{median * 1000:8.1f} ms per image (baseline, no A1111 semantics, no PNG)"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--real", action="store_true", help="also a real-size SD1.5 at 512x512")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, CUDA: "
        f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}, "
        f"{torch.get_num_threads()} CPU threads, load average {os.getloadavg()[0]:.1f}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        skeletons = build_tiny(root)
        backend = DiffusersBackend(
            EngineConfig(
                models_dir=root / "models",
                device=args.device,
                skeletons=skeletons,
                compile=args.compile,
                preview_steps=5,
            )
        )
        try:
            await measure(backend, "tiny", 64, args.steps, args.runs)
            measure_plain_diffusers(skeletons["sd15"], args.device, args.steps, args.runs)
            if args.real:
                build_real(root, backend.models.dtype)
                backend.models.catalog.checkpoints = backend.models.catalog.scan()
                backend.models.unload_all()
                backend.models._current = "real15"
                await measure(backend, "real-size SD1.5", 512, args.steps, args.runs)
        finally:
            await backend.aclose()


if __name__ == "__main__":
    asyncio.run(main())
