"""A1111's schedule types that diffusers cannot make (Polyexponential, KL Optimal, Align Your
Steps, and Karras/Exponential/Beta for Euler a), against the formulas A1111 v1.10 calls
(modules/sd_schedulers.py, k-diffusion's sampling.get_sigmas_*, written out here in numpy) with
the model's smallest and largest trained sigma, on tiny random-weight models on the CPU."""

from __future__ import annotations

import base64
import io
import itertools
import json
import math
from typing import TYPE_CHECKING, Any

import pytest

torch = pytest.importorskip("torch", reason="the engine tests need the engine extra (torch)")
pytest.importorskip("diffusers", reason="the engine tests need the engine extra (diffusers)")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from scipy import stats  # noqa: E402

from a1111_proxy.backends.diffusers import DiffusersBackend  # noqa: E402
from a1111_proxy.engine import samplers, schedulers  # noqa: E402
from a1111_proxy.engine.errors import UnknownSampler  # noqa: E402

if TYPE_CHECKING:
    from tests.engine.conftest import TinyModels


pytestmark = [pytest.mark.engine]


def model_sigmas() -> np.ndarray:
    """k-diffusion's CompVisDenoiser sigmas for SD's scaled-linear betas (0.00085 to 0.012)."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    alphas_cumprod = np.cumprod(1.0 - betas)
    return np.sqrt((1 - alphas_cumprod) / alphas_cumprod)


def reference(name: str, n: int, sdxl: bool = False) -> np.ndarray:
    trained = model_sigmas()
    low, high = float(trained[0]), float(trained[-1])
    zero = [0.0]
    if name == "Polyexponential":  # get_sigmas_polyexponential, rho 1
        ramp = np.linspace(1, 0, n) ** 1.0
        return np.append(np.exp(ramp * (math.log(high) - math.log(low)) + math.log(low)), zero)
    if name == "KL Optimal":  # sd_schedulers.kl_optimal: no zero at the end
        i = np.arange(n + 1)
        return np.tan(i / n * math.atan(low) + (1.0 - i / n) * math.atan(high))
    if name == "Karras":  # get_sigmas_karras, rho 7
        ramp = np.linspace(0, 1, n)
        lo, hi = low ** (1 / 7), high ** (1 / 7)
        return np.append((hi + ramp * (lo - hi)) ** 7, zero)
    if name == "Exponential":
        return np.append(np.exp(np.linspace(math.log(high), math.log(low), n)), zero)
    if name == "Beta":  # beta_scheduler, opts.beta_dist_alpha = beta = 0.6
        ts = [stats.beta.ppf(x, 0.6, 0.6) for x in 1 - np.linspace(0, 1, n)]
        return np.append([low + x * (high - low) for x in ts], zero)
    table = (
        [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029]
        if sdxl
        else [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]
    )
    if n == len(table):
        return np.append(table, zero)
    xs, ys = np.linspace(0, 1, len(table)), np.log(table[::-1])
    return np.append(np.exp(np.interp(np.linspace(0, 1, n), xs, ys))[::-1], zero)


def sigma_to_t(sigma: float) -> float:
    """k-diffusion's DiscreteSchedule.sigma_to_t."""
    log_sigmas = np.log(model_sigmas())
    log_sigma = math.log(sigma)
    dists = log_sigma - log_sigmas
    low = min(int(np.cumsum(dists >= 0).argmax()), len(log_sigmas) - 2)
    w = (log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1])
    w = min(max(w, 0.0), 1.0)
    return (1 - w) * low + w * (low + 1)


@pytest.fixture(scope="module")
def sd15(tmp_path_factory: pytest.TempPathFactory, tiny_models: TinyModels) -> Any:
    return tiny_models.sd15(tmp_path_factory.mktemp("schedules-15") / "tiny15")


CASES = [
    ("Euler", "Polyexponential", 8),
    ("Euler", "KL Optimal", 7),
    ("DPM++ 2M", "Align Your Steps", 11),
    ("DPM++ 2M", "Align Your Steps", 20),
    ("Euler a", "Karras", 9),
    ("Euler a", "Exponential", 6),
    ("Euler a", "Beta", 10),
    ("LMS", "KL Optimal", 5),
]


@pytest.mark.parametrize(("sampler", "schedule", "steps"), CASES)
def test_a_schedule_diffusers_lacks_steps_through_a1111s_sigmas_and_their_timesteps(
    sd15: Any, sampler: str, schedule: str, steps: int
) -> None:
    scheduler = schedulers.make(sd15.scheduler.config, samplers.resolve(sampler, schedule))
    scheduler.set_timesteps(steps)
    expected = reference(schedule, steps)
    assert np.allclose(scheduler.sigmas.double().numpy(), expected, rtol=1e-5, atol=1e-6)
    timesteps = [sigma_to_t(float(s)) for s in expected[:-1]]
    assert np.allclose(scheduler.timesteps.double().numpy(), timesteps, atol=1e-3)


def test_align_your_steps_takes_the_sdxl_table_for_an_sdxl_model(sd15: Any) -> None:
    resolved = samplers.resolve("Euler", "Align Your Steps")
    scheduler = schedulers.make(sd15.scheduler.config, resolved, sdxl=True)
    scheduler.set_timesteps(10)
    assert np.allclose(scheduler.sigmas.numpy(), reference("Align Your Steps", 10, sdxl=True))
    assert not np.allclose(scheduler.sigmas.numpy(), reference("Align Your Steps", 10))


def test_euler_on_kl_optimal_is_k_diffusions_sample_euler_on_the_same_sigmas(sd15: Any) -> None:
    scheduler = schedulers.make(sd15.scheduler.config, samplers.resolve("Euler", "KL Optimal"))
    scheduler.set_timesteps(6)
    start = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(5))

    def eps(x: Any, sigma: float) -> Any:  # a toy UNet on the scaled input, as c_in scales it
        return 0.3 * x / (sigma**2 + 1) ** 0.5 + 0.1

    sigmas = reference("KL Optimal", 6)
    x = start.double() * sigmas[0]
    for sigma, sigma_next in itertools.pairwise(sigmas):
        denoised = x - sigma * eps(x, sigma)  # sample_euler with s_churn 0
        x = x + (x - denoised) / sigma * (sigma_next - sigma)
    engine = start * scheduler.sigmas[0]
    for t in scheduler.timesteps:
        model_output = 0.3 * scheduler.scale_model_input(engine, t) + 0.1
        engine = scheduler.step(model_output, t, engine).prev_sample
    assert torch.allclose(engine.double(), x, atol=1e-4)


def test_a_sampler_that_cannot_step_a_formula_schedule_says_which_can() -> None:
    with pytest.raises(UnknownSampler, match="'Heun' cannot use the 'KL Optimal' schedule") as e:
        samplers.resolve("Heun", "KL Optimal")
    assert "Euler" in str(e.value) and "DPM++ 2M" in str(e.value)
    with pytest.raises(UnknownSampler, match="'DDIM' cannot use the 'Karras' schedule"):
        samplers.resolve("DDIM", "Karras")
    assert samplers.resolve("Euler a", "Karras").schedule == "karras"
    assert samplers.resolve("DPM++ 2M", "align_your_steps").schedule_label == "Align Your Steps"


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_a_generation_on_align_your_steps_names_it_in_the_infotext_and_differs_from_uniform(
    sd15_backend: DiffusersBackend,
) -> None:
    body = {"prompt": "a cat", "steps": 4, "width": 64, "height": 64, "seed": 3}
    ays = await sd15_backend.generate("txt2img", {**body, "scheduler": "Align Your Steps"})
    uniform = await sd15_backend.generate("txt2img", {**body, "scheduler": "Uniform"})
    assert "Schedule type: Align Your Steps" in json.loads(ays["info"])["infotexts"][0]

    def pixels(result: dict[str, Any]) -> Any:
        png = Image.open(io.BytesIO(base64.b64decode(result["images"][0])))
        return np.asarray(png.convert("RGB"), dtype=np.int16)

    assert np.isfinite(pixels(ays)).all() and (pixels(ays) != pixels(uniform)).any()
    listed = {entry["name"] for entry in await sd15_backend.catalogue_entry("schedulers")}
    assert {"polyexponential", "kl_optimal", "align_your_steps"} <= listed
