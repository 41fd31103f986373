"""Benchmark of the bundled diffusers engine: prints figures, asserts nothing.

Runs the real DiffusersBackend (the same code path a job takes) offline on models it builds:

  tiny   the tests' tiny random-weight SD1.5 (single-file checkpoint), 64x64: measures the
         engine's own overhead per step and per image (prompt encoding, PNG, infotext).
  real   (--real) random-weight models with real SD1.5 (512x512, 20 steps) and SDXL (1024x1024,
         30 steps) shapes built from the shipped config skeletons - on a GPU this gives the real
         it/s (timing equals real weights); on a CPU it is very slow.

For each: it/s (denoising steps per second, CFG on) and per-image latency of our engine against a
bare diffusers pipeline call with the same weights, device, precision, sampler, size and steps in
the same process, and their ratio (target >= 0.97); median of a few runs after a warm-up. Then
cross-request batching through the HTTP API (`a1111-proxy serve` and a worker process on a
SQLite file, bench/harness.py): --jobs compatible jobs (own prompts and seeds) submitted
together, run one at a time (ENGINE_MAX_BATCH=1) and as one batch, images/s and their ratio;
with --real also the batch's images/s against bare diffusers at batch 1 (goal >= 4x). Uses
CUDA when torch sees it (`--device cpu` to force), fp16 there, fp32 on the CPU.

The batched run's images are compared with the same jobs' images one at a time (the largest
pixel difference, and the share of pixels that differ by more than 1 of 255): equal on the CPU
within 1/255, within float tolerance on a GPU.

Run: `.venv/bin/python bench/engine.py [--real] [--steps 20] [--runs 3] [--device cuda]`;
`--compile [--compile-mode reduce-overhead]` compiles the UNet (ENGINE_COMPILE); `--skip-tiny`,
`--only sd15|sdxl`, `--no-api` and `--no-batch4` pick scenarios; `--dry` runs the real-shape models
at 64x64 (SDXL 128x128) with 2 steps, to check the script on a CPU. bench/gpu.sh is how the GPU
figures in docs/performance.md were taken.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
import numpy as np
import torch
from PIL import Image

from a1111_proxy.backends.diffusers import DiffusersBackend
from a1111_proxy.engine.config import EngineConfig
from a1111_proxy.engine.models import free_memory


def build_tiny(root: Path) -> dict[str, Path]:
    from tests.fakes import tiny_sd

    source = tiny_sd.sd15(root / "configs" / "sd15")
    tiny_sd.write_single_file(source, root / "models" / "Stable-diffusion" / "tiny15.safetensors")
    # A worker process has no test skeletons: the API scenario uses the diffusers folder.
    shutil.copytree(
        root / "configs" / "sd15",
        root / "models" / "Stable-diffusion" / "tinyapi",
        dirs_exist_ok=True,
    )
    return {"sd15": root / "configs" / "sd15"}


def pixels_of(b64: str) -> np.ndarray:
    import base64
    import io

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


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


# --real: (architecture, checkpoint, size, steps), as the issue measures them.
REAL = (("sd15", "real15", 512, 20), ("sdxl", "realxl", 1024, 30))

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
) -> float:
    """Our engine against bare diffusers at batch 1 (in this process); returns bare diffusers'
    seconds per image."""
    ours = await measure_ours(backend, checkpoint, size, args.steps, args.runs)
    four = (
        None
        if args.no_batch4
        else await measure_ours(backend, checkpoint, size, args.steps, args.runs, batch=4)
    )
    backend.models.unload_all()
    plain = measure_plain(
        folder, backend.models.device, backend.models.dtype, size, args.steps, args.runs
    )
    compiled = f", compiled ({args.compile_mode})" if args.compile else ""
    print(
        f"{label} {size}x{size}, {args.steps} steps, Euler a, batch 1 ({backend.name}, "
        f"{backend.models.dtype}{compiled}):"
    )
    print(f"  a1111-proxy engine: {args.steps / ours:7.2f} it/s, {ours * 1000:9.1f} ms per image")
    print(f"  plain diffusers:    {args.steps / plain:7.2f} it/s, {plain * 1000:9.1f} ms per image")
    print(f"  ratio (ours / plain it/s): {plain / ours:.3f}   (target >= 0.97)")
    if four is not None:
        print(f"  batch 4: {four / 4 * 1000:.1f} ms per image, {args.steps / four:.2f} it/s")
    return plain


def batch_bodies(checkpoint: str, size: int, steps: int, jobs: int) -> list[dict[str, Any]]:
    """N compatible jobs: the same shape, each with its own prompt and seed."""
    return [
        {
            **BODY,
            "prompt": f"a photo of thing {n}",
            "seed": 100 + n,
            "steps": steps,
            "width": size,
            "height": size,
            "override_settings": {"sd_model_checkpoint": checkpoint},
        }
        for n in range(jobs)
    ]


def run_together(
    api: httpx.Client, bodies: list[dict[str, Any]], images: list[str] | None = None
) -> float:
    """Submit `bodies` together (202 + job each), wait until every one completed: seconds.
    With `images`, appends each job's first image (base64 PNG), in the bodies' order."""
    began = time.perf_counter()
    ids = []
    for body in bodies:
        response = api.post("/sdapi/v1/txt2img", json=body, headers={"Prefer": "respond-async"})
        response.raise_for_status()
        ids.append(response.json()["id"])
    for job_id in ids:
        while (status := api.get(f"/sdapi/v1/jobs/{job_id}").json()["status"]) in (
            "queued",
            "processing",
        ):
            time.sleep(0.01)
        if status != "completed":
            raise RuntimeError(f"job {job_id} ended {status}")
    took = time.perf_counter() - began
    if images is not None:
        for job_id in ids:
            images.append(api.get(f"/sdapi/v1/jobs/{job_id}").json()["result"]["images"][0])
    return took


def print_differences(alone: list[str], batched: list[str]) -> None:
    """Each job's image batched against its image one at a time."""
    worst, share = 0, 0.0
    for a, b in zip(alone, batched, strict=True):
        diff = np.abs(pixels_of(a) - pixels_of(b))
        worst = max(worst, int(diff.max()))
        share = max(share, float((diff > 1).mean()))
    print(
        f"  batched against alone, {len(alone)} jobs: largest pixel difference {worst}/255, "
        f"at most {share:.2%} of a job's pixels differ by more than 1"
    )


def measure_api_batching(
    root: Path, label: str, checkpoint: str, size: int, args: argparse.Namespace
) -> float:
    """Through the HTTP API and a worker process: N compatible jobs submitted together, run one
    at a time (ENGINE_MAX_BATCH=1) and as one batch (ENGINE_MAX_BATCH=N, with a short
    ENGINE_BATCH_WAIT_MS so that the first job claimed waits for the others' submits), in the
    same run. Prints images/s of each and their ratio; returns the batched images/s."""
    from bench.harness import deployment

    bodies = batch_bodies(checkpoint, size, args.steps, args.jobs)
    figures = {}
    images: dict[str, list[str]] = {}
    for mode, env in (
        ("one at a time", {"ENGINE_MAX_BATCH": "1"}),
        ("one batch", {"ENGINE_MAX_BATCH": str(args.jobs), "ENGINE_BATCH_WAIT_MS": "250"}),
    ):
        settings = {
            "BACKEND": "diffusers",
            "MODELS_DIR": str(root / "models"),
            "ENGINE_DEVICE": args.device,
            "ENGINE_COMPILE": str(args.compile).lower(),
            "ENGINE_COMPILE_MODE": args.compile_mode,
            **env,
        }
        name = f"{checkpoint}-{env['ENGINE_MAX_BATCH']}"
        with (
            deployment(
                root / "deployments",
                name,
                log_level="info",
                workers=1,
                backends=[],
                env={f"A1111_PROXY_{k}": v for k, v in settings.items()},
            ) as found,
            httpx.Client(base_url=found.api_url, timeout=600) as api,
        ):
            run_together(api, [{**bodies[0], "steps": 2}])  # load + warm up
            times = [run_together(api, bodies) for _ in range(args.runs - 1)]
            images[mode] = []
            times.append(run_together(api, bodies, images[mode]))
            logs = [p.output() for p in found.stack.procs if p.log_path.stem.startswith("worker")]
            batches = re.findall(r"one batch of (\d+)", "".join(logs))
        figures[mode] = args.jobs / statistics.median(times)
        shown = f", batches of {', '.join(batches)}" if batches else ""
        print(f"  through the API, {mode}: {figures[mode]:.2f} images/s{shown}")
    print_differences(images["one at a time"], images["one batch"])
    one, many = figures["one at a time"], figures["one batch"]
    print(
        f"{label} {size}x{size}, {args.steps} steps, {args.jobs} compatible jobs through the "
        f"API: one at a time {one:.2f} images/s, one batch {many:.2f} images/s, "
        f"ratio {many / one:.2f}"
    )
    return many


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
    parser.add_argument("--compile-mode", default="default", help="ENGINE_COMPILE_MODE")
    parser.add_argument("--skip-tiny", action="store_true", help="no tiny-model scenarios")
    parser.add_argument("--only", choices=("sd15", "sdxl"), help="with --real: one architecture")
    parser.add_argument("--no-api", action="store_true", help="no batching through the API")
    parser.add_argument("--api-only", action="store_true", help="only batching through the API")
    parser.add_argument("--no-batch4", action="store_true", help="no batch-4 engine figure")
    parser.add_argument(
        "--keep", type=Path, help="build the models here, and reuse them on the next run"
    )
    parser.add_argument(
        "--build-only", action="store_true", help="with --real --keep: build the models, no runs"
    )
    parser.add_argument(
        "--dry", action="store_true", help="real shapes at 64x64 / 128x128, 2 steps (CPU check)"
    )
    parser.add_argument("--jobs", type=int, default=8, help="compatible jobs in the batch run")
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, CUDA: "
        f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}, "
        f"{torch.get_num_threads()} CPU threads, load average {os.getloadavg()[0]:.1f}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        shutil.rmtree(root / "deployments", ignore_errors=True)
        skeletons = build_tiny(root)
        backend = DiffusersBackend(
            EngineConfig(
                models_dir=root / "models",
                device=args.device,
                skeletons=skeletons,
                compile=args.compile,
                compile_mode=args.compile_mode,
                preview_steps=5,
                max_batch=64,
            )
        )
        try:
            if not args.skip_tiny and not args.build_only:
                await compare(backend, "tiny SD1.5", "tiny15", skeletons["sd15"], 64, args)
                backend.models.unload_all()
                # Its own thread: the harness runs alembic, which starts an event loop of its own.
                if not args.no_api:
                    await asyncio.to_thread(
                        measure_api_batching, root, "tiny SD1.5", "tinyapi", 64, args
                    )
            if args.real:
                for arch, name, size, steps in REAL:
                    if args.only and arch != args.only:
                        continue
                    if args.dry:
                        size, steps = size // 8, 2
                    real = argparse.Namespace(**{**vars(args), "steps": steps})
                    folder = root / "models" / "Stable-diffusion" / name
                    if not (folder / "model_index.json").exists():
                        build_real(arch, folder, backend.models.dtype)
                    if args.build_only:
                        continue
                    backend.models.catalog.checkpoints = backend.models.catalog.scan()
                    label = "real-size SD1.5" if arch == "sd15" else "real-size SDXL"
                    plain = (
                        await compare(backend, label, name, folder, size, real)
                        if not args.api_only
                        else float("nan")
                    )
                    backend.models.unload_all()
                    free_memory()
                    if args.no_api:
                        continue
                    many = await asyncio.to_thread(
                        measure_api_batching, root, label, name, size, real
                    )
                    print(
                        f"  {args.jobs} jobs as one batch against bare diffusers at batch 1: "
                        f"{many * plain:.2f}x images/s   (goal >= 4)"
                    )
        finally:
            await backend.aclose()


if __name__ == "__main__":
    asyncio.run(main())
