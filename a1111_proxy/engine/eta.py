"""A1111's eta on the diffusers schedulers that fix it at 1 (torch, diffusers).

A1111 passes its samplers' functions an eta where they take one (Sampler.initialize): the
request's `eta`, else the option `eta_ancestral` (k-diffusion's, default 1) or `eta_ddim`
(DDIM's, default 0); Params.eta_for picks it. k-diffusion's ancestral step with eta takes
sigma_up = min(sigma_next, eta * sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2)) and
sigma_down = sqrt(sigma_next^2 - sigma_up^2) (get_ancestral_step); the SDE solvers scale their
noise and the h of their exponential terms by it. Here: Euler a (diffusers' Euler ancestral
with that step), and `apply`, which gives a run's scheduler the eta (engine/two_stage.py's take
it as an attribute).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.schedulers.scheduling_euler_ancestral_discrete import (
    EulerAncestralDiscreteScheduler,
    EulerAncestralDiscreteSchedulerOutput,
)
from diffusers.utils.torch_utils import randn_tensor


def ancestral_step(
    sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """k-diffusion's get_ancestral_step: (sigma_down, sigma_up)."""
    if not eta:
        return sigma_next, torch.zeros_like(sigma_next)
    up = torch.minimum(
        sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
    )
    return (sigma_next**2 - up**2) ** 0.5, up


class EulerAncestralScheduler(EulerAncestralDiscreteScheduler):
    """A1111's Euler a (sample_euler_ancestral) with its eta; at eta 1, diffusers' own step."""

    eta = 1.0

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Any,
        sample: torch.Tensor,
        generator: Any = None,
        return_dict: bool = True,
    ) -> Any:
        if self.eta == 1.0:
            return super().step(
                model_output, timestep, sample, generator=generator, return_dict=return_dict
            )
        if self.step_index is None:
            self._init_step_index(timestep)
        i: int = self.step_index
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        sample = sample.to(torch.float32)
        x0 = self._denoised(model_output, sample, sigma)
        down, up = ancestral_step(sigma, sigma_next, self.eta)
        prev = sample + (sample - x0) / sigma * (down - sigma)
        if sigma_next > 0:
            drawn = randn_tensor(
                model_output.shape,
                dtype=model_output.dtype,
                device=model_output.device,
                generator=generator,
            )
            prev = prev + drawn * up
        prev = prev.to(model_output.dtype)
        self._step_index = i + 1  # type: ignore[assignment]
        if not return_dict:
            return (prev, x0)
        return EulerAncestralDiscreteSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    def _denoised(
        self, model_output: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor
    ) -> torch.Tensor:
        if self.config["prediction_type"] == "v_prediction":
            return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
        return sample - sigma * model_output


def apply(scheduler: Any, eta: float | None) -> None:
    """Give one run's scheduler the eta it runs with (None: it takes none, or its default)."""
    if eta is not None and hasattr(scheduler, "eta"):
        scheduler.eta = eta


CLASSES: dict[str, type[Any]] = {"EulerAncestralScheduler": EulerAncestralScheduler}
