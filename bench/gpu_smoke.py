"""The engine on a GPU, quickly, before bench/engine.py measures it: every sampler, img2img,
inpainting, hires fix and SDXL on the tests' tiny random-weight models, on whatever device the
engine picks (CUDA when present). Prints one line per case (ok, or the error) and the device
facts that the detailed /health shows; asserts nothing. The tests run on the CPU only, so this
is where half precision, CUDA kernels and NVML meet the engine's code.

Run: `.venv/bin/python bench/gpu_smoke.py` (bench/gpu.sh runs it first).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from PIL import Image

from a1111_proxy.backends.diffusers import DiffusersBackend
from a1111_proxy.engine.config import EngineConfig
from a1111_proxy.engine.samplers import SAMPLERS


def png(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def looks_made(result: dict[str, Any]) -> str:
    """'' when every image has finite, varied pixels; else what is wrong."""
    for b64 in result["images"]:
        pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))
        if pixels.std() < 1:
            return f"a flat image (mean {pixels.mean():.1f})"
    return ""


async def case(backend: DiffusersBackend, name: str, kind: str, body: dict[str, Any]) -> bool:
    began = time.perf_counter()
    try:
        result = await backend.generate(kind, body)
    except Exception as exc:  # a smoke run reports every failure and goes on
        print(f"FAIL {name}: {type(exc).__name__}: {exc}")
        traceback.print_exc(limit=4)
        return False
    wrong = looks_made(result)
    took = time.perf_counter() - began
    print(f"{'FAIL' if wrong else 'ok  '} {name} ({took:.2f} s){': ' + wrong if wrong else ''}")
    return not wrong


async def main() -> None:
    from tests.fakes import tiny_sd

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = root / "models" / "Stable-diffusion"
        sd15 = tiny_sd.sd15(root / "configs" / "sd15")
        tiny_sd.write_single_file(sd15, models / "tiny15.safetensors")
        sdxl = tiny_sd.sdxl(root / "configs" / "sdxl")
        tiny_sd.write_single_file(sdxl, models / "tinyxl.safetensors")
        backend = DiffusersBackend(
            EngineConfig(
                models_dir=root / "models",
                skeletons={"sd15": root / "configs" / "sd15", "sdxl": root / "configs" / "sdxl"},
                max_batch=8,
            )
        )
        base = {"prompt": "a lighthouse, (oil:1.2)", "seed": 3, "steps": 6, "width": 64}
        base |= {"height": 64, "override_settings": {"sd_model_checkpoint": "tiny15"}}
        init = png(Image.new("RGB", (64, 64), (200, 90, 40)))
        mask = Image.new("L", (64, 64), 0)
        mask.paste(255, (16, 16, 48, 48))
        nv = {"override_settings": {"sd_model_checkpoint": "tiny15", "randn_source": "NV"}}
        cases: list[tuple[str, str, dict[str, Any]]] = [
            (f"txt2img {s.name}", "txt2img", {**base, "sampler_name": s.name}) for s in SAMPLERS
        ]
        cases += [
            ("txt2img Euler a, batch 3", "txt2img", {**base, "batch_size": 3}),
            (
                "txt2img DPM++ 2M, randn_source NV",
                "txt2img",
                {**base, "sampler_name": "DPM++ 2M"} | nv,
            ),
            ("img2img", "img2img", {**base, "init_images": [init], "denoising_strength": 0.6}),
            (
                "inpaint",
                "img2img",
                {**base, "init_images": [init], "mask": png(mask), "denoising_strength": 0.8},
            ),
            (
                "hires fix",
                "txt2img",
                {**base, "enable_hr": True, "hr_scale": 2, "hr_upscaler": "Latent"},
            ),
            (
                "SDXL txt2img",
                "txt2img",
                {**base, "override_settings": {"sd_model_checkpoint": "tinyxl"}},
            ),
        ]
        ok = 0
        for name, kind, body in cases:
            ok += await case(backend, name, kind, body)
        print(f"{ok} of {len(cases)} cases made images")
        facts = await backend.catalogue_entry("device")
        print("device facts:", json.dumps(facts, indent=1, default=str))
        await backend.aclose()


if __name__ == "__main__":
    asyncio.run(main())
