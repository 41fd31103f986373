"""A1111's sigma schedules that diffusers' schedulers cannot make themselves (torch).

Written from the published formulas (k-diffusion's `get_sigmas_*`, NVIDIA's Align Your Steps
tables, the KL-optimal schedule), which A1111 calls with the model's smallest and largest
trained sigma: each returns `steps + 1` descending sigmas, the last the one sampling ends at.
`install` makes a diffusers scheduler step through them: its own `set_timesteps` runs first
(its bookkeeping), then its sigmas and timesteps are replaced by these.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import torch

# NVIDIA's Align Your Steps sigmas for 10 steps (11 values), per model family.
AYS_SD15 = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)
AYS_SDXL = (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029)

# Schedules made here for every sampler that steps on one sigma at a time; karras and
# exponential only for the samplers whose diffusers class has no flag for them (Euler a).
OWN = frozenset({"polyexponential", "kl_optimal", "align_your_steps"})
FORMULAS = OWN | {"karras", "exponential", "beta"}
# Uniform and Normal from k-diffusion's formula on the classes whose own linspace timesteps stop
# one step short of t = 0, skipping the smallest sigma that A1111's schedule ends on.
UNIFORM = frozenset({"uniform", "normal"})
SHORT_LINSPACE = frozenset({"DPMSolverMultistepScheduler", "SDEMultistepScheduler"})


def karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    ramp = torch.linspace(0, 1, n)
    low, high = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _then_zero((high + ramp * (low - high)) ** rho)


def exponential(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    return _then_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n).exp())


def polyexponential(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> torch.Tensor:
    ramp = torch.linspace(1, 0, n) ** rho
    span = math.log(sigma_max) - math.log(sigma_min)
    return _then_zero(torch.exp(ramp * span + math.log(sigma_min)))


def kl_optimal(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """tan of a linear walk from atan(sigma_max) to atan(sigma_min): ends at sigma_min, not 0."""
    low, high = math.atan(sigma_min), math.atan(sigma_max)
    share = torch.arange(n + 1) / n
    return torch.tan(share * low + (1.0 - share) * high)


def align_your_steps(n: int, sdxl: bool) -> torch.Tensor:
    """The 10-step table as it is for 11 steps, otherwise interpolated log-linearly to n."""
    table = AYS_SDXL if sdxl else AYS_SD15
    if n == len(table):
        return _then_zero(torch.tensor(table, dtype=torch.float32))
    xs = np.linspace(0, 1, len(table))
    log_rising = np.log(np.array(table)[::-1])
    rising = np.exp(np.interp(np.linspace(0, 1, n), xs, log_rising))
    return _then_zero(torch.tensor(rising[::-1].copy(), dtype=torch.float32))


def beta(
    n: int, sigma_min: float, sigma_max: float, a: float = 0.6, b: float = 0.6
) -> torch.Tensor:
    """ "Beta Sampling is All You Need" as A1111 makes it (its default alpha = beta = 0.6)."""
    from scipy import stats  # the engine extra's

    shares = stats.beta.ppf(1 - np.linspace(0, 1, n), a, b)
    return _then_zero(torch.tensor(sigma_min + shares * (sigma_max - sigma_min)))


def uniform(n: int, trained: torch.Tensor) -> torch.Tensor:
    """k-diffusion's DiscreteSchedule.get_sigmas, A1111's Uniform (and its Normal, whose
    linspace from sigma_to_t(sigma_max) to sigma_to_t(sigma_min) is the same walk): n timesteps
    from the last trained one down to 0, each sigma interpolated between the trained log sigmas,
    so the schedule reaches the smallest trained sigma before 0."""
    t = torch.linspace(len(trained) - 1, 0, n)
    low, high, w = t.floor().long(), t.ceil().long(), t.frac()
    log_trained = trained.log()
    return _then_zero(((1 - w) * log_trained[low] + w * log_trained[high]).exp())


def _then_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas.float(), sigmas.new_zeros(1).float()])


def trained_sigmas(config: Any) -> torch.Tensor:
    """The model's 1,000 trained sigmas, ascending (from its scheduler config's betas)."""
    start, end, count = config["beta_start"], config["beta_end"], config["num_train_timesteps"]
    if config.get("beta_schedule", "scaled_linear") == "scaled_linear":
        betas = torch.linspace(start**0.5, end**0.5, count, dtype=torch.float64) ** 2
    else:  # linear
        betas = torch.linspace(start, end, count, dtype=torch.float64)
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt().float()


def schedule(name: str, n: int, trained: torch.Tensor, sdxl: bool) -> torch.Tensor:
    low, high = float(trained[0]), float(trained[-1])
    if name in UNIFORM:
        return uniform(n, trained)
    if name == "align_your_steps":
        return align_your_steps(n, sdxl)
    formula = {
        "karras": karras,
        "exponential": exponential,
        "polyexponential": polyexponential,
        "kl_optimal": kl_optimal,
        "beta": beta,
    }[name]
    return formula(n, low, high)


def sigma_to_t(sigmas: torch.Tensor, trained: torch.Tensor) -> torch.Tensor:
    """k-diffusion's DiscreteSchedule.sigma_to_t: the (fractional) timestep of each sigma,
    interpolated linearly between the trained log sigmas."""
    log_trained = trained.log()
    log_sigma = sigmas.log()
    dists = log_sigma[:, None] - log_trained[None, :]
    low = dists.ge(0).cumsum(dim=1).argmax(dim=1).clamp(max=len(trained) - 2)
    high = low + 1
    w = ((log_trained[low] - log_sigma) / (log_trained[low] - log_trained[high])).clamp(0, 1)
    return (1 - w) * low + w * high


def denoised(
    config: Any, model_output: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor
) -> torch.Tensor:
    """k-diffusion's CompVisDenoiser (CompVisVDenoiser for a v-prediction `config`): the
    denoised estimate from the UNet's output at `sample`, which is at `sigma`."""
    if config["prediction_type"] == "v_prediction":
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
    return sample - sigma * model_output


def install(scheduler: Any, name: str, sdxl: bool) -> None:
    """Make `scheduler` (one run's) step through A1111's `name` schedule."""
    trained = trained_sigmas(scheduler.config)
    own = scheduler.set_timesteps

    @functools.wraps(own)
    def set_timesteps(num_inference_steps: int, device: Any = None, **kwargs: Any) -> None:
        own(num_inference_steps, device=device, **kwargs)
        put(scheduler, schedule(name, num_inference_steps, trained, sdxl), device)

    scheduler.set_timesteps = set_timesteps


def put(
    scheduler: Any, sigmas: torch.Tensor, device: Any, timesteps: torch.Tensor | None = None
) -> None:
    """Make `scheduler` step through `sigmas` (at `timesteps`, or k-diffusion's for them): a
    two-stage one (engine/two_stage.py) interleaves them itself."""
    if hasattr(scheduler, "use_sigmas"):
        scheduler.use_sigmas(sigmas, device)
        return
    device = scheduler.sigmas.device if device is None else device
    if timesteps is None:
        timesteps = sigma_to_t(sigmas[:-1], trained_sigmas(scheduler.config))
    scheduler.sigmas = sigmas.to(device=device)
    scheduler.timesteps = timesteps.to(device=device)


def discard_next_to_last(scheduler: Any) -> None:
    """A1111's `discard_next_to_last_sigma` (DPM2, DPM2 a, DPM++ 3M SDE): the schedule for one
    step more, without its next-to-last sigma; the steps stay as asked."""
    own = scheduler.set_timesteps

    @functools.wraps(own)
    def set_timesteps(num_inference_steps: int, device: Any = None, **kwargs: Any) -> None:
        own(num_inference_steps + 1, device=device, **kwargs)
        made = getattr(scheduler, "flat_sigmas", scheduler.sigmas)
        kept = torch.cat([made[:-2], made[-1:]])
        timesteps = None if hasattr(scheduler, "use_sigmas") else scheduler.timesteps[:-1]
        put(scheduler, kept, device, timesteps)
        scheduler.num_inference_steps = num_inference_steps

    scheduler.set_timesteps = set_timesteps
