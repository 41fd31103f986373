"""Small A1111 v1.10 parities (issue 17 item 6), each against A1111's computation ported here."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import pytest

torch = pytest.importorskip("torch", reason="the engine tests need the engine extra (torch)")
diffusers = pytest.importorskip(
    "diffusers", reason="the engine tests need the engine extra (diffusers)"
)

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from a1111_proxy.backends.diffusers import DiffusersBackend  # noqa: E402
from a1111_proxy.engine import images, samplers, schedulers  # noqa: E402
from a1111_proxy.engine.infotext import Generation, ModelInfo  # noqa: E402
from a1111_proxy.engine.params import Params  # noqa: E402
from a1111_proxy.engine.pipeline import prepare_inputs  # noqa: E402
from tests.engine.conftest import cpu_backend, tiny_sd15_root  # noqa: E402
from tests.engine.results import pixels, png_b64  # noqa: E402

if TYPE_CHECKING:
    from tests.engine.conftest import TinyModels

# SD 1.x's noise schedule, as its scheduler_config.json gives it.
SD15_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
}


def test_a_whole_picture_inpaint_overlays_with_a1111s_doubled_mask() -> None:
    picture = Image.new("RGB", (64, 64), (40, 90, 160))
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).ellipse((16, 16, 48, 48), fill=255)
    body = {
        "prompt": "a cat",
        "init_images": [png_b64(picture)],
        "mask": png_b64(mask),
        "mask_blur": 4,
        "inpaint_full_res": False,
        "width": 64,
        "height": 64,
    }
    params = Params.from_payload("img2img", body, rng=random.Random(0))
    inputs = prepare_inputs(params, Generation(params, ModelInfo("m", None), [1], [2]), 0)

    # A1111's processing.py, inpaint_full_res False: the blurred mask resized to the job's size,
    # then mask_for_overlay = clip(mask * 2, 0, 255) as uint8.
    blurred = images.prepare_mask(mask, invert=False, blur_x=4, blur_y=4)
    resized = np.array(images.resize(blurred, params.resize_mode, 64, 64))
    expected = np.clip(resized.astype(np.float32) * 2, 0, 255).astype(np.uint8)
    assert inputs.original_mask is not None
    assert np.array_equal(np.array(inputs.original_mask), expected)
    assert 0 < np.count_nonzero((resized > 0) & (resized < 128))  # the blur's half is doubled


def _kdiffusion_get_sigmas(n: int, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """k-diffusion's DiscreteSchedule.get_sigmas(n) (A1111's Uniform, and its Normal: the linspace
    from sigma_to_t(sigma_max) = 999 to sigma_to_t(sigma_min) = 0), with t_to_sigma."""
    log_sigmas = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).log()
    t = torch.linspace(len(log_sigmas) - 1, 0, n)
    low_idx, high_idx, w = t.floor().long(), t.ceil().long(), t.frac()
    log_sigma = (1 - w) * log_sigmas[low_idx] + w * log_sigmas[high_idx]
    return torch.cat([log_sigma.exp(), log_sigma.new_zeros([1])])


@pytest.mark.parametrize("sampler", ["DPM++ 2M", "DPM++ 2M SDE", "DPM++ 3M SDE"])
@pytest.mark.parametrize("schedule", ["Uniform", "Normal"])
def test_dpmpp_multistep_samplers_on_uniform_and_normal_end_on_the_smallest_sigma_as_a1111(
    sampler: str, schedule: str
) -> None:
    resolved = samplers.resolve(sampler, schedule)
    base = diffusers.DDIMScheduler.from_config(SD15_SCHEDULER).config
    scheduler = schedulers.make(base, resolved)
    scheduler.set_timesteps(20)

    alphas_cumprod = diffusers.DDIMScheduler.from_config(SD15_SCHEDULER).alphas_cumprod.double()
    if resolved.sampler.discard_next_to_last_sigma:  # A1111: steps + 1, then sigmas[:-2] + [-1:]
        full = _kdiffusion_get_sigmas(21, alphas_cumprod)
        expected = torch.cat([full[:-2], full[-1:]])
        ts = torch.linspace(999, 0, 21, dtype=torch.float64)[:-1]
    else:
        expected = _kdiffusion_get_sigmas(20, alphas_cumprod)
        ts = torch.linspace(999, 0, 20, dtype=torch.float64)
    assert scheduler.sigmas.shape == expected.shape
    torch.testing.assert_close(scheduler.sigmas.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scheduler.timesteps.double(), ts, rtol=0, atol=1e-3)


def _a1111_ddim(model: Any, x: torch.Tensor, steps: int, alphas_cumprod: torch.Tensor) -> Any:
    """A1111's CompVisSampler.get_timesteps and sd_samplers_timesteps_impl.ddim (eta 0), with
    the timesteps it evaluated."""
    timesteps = torch.clip(torch.asarray(list(range(0, 1000, 1000 // steps))) + 1, 0, 999)
    alphas = alphas_cumprod[timesteps]
    alphas_prev = alphas_cumprod[torch.nn.functional.pad(timesteps[:-1], pad=(1, 0))].double()
    sqrt_one_minus_alphas = torch.sqrt(1 - alphas)
    s_x = x.new_ones((x.shape[0], 1, 1, 1))
    evaluated = []
    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        evaluated.append(int(timesteps[index]))
        e_t = model(x, timesteps[index].item())
        a_t = alphas[index].item() * s_x
        a_prev = alphas_prev[index].item() * s_x
        sigma_t = 0.0 * s_x  # eta 0
        sqrt_one_minus_at = sqrt_one_minus_alphas[index].item() * s_x
        pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
        dir_xt = (1.0 - a_prev - sigma_t**2).sqrt() * e_t
        x = a_prev.sqrt() * pred_x0 + dir_xt
    return x, evaluated


@pytest.mark.parametrize("steps", [30, 7, 20, 9])
def test_ddim_walks_a1111s_timesteps_when_steps_do_not_divide_1000(steps: int) -> None:
    scheduler = schedulers.make(
        diffusers.DDIMScheduler.from_config(SD15_SCHEDULER).config, samplers.resolve("DDIM")
    )
    scheduler.set_timesteps(steps)

    def model(x: torch.Tensor, t: float) -> torch.Tensor:
        return 0.3 * x + torch.cos(x * 3 + t / 100)

    start = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    expected, evaluated = _a1111_ddim(model, start, steps, scheduler.alphas_cumprod)
    x = start
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, float(t)), t, x).prev_sample
    assert [int(t) for t in scheduler.timesteps] == evaluated
    torch.testing.assert_close(x, expected, rtol=0, atol=0)


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
async def backend(
    tmp_path_factory: pytest.TempPathFactory, tiny_models: TinyModels
) -> AsyncIterator[DiffusersBackend]:
    made = cpu_backend(tiny_sd15_root(tmp_path_factory.mktemp("parity"), tiny_models))
    yield made
    await made.aclose()


@pytest.mark.anyio
async def test_ddim_on_a1111s_timesteps_runs_txt2img_and_img2img(backend: DiffusersBackend) -> None:
    body = {"prompt": "a cat", "sampler_name": "DDIM", "steps": 7, "width": 64, "height": 64}
    first = await backend.generate("txt2img", {**body, "seed": 3})
    again = await backend.generate(
        "img2img",
        {**body, "seed": 4, "init_images": [first["images"][0]], "denoising_strength": 0.5},
    )
    assert np.isfinite(pixels(first)).all() and np.isfinite(pixels(again)).all()
    assert (pixels(first) != pixels(again)).any()
