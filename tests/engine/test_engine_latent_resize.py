"""img2img's resize mode 3, "Just resize (latent upscale)", against A1111 v1.10's img2img init
(the image encoded at its own size, then torch's bilinear interpolate of init_latent to the
job's size), on the tiny random-weight SD1.5 on the CPU."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

torch = pytest.importorskip("torch", reason="the engine tests need the engine extra (torch)")
pytest.importorskip("diffusers", reason="the engine tests need the engine extra (diffusers)")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from a1111_proxy.backends.diffusers import DiffusersBackend  # noqa: E402
from a1111_proxy.engine import upscale  # noqa: E402

if TYPE_CHECKING:
    from tests.engine.conftest import TinyModels

from tests.engine.results import pixels, png_b64  # noqa: E402

pytestmark = [pytest.mark.engine]


def init_image(width: int = 96, height: int = 64) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_latent_resize_encodes_at_the_images_size_and_interpolates_the_latents(
    tmp_path: Any, tiny_models: TinyModels
) -> None:
    pipe = tiny_models.sd15(tmp_path / "tiny15")
    image = init_image()
    made = upscale.encoded_to_size(pipe, [image], 64, 48, [torch.Generator().manual_seed(4)])
    with torch.inference_mode():
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
        posterior = pipe.vae.encode(pixels.permute(2, 0, 1)[None]).latent_dist
        init_latent = posterior.sample(torch.Generator().manual_seed(4))
        init_latent = init_latent * pipe.vae.config.scaling_factor
        expected = torch.nn.functional.interpolate(
            init_latent, size=(48 // 8, 64 // 8), mode="bilinear"
        )
    assert init_latent.shape[2:] == (8, 12)
    torch.testing.assert_close(made, expected)


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_img2img_in_resize_mode_3_starts_from_the_interpolated_latents(
    sd15_backend: DiffusersBackend,
) -> None:
    body = {
        "prompt": "a cat",
        "steps": 3,
        "width": 64,
        "height": 64,
        "seed": 5,
        "denoising_strength": 0.3,
        "init_images": [png_b64(init_image())],
    }
    latent = pixels(await sd15_backend.generate("img2img", {**body, "resize_mode": 3}))
    again = pixels(await sd15_backend.generate("img2img", {**body, "resize_mode": 3}))
    plain = pixels(await sd15_backend.generate("img2img", {**body, "resize_mode": 0}))
    assert latent.shape == (64, 64, 3) and np.array_equal(latent, again)
    assert (latent != plain).any()
