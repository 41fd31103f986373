"""A1111's eta on the diffusers schedulers that fix it at 1 (torch, diffusers).

A1111 passes its samplers' functions an eta where they take one (Sampler.initialize): the
request's `eta`, else the option `eta_ancestral` (k-diffusion's, default 1) or `eta_ddim`
(DDIM's, default 0); Params.eta_for picks it. k-diffusion's ancestral step with eta takes
sigma_up = min(sigma_next, eta * sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2)) and
sigma_down = sqrt(sigma_next^2 - sigma_up^2) (get_ancestral_step); the SDE solvers scale their
noise and the h of their exponential terms by it. Here: Euler a (diffusers' Euler ancestral
with that step), DPM++ SDE (diffusers', with the eta), DPM++ 2M SDE / 2M SDE Heun / 3M SDE
(diffusers' multistep solver with k-diffusion's step), and `apply`, which gives a run's
scheduler the eta (engine/two_stage.py's take it as an attribute).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_dpmsolver_sde import (
    BrownianTreeNoiseSampler,
    DPMSolverSDEScheduler,
    DPMSolverSDESchedulerOutput,
)
from diffusers.schedulers.scheduling_euler_ancestral_discrete import (
    EulerAncestralDiscreteScheduler,
    EulerAncestralDiscreteSchedulerOutput,
)
from diffusers.utils.torch_utils import randn_tensor

from a1111_proxy.engine import sigmas as schedules


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
        x0 = schedules.denoised(self.config, model_output, sample, sigma)
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


class SDEScheduler(DPMSolverSDEScheduler):
    """A1111's DPM++ SDE (k-diffusion's sample_dpmpp_sde, r = 1/2) with its eta: both of a
    step's moves, to the midpoint and to the next sigma, ancestral with that eta; at eta 1,
    diffusers' own step."""

    eta = 1.0

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Any,
        sample: torch.Tensor,
        return_dict: bool = True,
        s_noise: float = 1.0,
    ) -> Any:
        if self.eta == 1.0:
            return super().step(model_output, timestep, sample, return_dict, s_noise)
        if self.step_index is None:
            self._init_step_index(timestep)
        i: int = self.step_index  # type: ignore[assignment]  # set just above
        first = self.state_in_first_order
        sigma, sigma_next = self.sigmas[i - int(not first)], self.sigmas[i + int(first)]
        noise: Any = self.noise_sampler
        if noise is None:
            low, high = self.sigmas[self.sigmas > 0].min(), self.sigmas.max()
            noise = BrownianTreeNoiseSampler(
                sample, low.item(), high.item(), self.noise_sampler_seed
            )
            self.noise_sampler = noise
        t, t_next = sigma.log().neg(), sigma_next.log().neg()
        mid = (t + (t_next - t) * 0.5).neg().exp()
        x0 = schedules.denoised(self.config, model_output, sample, sigma if first else mid)
        if sigma_next == 0:
            prev = sample + (sample - x0) / sigma * (sigma_next - sigma)
        else:
            start = sample if first else self.sample
            to = mid if first else sigma_next
            down, up = ancestral_step(sigma, to, self.eta)
            t_down = down.log().neg()
            prev = (t_down.neg().exp() / t.neg().exp()) * start - (t - t_down).expm1() * x0
            prev = prev + noise(sigma, to) * s_noise * up
            kept: Any = (sample, mid) if first else (None, None)
            self.sample, self.mid_point_sigma = kept
        self._step_index = i + 1  # type: ignore[assignment]
        if not return_dict:
            return (prev, x0)
        return DPMSolverSDESchedulerOutput(prev_sample=prev, pred_original_sample=x0)


class SDEMultistepScheduler(DPMSolverMultistepScheduler):
    """A1111's DPM++ 2M SDE, 2M SDE Heun and 3M SDE: k-diffusion's sample_dpmpp_2m_sde and
    sample_dpmpp_3m_sde with their eta, on diffusers' multistep machinery (its latents in VP
    form, x = x_k / sqrt(sigma^2 + 1)). With H = (1 + eta) h, h the step in -log sigma:

        x' = (sigma'/sigma) e^(-eta h) x + (1 - e^-H) D0 + [the order's terms in D1, D2]
             + sigma' sqrt(1 - e^(-2 eta h)) z

    2M SDE's D1 term is (1 - e^-H) / 2 (midpoint) or phi_2 = (e^-H - 1) / H + 1 (Heun); 3M SDE's
    second step takes phi_2 D1, its later ones phi_2 D1 - (phi_2 / H - 1/2) D2. The last step,
    to sigma 0, is the denoised image. diffusers' own (eta 1 only) differs in 3M SDE's D2 term.
    """

    eta = 1.0

    def dpm_solver_first_order_update(
        self,
        model_output: torch.Tensor,
        *args: Any,
        sample: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if self.config["algorithm_type"] != "sde-dpmsolver++":
            return super().dpm_solver_first_order_update(
                model_output, *args, sample=sample, noise=noise, **kwargs
            )
        return self._sde_step([model_output], sample, noise)

    def multistep_dpm_solver_second_order_update(
        self,
        model_output_list: list[torch.Tensor],
        *args: Any,
        sample: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if self.config["algorithm_type"] != "sde-dpmsolver++":
            return super().multistep_dpm_solver_second_order_update(
                model_output_list, *args, sample=sample, noise=noise, **kwargs
            )
        return self._sde_step(model_output_list[-2:][::-1], sample, noise)

    def multistep_dpm_solver_third_order_update(
        self,
        model_output_list: list[torch.Tensor],
        *args: Any,
        sample: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if self.config["algorithm_type"] != "sde-dpmsolver++":
            return super().multistep_dpm_solver_third_order_update(
                model_output_list, *args, sample=sample, noise=noise, **kwargs
            )
        return self._sde_step(model_output_list[-3:][::-1], sample, noise)

    def _sde_step(
        self, denoised: list[torch.Tensor], sample: torch.Tensor | None, noise: torch.Tensor | None
    ) -> torch.Tensor:
        """One step with `denoised` (this step's first, then the earlier steps')."""
        assert sample is not None and noise is not None
        i: int = self.step_index
        ends = [
            self._sigma_to_alpha_sigma_t(self.sigmas[i + 1 - k]) for k in range(len(denoised) + 1)
        ]
        (alpha_t, sigma_t), (_, sigma_s0) = ends[0], ends[1]
        if sigma_t == 0:
            return denoised[0]
        lambdas = [torch.log(a) - torch.log(s) for a, s in ends]
        h, *earlier = (lambdas[k] - lambdas[k + 1] for k in range(len(denoised)))
        eta, big = self.eta, (1 + self.eta) * h
        x = (sigma_t / sigma_s0 * torch.exp(-eta * h)) * sample
        x = x + alpha_t * (-big).expm1().neg() * denoised[0]
        x = x + alpha_t * self._corrections(denoised, h, earlier, big)
        if eta:
            x = x + sigma_t * (-2 * eta * h).expm1().neg().sqrt() * noise
        out: torch.Tensor = x
        return out

    def _corrections(
        self, d: list[torch.Tensor], h: torch.Tensor, earlier: list[torch.Tensor], big: Any
    ) -> Any:
        """The D1 and D2 terms of the step's order (0 for the first order)."""
        if len(d) == 1:
            return 0.0
        phi_2 = (-big).expm1() / big + 1
        d1_0 = (d[0] - d[1]) / (earlier[0] / h)
        if len(d) == 2:
            if self.config["solver_type"] == "heun":
                return phi_2 * d1_0
            return 0.5 * (-big).expm1().neg() * d1_0
        r0, r1 = earlier[0] / h, earlier[1] / h
        d1_1 = (d[1] - d[2]) / r1
        d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        return phi_2 * d1 - (phi_2 / big - 0.5) * d2


def apply(scheduler: Any, eta: float | None) -> None:
    """Give one run's scheduler the eta it runs with (None: it takes none, or its default)."""
    if eta is not None and hasattr(scheduler, "eta"):
        scheduler.eta = eta


CLASSES: dict[str, type[Any]] = {
    cls.__name__: cls for cls in (EulerAncestralScheduler, SDEScheduler, SDEMultistepScheduler)
}
