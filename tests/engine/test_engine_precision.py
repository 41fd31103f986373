"""A1111's precision on the engine (engine/precision.py), on the CPU with tiny models: the
sampler's latents stay fp32 between steps while the UNet runs in half precision, and a VAE whose
half-precision decode gives NaNs decodes again in fp32 and stays fp32."""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

torch = pytest.importorskip("torch", reason="the engine tests need the engine extra (torch)")
pytest.importorskip("diffusers", reason="the engine tests need the engine extra (diffusers)")

import numpy as np  # noqa: E402

from a1111_proxy.engine import pipeline  # noqa: E402
from a1111_proxy.engine.catalog import Catalog  # noqa: E402
from a1111_proxy.engine.config import EngineConfig  # noqa: E402
from a1111_proxy.engine.models import Models  # noqa: E402
from a1111_proxy.engine.params import Params  # noqa: E402
from tests.engine.test_engine import decode  # noqa: E402

if TYPE_CHECKING:
    from tests.engine.conftest import TinyModels

pytestmark = pytest.mark.engine
SMALL = {"steps": 3, "width": 64, "height": 64, "seed": 7}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory, tiny_models: TinyModels) -> Iterator[Path]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = tmp_path_factory.mktemp("precision")
    checkpoints = root / "models" / "Stable-diffusion"
    tiny_models.sd15(checkpoints / "a15")
    tiny_models.sd15(checkpoints / "b15", seed=1)
    tiny_models.sd15(checkpoints / "c-inpaint15", inpaint=True)
    yield root / "models"


def engine(models_dir: Path, dtype: str) -> tuple[Models, EngineConfig]:
    config = EngineConfig(models_dir=models_dir, device="cpu", dtype=dtype, preview_steps=0)
    return Models(config, Catalog(models_dir)), config


def run(models: Models, config: EngineConfig, kind: str = "txt2img", **body: Any) -> Any:
    params = Params.from_payload(kind, {"prompt": "a cat", **SMALL, **body}, rng=random.Random(0))
    return pipeline.generate(models, config, params, pipeline.RunState())


@pytest.fixture
def step_latents(monkeypatch: pytest.MonkeyPatch) -> list[torch.dtype]:
    """The dtype of the latents each step hands the pipeline's step callback."""
    seen: list[torch.dtype] = []
    make = pipeline._callback

    def observed(*args: Any, **kwargs: Any) -> Any:
        on_step_end = make(*args, **kwargs)

        def record(pipe: Any, i: int, t: Any, tensors: dict[str, Any]) -> Any:
            seen.append(tensors["latents"].dtype)
            return on_step_end(pipe, i, t, tensors)

        return record

    monkeypatch.setattr(pipeline, "_callback", observed)
    return seen


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize(
    ("sampler", "kind", "extra"),
    [
        ("Euler a", "txt2img", {}),
        ("DPM++ 2M", "txt2img", {}),
        ("Euler", "img2img", {"denoising_strength": 0.6}),
    ],
)
def test_latents_stay_fp32_between_steps_while_the_unet_runs_in_half_precision(
    models_dir: Path,
    step_latents: list[torch.dtype],
    dtype: str,
    sampler: str,
    kind: str,
    extra: dict[str, Any],
) -> None:
    models, config = engine(models_dir, dtype)
    unet_inputs: list[torch.dtype] = []
    unet = models.get("a15").pipe.unet
    handle = unet.register_forward_pre_hook(lambda m, a: unet_inputs.append(a[0].dtype))
    try:
        if kind == "img2img":
            extra = {**extra, "init_images": [_grey_png()]}
        result = run(models, config, kind, sampler_name=sampler, **extra)
    finally:
        handle.remove()
    assert step_latents and set(step_latents) == {torch.float32}
    assert unet.dtype == getattr(torch, dtype) and set(unet_inputs) == {getattr(torch, dtype)}
    assert np.isfinite(np.asarray(decode(result), dtype=np.float32)).all()


def test_inpainting_latents_stay_fp32_with_a_half_precision_inpainting_unet(
    models_dir: Path, step_latents: list[torch.dtype]
) -> None:
    models, config = engine(models_dir, "bfloat16")
    run(
        models,
        config,
        "img2img",
        init_images=[_grey_png()],
        mask=_grey_png(255),
        denoising_strength=0.75,
        override_settings={"sd_model_checkpoint": "c-inpaint15"},
    )
    assert step_latents and set(step_latents) == {torch.float32}


def test_a_vae_that_makes_nans_in_half_precision_decodes_again_in_fp32_and_stays_fp32(
    models_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    models, config = engine(models_dir, "float16")
    vae = models.get("a15").pipe.vae
    half_decodes = []

    def nan_in_half(module: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
        if output.dtype == torch.float32:
            return output
        half_decodes.append(output.dtype)
        return torch.full_like(output, float("nan"))  # as an fp16 overflow leaves it

    vae.decoder.register_forward_hook(nan_in_half)
    with caplog.at_level(logging.WARNING, logger="a1111_proxy.engine"):
        first = run(models, config)
        second = run(models, config, seed=8)
    pixels = [np.asarray(decode(r).convert("RGB"), dtype=np.int16) for r in (first, second)]
    assert all(p.std() > 0 for p in pixels)  # real images, not NaNs turned black
    assert vae.dtype == torch.float32 and half_decodes == [torch.float16]  # once, then fp32
    warnings = [r for r in caplog.records if "VAE made NaNs" in r.getMessage()]
    assert len(warnings) == 1 and "float16" in warnings[0].getMessage()
    other = models.get("b15")  # a model loaded afterwards starts with an fp32 VAE
    assert other.pipe.vae.dtype == torch.float32 and other.pipe.unet.dtype == torch.float16
    run(models, config, override_settings={"sd_model_checkpoint": "b15"})  # fp32 VAE, fp16 UNet


def test_a_finite_half_precision_decode_keeps_the_vae_in_half_precision(
    models_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    models, config = engine(models_dir, "float16")
    with caplog.at_level(logging.WARNING, logger="a1111_proxy.engine"):
        run(models, config)
    assert models.get("a15").pipe.vae.dtype == torch.float16
    assert not [r for r in caplog.records if "VAE made NaNs" in r.getMessage()]


def _grey_png(level: int = 128) -> str:
    from PIL import Image

    from tests.engine.test_engine import png_b64

    return png_b64(Image.new("RGB", (64, 64), (level, level, level)))
