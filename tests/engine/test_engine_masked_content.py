"""Inpainting's masked content "latent noise" and "latent nothing" in latents, against A1111
v1.10's StableDiffusionProcessingImg2Img.init (written out here), on the tiny random-weight
SD1.5 on the CPU."""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="the engine tests need the engine extra (torch)")
pytest.importorskip("diffusers", reason="the engine tests need the engine extra (diffusers)")

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw, ImageFilter  # noqa: E402

from a1111_proxy.backends.diffusers import DiffusersBackend  # noqa: E402
from a1111_proxy.engine import masked_content, samplers, schedulers  # noqa: E402
from tests.engine.results import pixels, png_b64  # noqa: E402

pytestmark = [pytest.mark.engine]
SEEDS = [21, 22]


def blurred_mask(size: int = 64) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).rectangle((16, 12, 47, 43), fill=255)
    return mask.filter(ImageFilter.GaussianBlur(4))


def a1111_init_latent(init_latent: Any, mask: Image.Image, fill: int) -> Any:
    """processing.py's init: latmask from the (blurred) latent_mask, rounded (mask_round), and
    create_random_tensors(shape, all_seeds[0:batch]) on the CPU source."""
    latmask = mask.convert("RGB").resize((init_latent.shape[3], init_latent.shape[2]))
    latmask = np.moveaxis(np.array(latmask, dtype=np.float32), 2, 0) / 255
    latmask = np.tile(np.around(latmask[0])[None], (4, 1, 1))
    keep, nmask = torch.asarray(1.0 - latmask), torch.asarray(latmask)
    if fill == 3:
        return init_latent * keep
    drawn = torch.stack(
        [torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(s)) for s in SEEDS]
    )
    return init_latent * keep + drawn * nmask


@pytest.mark.parametrize("fill", [2, 3])
def test_the_noised_init_latent_is_a1111s_filled_one(fill: int) -> None:
    config = {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
    }
    scheduler = schedulers.make(config, samplers.resolve("Euler"))
    scheduler.set_timesteps(4)
    tracking = schedulers.Tracking(scheduler)
    mask = blurred_mask()
    tracking.fill = masked_content.make(
        fill, [mask, mask], SEEDS, width=64, height=64, device=torch.device("cpu"), source="CPU"
    )
    encoded = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(1))
    seen = scheduler.add_noise(encoded, torch.zeros_like(encoded), scheduler.timesteps[:1])
    torch.testing.assert_close(seen, a1111_init_latent(encoded, mask, fill))
    assert not torch.equal(seen, encoded)


def test_original_and_fill_leave_the_latents_alone() -> None:
    for fill in (0, 1):
        made = masked_content.make(
            fill,
            [blurred_mask()],
            [1],
            width=64,
            height=64,
            device=torch.device("cpu"),
            source="CPU",
        )
        assert made is None


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_latent_noise_and_latent_nothing_each_start_the_masked_area_differently(
    sd15_backend: DiffusersBackend,
) -> None:
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((16, 16, 47, 47), fill=255)
    body = {
        "prompt": "a cat",
        "steps": 3,
        "width": 64,
        "height": 64,
        "seed": 5,
        "denoising_strength": 0.6,
        "init_images": [png_b64(init)],
        "mask": png_b64(mask),
    }
    made = {
        fill: pixels(await sd15_backend.generate("img2img", {**body, "inpainting_fill": fill}))
        for fill in (0, 2, 3)
    }
    again = pixels(await sd15_backend.generate("img2img", {**body, "inpainting_fill": 2}))
    assert np.array_equal(made[2], again)
    assert (made[2] != made[0]).any() and (made[3] != made[0]).any()
    assert (made[2] != made[3]).any()
    # far from the (blurred) mask the overlay keeps the original either way
    assert np.array_equal(made[2][:4], made[3][:4])
