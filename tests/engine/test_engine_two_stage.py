"""DPM++ 2S a, DPM2 a and DPM2 (engine/two_stage.py) and A1111's discard_next_to_last_sigma,
against k-diffusion's sample_dpmpp_2s_ancestral, sample_dpm_2_ancestral and sample_dpm_2 and
A1111 v1.10's KDiffusionSampler.get_sigmas, written out here, on a toy model and the tiny
random-weight SD1.5 on the CPU."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest

torch = pytest.importorskip("torch", reason="the engine tests need the engine extra (torch)")
pytest.importorskip("diffusers", reason="the engine tests need the engine extra (diffusers)")

import numpy as np  # noqa: E402

from a1111_proxy.backends.diffusers import DiffusersBackend  # noqa: E402
from a1111_proxy.engine import conditioning, samplers, schedulers  # noqa: E402

if TYPE_CHECKING:
    from tests.engine.conftest import TinyModels

from tests.engine.results import pixels  # noqa: E402

pytestmark = [pytest.mark.engine]
SEEDS = [11, 12]


def trained() -> np.ndarray:
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    alphas_cumprod = np.cumprod(1.0 - betas)
    return np.sqrt((1 - alphas_cumprod) / alphas_cumprod)


def karras(n: int) -> Any:
    low, high = trained()[0] ** (1 / 7), trained()[-1] ** (1 / 7)
    ramp = np.linspace(0, 1, n)
    return torch.tensor(np.append((high + ramp * (low - high)) ** 7, 0.0))


def exponential(n: int) -> Any:
    ramp = np.linspace(math.log(trained()[-1]), math.log(trained()[0]), n)
    return torch.tensor(np.append(np.exp(ramp), 0.0))


def a1111_sigmas(formula: Callable[[int], Any], steps: int, discard: bool) -> Any:
    """KDiffusionSampler.get_sigmas: steps + 1 with discard_next_to_last_sigma, then drop it."""
    sigmas = formula(steps + 1 if discard else steps)
    return torch.cat([sigmas[:-2], sigmas[-1:]]) if discard else sigmas


def ancestral_step(sigma_from: float, sigma_to: float, eta: float) -> tuple[float, float]:
    """k-diffusion's get_ancestral_step."""
    if not eta:
        return sigma_to, 0.0
    up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - up**2) ** 0.5, up


def model(x: Any, sigma: float) -> Any:
    """A toy CompVisDenoiser: eps from the c_in-scaled input, denoised = x - sigma * eps."""
    return x - sigma * (0.3 * x / (sigma**2 + 1) ** 0.5 + 0.1)


def reference(name: str, sigmas: Any, x: Any, noise: Callable[[], Any]) -> Any:
    """sample_dpmpp_2s_ancestral (eta 1), sample_dpm_2_ancestral (eta 1), sample_dpm_2."""
    sigmas = [float(s) for s in sigmas]
    x = x * sigmas[0]
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        down, up = ancestral_step(sigma, sigma_next, 0.0 if name == "DPM2" else 1.0)
        if down == 0:
            x = x + (x - denoised) / sigma * (down - sigma)
        elif name == "DPM++ 2S a":
            t, t_next = -math.log(sigma), -math.log(down)
            h = t_next - t
            s = t + h / 2
            x_2 = (math.exp(-s) / math.exp(-t)) * x - math.expm1(-h / 2) * denoised
            denoised_2 = model(x_2, math.exp(-s))
            x = (math.exp(-t_next) / math.exp(-t)) * x - math.expm1(-h) * denoised_2
        else:
            mid = math.exp((math.log(sigma) + math.log(down)) / 2)
            x_2 = x + (x - denoised) / sigma * (mid - sigma)
            denoised_2 = model(x_2, mid)
            x = x + (x_2 - denoised_2) / mid * (down - sigma)
        if sigma_next > 0 and up > 0:
            x = x + noise() * up
    return x


def engine(scheduler: Any, x: Any, generators: list[Any]) -> Any:
    tracking = schedulers.Tracking(scheduler)
    tracking.generators = generators
    x = x * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps = 0.3 * scheduler.scale_model_input(x, t) + 0.1
        x = scheduler.step(eps, t, x, generator=None).prev_sample
    return x


@pytest.fixture(scope="module")
def sd15(tmp_path_factory: pytest.TempPathFactory, tiny_models: TinyModels) -> Any:
    return tiny_models.sd15(tmp_path_factory.mktemp("two-stage-15") / "tiny15")


@pytest.mark.parametrize(
    ("name", "discard"), [("DPM++ 2S a", False), ("DPM2 a", True), ("DPM2", True)]
)
def test_two_stage_samplers_step_as_k_diffusions_loop_with_the_images_generators(
    sd15: Any, name: str, discard: bool
) -> None:
    scheduler = schedulers.make(sd15.scheduler.config, samplers.resolve(name))
    scheduler.set_timesteps(6)
    expected_sigmas = a1111_sigmas(karras, 6, discard)
    torch.testing.assert_close(scheduler.flat_sigmas.double(), expected_sigmas, rtol=1e-4, atol=0)
    start = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(5))
    made = engine(scheduler, start, [torch.Generator().manual_seed(s) for s in SEEDS])
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]

    def image_rng() -> Any:  # A1111's ImageRNG.next(): one draw per image from its generator
        return torch.stack([torch.randn((4, 8, 8), generator=g) for g in generators]).double()

    expected = reference(name, expected_sigmas, start.double(), image_rng)
    torch.testing.assert_close(made.double(), expected, rtol=1e-4, atol=1e-4)
    assert (
        len(scheduler.timesteps) == 2 * 6 - 1 == conditioning.total_steps(samplers.resolve(name), 6)
    )


def test_dpmpp_2s_a_is_ancestral_its_noise_comes_from_each_images_seed(sd15: Any) -> None:
    def run(seeds: list[int]) -> Any:
        scheduler = schedulers.make(sd15.scheduler.config, samplers.resolve("DPM++ 2S a"))
        scheduler.set_timesteps(5)
        start = torch.zeros((2, 4, 8, 8))
        return engine(scheduler, start, [torch.Generator().manual_seed(s) for s in seeds])

    first, again, other = run([1, 2]), run([1, 2]), run([1, 3])
    assert torch.equal(first, again)
    assert torch.equal(first[0], other[0]) and not torch.equal(first[1], other[1])


@pytest.mark.parametrize(
    ("name", "schedule", "formula"),
    [("DPM++ 3M SDE", "Automatic", exponential), ("DPM++ 3M SDE", "Karras", karras)],
)
def test_dpmpp_3m_sde_drops_the_next_to_last_sigma_of_one_step_more(
    sd15: Any, name: str, schedule: str, formula: Callable[[int], Any]
) -> None:
    scheduler = schedulers.make(sd15.scheduler.config, samplers.resolve(name, schedule))
    scheduler.set_timesteps(7)
    torch.testing.assert_close(
        scheduler.sigmas.double(), a1111_sigmas(formula, 7, True), rtol=1e-4, atol=0
    )
    assert len(scheduler.timesteps) == 7 and scheduler.num_inference_steps == 7


def test_a_formula_schedule_on_a_two_stage_sampler_is_discarded_and_interleaved(
    sd15: Any,
) -> None:
    scheduler = schedulers.make(sd15.scheduler.config, samplers.resolve("DPM2 a", "KL Optimal"))
    scheduler.set_timesteps(5)
    low, high = math.atan(trained()[0]), math.atan(trained()[-1])
    share = np.arange(7) / 6
    kl = torch.tensor(np.tan(share * low + (1 - share) * high))  # kl_optimal(6): no 0 at the end
    torch.testing.assert_close(
        scheduler.flat_sigmas.double(), torch.cat([kl[:-2], kl[-1:]]), rtol=1e-5, atol=0
    )
    assert len(scheduler.timesteps) == 2 * 5  # it ends at sigma_min: every step evaluates twice


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_dpmpp_2s_a_runs_txt2img_and_img2img_through_the_pipelines(
    sd15_backend: DiffusersBackend,
) -> None:
    body = {"prompt": "a cat", "steps": 4, "width": 64, "height": 64, "seed": 3}
    made = await sd15_backend.generate("txt2img", {**body, "sampler_name": "DPM++ 2S a"})
    again = await sd15_backend.generate("txt2img", {**body, "sampler_name": "DPM++ 2S a"})
    assert np.array_equal(pixels(made), pixels(again)) and np.isfinite(pixels(made)).all()
    assert "Sampler: DPM++ 2S a" in json.loads(made["info"])["infotexts"][0]
    edited = await sd15_backend.generate(
        "img2img",
        {
            **body,
            "sampler_name": "DPM2 a",
            "denoising_strength": 0.5,
            "init_images": [made["images"][0]],
        },
    )
    assert (pixels(edited) != pixels(made)).any()


def test_between_a_steps_two_evaluations_the_scheduler_says_it_is_mid_step(sd15: Any) -> None:
    scheduler = schedulers.make(sd15.scheduler.config, samplers.resolve("DPM++ 2S a"))
    scheduler.set_timesteps(3)
    x = torch.ones((1, 4, 8, 8)) * scheduler.init_noise_sigma
    seen = []
    for t in scheduler.timesteps:
        x = scheduler.step(torch.zeros_like(x), t, x).prev_sample
        seen.append(scheduler.state_in_first_order)  # what engine/noise_mask.py asks
    assert seen == [False, True, False, True, True]


def test_with_the_nv_source_dpmpp_2s_a_draws_its_step_noise_from_philox(sd15: Any) -> None:
    from a1111_proxy.engine.noise import Philox

    scheduler = schedulers.make(sd15.scheduler.config, samplers.resolve("DPM++ 2S a"))
    scheduler.set_timesteps(4)
    start = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(5))
    made = engine(scheduler, start, [Philox(s) for s in SEEDS])
    generators = [Philox(s) for s in SEEDS]

    def image_rng() -> Any:
        return torch.stack([g.randn((4, 8, 8)) for g in generators]).double()

    expected = reference("DPM++ 2S a", a1111_sigmas(karras, 4, False), start.double(), image_rng)
    torch.testing.assert_close(made.double(), expected, rtol=1e-4, atol=1e-4)
