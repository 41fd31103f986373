"""Image prompts on SDXL: an IP-Adapter unit (`ip-adapter_clip_sdxl`) on a tiny random SDXL
with a tiny random IP-Adapter for it and a CLIP vision encoder (tests/fakes/tiny_ip_adapter.py),
on the CPU, offline."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

pytest.importorskip("torch", reason="the engine tests need the engine extra (torch)")
pytest.importorskip("diffusers", reason="the engine tests need the engine extra (diffusers)")

import numpy as np
from PIL import Image, ImageDraw

from a1111_proxy.backends.diffusers import DiffusersBackend
from tests.engine.conftest import cpu_backend
from tests.engine.results import pixels, png_b64
from tests.fakes import tiny_ip_adapter

if TYPE_CHECKING:
    from tests.engine.conftest import TinyModels

pytestmark = [pytest.mark.anyio, pytest.mark.engine]


def picture(colour: str, shape: str) -> str:
    image = Image.new("RGB", (48, 40), colour)
    getattr(ImageDraw.Draw(image), shape)((6, 6, 40, 34), fill="white", outline="black")
    return png_b64(image)


RED, BLUE = picture("red", "ellipse"), picture("blue", "rectangle")
SMALL = {"steps": 4, "width": 64, "height": 64, "seed": 7, "prompt": "a cat", "cfg_scale": 5}
XL = {"override_settings": {"sd_model_checkpoint": "tinyxl"}}
UNIT = {
    "enabled": True,
    "module": "ip-adapter_clip_sdxl",
    "model": "ip-adapter_sdxl_tiny",
    "image": RED,
}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory, tiny_models: TinyModels) -> Iterator[Path]:
    """MODELS_DIR with a tiny SDXL, a plain and a plus IP-Adapter for it in ControlNet/ and a
    CLIP vision encoder (one file, named as the bigG one) in clip_vision/."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = tmp_path_factory.mktemp("image-prompts-sdxl")
    models = root / "models"
    sdxl = tiny_models.sdxl(root / "configs" / "sdxl")
    tiny_models.write_single_file(sdxl, models / "Stable-diffusion" / "tinyxl.safetensors")
    adapter = models / "ControlNet" / "ip-adapter_sdxl_tiny.safetensors"
    tiny_ip_adapter.ip_adapter(sdxl.unet, adapter)
    plus = models / "ControlNet" / "ip-adapter-plus_sdxl_vit-h_tiny.safetensors"
    tiny_ip_adapter.ip_adapter(sdxl.unet, plus, plus=True)
    tiny_ip_adapter.clip_vision(models / "clip_vision" / "CLIP-ViT-bigG-14-tiny.safetensors")
    yield root


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
async def backend(models_dir: Path) -> AsyncIterator[DiffusersBackend]:
    made = cpu_backend(models_dir, kinds=("sdxl",))
    yield made
    await made.aclose()


def prompted(*units: dict[str, Any]) -> dict[str, Any]:
    return {**SMALL, **XL, "alwayson_scripts": {"controlnet": {"args": list(units)}}}


def differ(a: dict[str, Any], b: dict[str, Any]) -> int:
    return int(np.abs(pixels(a).astype(np.int16) - pixels(b).astype(np.int16)).max())


async def test_an_image_prompt_changes_an_sdxl_image_and_weight_0_gives_the_plain_one(
    backend: DiffusersBackend,
) -> None:
    plain = await backend.generate("txt2img", {**SMALL, **XL})
    red = await backend.generate("txt2img", prompted(UNIT))
    blue = await backend.generate("txt2img", prompted({**UNIT, "image": BLUE}))
    off = await backend.generate("txt2img", prompted({**UNIT, "weight": 0}))
    assert differ(red, plain) > 10 and differ(red, blue) > 5
    assert differ(off, plain) == 0
    assert (
        'ControlNet 0: \\"Module: ip-adapter_clip_sdxl, Model: ip-adapter_sdxl_tiny' in red["info"]
    )


async def test_a_plus_ip_adapter_steers_an_sdxl_image_with_the_encoders_hidden_states(
    backend: DiffusersBackend,
) -> None:
    plain = await backend.generate("txt2img", {**SMALL, **XL})
    unit = {**UNIT, "module": "ip-adapter_clip_sdxl_plus_vith"}
    plus = await backend.generate(
        "txt2img", prompted({**unit, "model": "ip-adapter-plus_sdxl_vit-h_tiny"})
    )
    assert differ(plus, plain) > 10
