"""Benchmark of the bundled diffusers engine: prints figures, asserts nothing.

Runs the real DiffusersBackend (the same code path a job takes) offline on models it builds:

  tiny   the tests' tiny random-weight SD1.5 (single-file checkpoint), 64x64: measures the
         engine's own overhead per step and per image (prompt encoding, PNG, infotext).
  real   (--real) random-weight models with real SD1.5 (512x512) and SDXL (1024x1024) shapes built
         from the shipped config skeletons - on a GPU this gives the real it/s (timing equals real
         weights); on a CPU it is very slow.

For each: it/s (denoising steps per second, CFG on) and per-image latency of our engine against a
bare diffusers pipeline call with the same weights, device, precision, sampler, size and steps in
the same process, and their ratio (target >= 0.97); median of a few runs after a warm-up. Then
cross-request batching: --jobs compatible jobs (own prompts and seeds) run as one engine batch
against the same jobs one at a time, images/s and their ratio. Uses
CUDA when torch sees it (`--device cpu` to force), fp16 there, fp32 on the CPU.

Run: `.venv/bin/python bench/engine.py [--real] [--steps 20] [--runs 3] [--device cuda]`.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
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
from a1111_proxy.engine.models import free_memory


def build_tiny(root: Path) -> dict[str, Path]:
    from tests.fakes import tiny_sd

    source = tiny_sd.sd15(root / "configs" / "sd15")
    tiny_sd.write_single_file(source, root / "models" / "Stable-diffusion" / "tiny15.safetensors")
    return {"sd15": root / "configs" / "sd15"}


def build_real(arch: str, folder: Path, dtype: torch.dtype) -> None:
    """Real SD1.5 or SDXL shapes with random weights (timing equals real weights), saved as a
    diffusers folder from the shipped config skeleton: nothing is downloaded."""
    import diffusers
    import transformers

    from a1111_proxy.engine.skeletons import skeleton

    config = skeleton(arch)
    index = json.loads((config / "model_index.json").read_text())
    parts: dict[str, object] = {}
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list) or value[1] is None:
            continue
        library, cls_name = value
        cls = getattr(diffusers if library == "diffusers" else transformers, cls_name)
        if name.startswith("tokenizer") or name == "scheduler":
            parts[name] = cls.from_pretrained(config / name)
        elif library == "transformers":
            parts[name] = cls(cls.config_class.from_pretrained(config / name))
        else:
            parts[name] = cls.from_config(cls.load_config(config / name))
    pipeline = getattr(diffusers, index["_class_name"])
    accepted = set(inspect.signature(pipeline.__init__).parameters)
    extra: dict[str, object] = {
        k: None for k in ("safety_checker", "feature_extractor", "image_encoder") if k in accepted
    }
    if "requires_safety_checker" in accepted:
        extra["requires_safety_checker"] = False
    pipe = pipeline(**parts, **extra)
    pipe.to(dtype).save_pretrained(folder)


BODY = {
    "prompt": "a lighthouse at dusk, (oil painting:1.2)",
    "negative_prompt": "blurry",
    "seed": 1,
    "sampler_name": "Euler a",
}


async def measure_ours(
    backend: DiffusersBackend, checkpoint: str, size: int, steps: int, runs: int, batch: int = 1
) -> float:
    """Seconds per job, median: the real backend path (A1111 parsing, encoding, PNG, infotext)."""
    body = {
        **BODY,
        "steps": steps,
        "width": size,
        "height": size,
        "batch_size": batch,
        "override_settings": {"sd_model_checkpoint": checkpoint},
    }
    await backend.generate("txt2img", {**body, "steps": 2})  # load + warm up
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        result = await backend.generate("txt2img", body)
        times.append(time.perf_counter() - t)
        assert len(result["images"]) == batch and json.loads(result["info"])["seed"] == 1
    return statistics.median(times)


def measure_plain(
    folder: Path, device: torch.device, dtype: torch.dtype, size: int, steps: int, runs: int
) -> float:
    """Seconds per image, median: a bare diffusers pipeline call on the same weights, device,
    precision, sampler, size and steps (no A1111 semantics, no PNG): the baseline."""
    import diffusers

    index = json.loads((folder / "model_index.json").read_text())
    pipe = getattr(diffusers, index["_class_name"]).from_pretrained(
        folder, local_files_only=True, dtype=dtype
    )
    pipe.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    call = dict(
        prompt="a lighthouse at dusk, oil painting",
        negative_prompt="blurry",
        num_inference_steps=steps,
        height=size,
        width=size,
        guidance_scale=7.0,
    )
    pipe(**{**call, "num_inference_steps": 2})
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        pipe(**call, generator=torch.Generator(device).manual_seed(1))
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    del pipe
    free_memory()
    return statistics.median(times)


async def compare(
    backend: DiffusersBackend,
    label: str,
    checkpoint: str,
    folder: Path,
    size: int,
    args: argparse.Namespace,
) -> None:
    ours = await measure_ours(backend, checkpoint, size, args.steps, args.runs)
    four = await measure_ours(backend, checkpoint, size, args.steps, args.runs, batch=4)
    backend.models.unload_all()
    plain = measure_plain(
        folder, backend.models.device, backend.models.dtype, size, args.steps, args.runs
    )
    print(
        f"{label} {size}x{size}, {args.steps} steps, Euler a, batch 1 ({backend.name}, "
        f"{backend.models.dtype}):"
    )
    print(f"  a1111-proxy engine: {args.steps / ours:7.2f} it/s, {ours * 1000:9.1f} ms per image")
    print(f"  plain diffusers:    {args.steps / plain:7.2f} it/s, {plain * 1000:9.1f} ms per image")
    print(f"  ratio (ours / plain it/s): {plain / ours:.3f}   (target >= 0.97)")
    print(f"  batch 4: {four / 4 * 1000:.1f} ms per image, {args.steps / four:.2f} it/s")


async def measure_batching(
    backend: DiffusersBackend, label: str, checkpoint: str, size: int, args: argparse.Namespace
) -> None:
    """N compatible jobs (own prompts and seeds) as one engine batch against the same jobs one
    at a time, in the same run: images per second and their ratio."""
    bodies = [
        {
            **BODY,
            "prompt": f"a photo of thing {n}",
            "seed": 100 + n,
            "steps": args.steps,
            "width": size,
            "height": size,
            "override_settings": {"sd_model_checkpoint": checkpoint},
        }
        for n in range(args.jobs)
    ]
    await backend.generate("txt2img", {**bodies[0], "steps": 2})  # load + warm up
    alone, together = [], []
    for _ in range(args.runs):
        t = time.perf_counter()
        for body in bodies:
            await backend.generate("txt2img", body)
        alone.append(time.perf_counter() - t)
        t = time.perf_counter()
        batch = backend.batch([("txt2img", body) for body in bodies])
        runs = zip(batch.runners, bodies, strict=True)
        await asyncio.gather(*(runner.generate("txt2img", body) for runner, body in runs))
        together.append(time.perf_counter() - t)
    one, many = args.jobs / statistics.median(alone), args.jobs / statistics.median(together)
    print(
        f"{label} {size}x{size}, {args.steps} steps, {args.jobs} compatible jobs: "
        f"one at a time {one:.2f} images/s, one batch {many:.2f} images/s, ratio {many / one:.2f}"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--real",
        action="store_true",
        help="also real-size SD1.5 at 512x512 and SDXL at 1024x1024 (GPU)",
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    parser.add_argument("--jobs", type=int, default=8, help="compatible jobs in the batch run")
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
                max_batch=64,
            )
        )
        try:
            await compare(backend, "tiny SD1.5", "tiny15", skeletons["sd15"], 64, args)
            await measure_batching(backend, "tiny SD1.5", "tiny15", 64, args)
            if args.real:
                for arch, name, size in (("sd15", "real15", 512), ("sdxl", "realxl", 1024)):
                    folder = root / "models" / "Stable-diffusion" / name
                    build_real(arch, folder, backend.models.dtype)
                    backend.models.catalog.checkpoints = backend.models.catalog.scan()
                    label = "real-size SD1.5" if arch == "sd15" else "real-size SDXL"
                    await compare(backend, label, name, folder, size, args)
                    await measure_batching(backend, label, name, size, args)
        finally:
            await backend.aclose()


if __name__ == "__main__":
    asyncio.run(main())
