"""Small A1111 v1.10 parities (issue 17 item 6), each against A1111's computation ported here."""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch", reason="the engine tests need the engine extra (torch)")
diffusers = pytest.importorskip("diffusers", reason="the engine tests need the engine extra (diffusers)")

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from a1111_proxy.engine import images, samplers, schedulers  # noqa: E402
from a1111_proxy.engine.infotext import Generation, ModelInfo  # noqa: E402
from a1111_proxy.engine.params import Params  # noqa: E402
from a1111_proxy.engine.pipeline import prepare_inputs  # noqa: E402
from tests.engine.results import png_b64  # noqa: E402

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
