"""k-diffusion's samplers that call the model twice a step, as diffusers schedulers (torch).

A1111's DPM++ 2S a (`sample_dpmpp_2s_ancestral`), DPM2 a (`sample_dpm_2_ancestral`) and DPM2
(`sample_dpm_2`): each step from sigma to the next first takes the ancestral step's sigma_down
and sigma_up (eta 1 for the ancestral ones, A1111's default; 0 for DPM2), evaluates the model at
sigma, moves by Euler to the midpoint sigma_mid = sqrt(sigma * sigma_down), evaluates again
there, and steps to sigma_down; the ancestral ones then add noise * sigma_up (drawn from the
image's generator, as A1111 draws it). Where sigma_down is 0 (the last step to sigma 0) the
step is one Euler evaluation. DPM++ 2S a and DPM2 differ only in that second move: DPM++ 2S
takes x + (x - denoised_2) / sigma * (sigma_down - sigma), DPM2 x + (x_2 - denoised_2) /
sigma_mid * (sigma_down - sigma).

diffusers' pipelines call `step` once per model evaluation, so the timesteps interleave the two
evaluations of each step, as diffusers' KDPM2 schedulers lay them out (`order` 2, `sigmas[2k]`
the sigma of step k for img2img's add_noise); the model's timesteps are k-diffusion's
fractional sigma_to_t. `use_sigmas` steps through any descending schedule (engine/sigmas.py).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.schedulers.scheduling_k_dpm_2_ancestral_discrete import (
    KDPM2AncestralDiscreteScheduler,
    KDPM2AncestralDiscreteSchedulerOutput,
)
from diffusers.utils.torch_utils import randn_tensor

from a1111_proxy.engine import sigmas as schedules


class TwoStageScheduler(KDPM2AncestralDiscreteScheduler):
    """Base: the interleaved two-evaluation step; subclasses set `eta` and the second move."""

    eta = 1.0
    second_from_start = True  # DPM++ 2S's second move; DPM2's goes from the midpoint

    def set_timesteps(
        self,
        num_inference_steps: int,
        device: str | torch.device | None = None,
        num_train_timesteps: int | None = None,
    ) -> None:
        """diffusers' sigmas for the config's schedule flags, stepped through as k-diffusion."""
        super().set_timesteps(num_inference_steps, device, num_train_timesteps)
        if num_train_timesteps is not None:  # __init__'s call: no schedule to step through
            return
        # KDPM2's layout is [s0, s1, s1, s2, s2, ..., 0, 0, 0]: one of each pair, then the 0.
        self.use_sigmas(torch.cat([self.sigmas[:1], self.sigmas[1:-1:2]]), device)

    def use_sigmas(self, sigmas: torch.Tensor, device: Any = None) -> None:
        """Step through `sigmas` (descending, the last the one sampling ends at)."""
        flat = sigmas.detach().to("cpu", torch.float32)
        now, nxt = flat[:-1], flat[1:]
        up = torch.minimum(
            nxt, self.eta * (nxt**2 * (now**2 - nxt**2) / now**2).clamp(min=0).sqrt()
        )
        down = (nxt**2 - up**2).clamp(min=0).sqrt()
        mid = (now * down).sqrt()
        plan: list[tuple[int, int]] = []  # (step, stage) of each model evaluation
        evaluated: list[torch.Tensor] = []
        noising: list[torch.Tensor] = []  # the sigma add_noise takes at each evaluation
        for i in range(len(now)):
            plan.append((i, 0))
            evaluated.append(now[i])
            noising.append(now[i])
            if down[i] > 0:
                plan.append((i, 1))
                evaluated.append(mid[i])
                noising.append(nxt[i])
        self.flat_sigmas = flat.to(device) if device is not None else flat
        self.num_inference_steps = len(now)
        self._plan = plan
        self._now, self._next, self._up, self._down, self._mid = now, nxt, up, down, mid
        self._evaluated = torch.stack(evaluated)
        self.sigmas = torch.cat([torch.stack(noising), flat.new_zeros(1)])
        trained = schedules.trained_sigmas(self.config)
        timesteps = schedules.sigma_to_t(self._evaluated, trained)
        self.timesteps = timesteps.to(device) if device is not None else timesteps
        self._start: torch.Tensor | None = None  # the step's x while the midpoint is asked
        self._step_index = None
        self._begin_index = None

    @property
    def state_in_first_order(self) -> bool:
        """Not between a step's two evaluations (what step hooks must not disturb)."""
        return self._start is None

    @property
    def init_noise_sigma(self) -> torch.Tensor:
        return self.flat_sigmas[0].cpu()  # k-diffusion: x = noise * sigmas[0]

    def scale_model_input(self, sample: torch.Tensor, timestep: Any) -> torch.Tensor:
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma = self._evaluated[self.step_index]
        return sample / ((sigma**2 + 1) ** 0.5)

    def step(
        self,
        model_output: Any,
        timestep: Any,
        sample: Any,
        generator: Any = None,
        return_dict: bool = True,
    ) -> Any:
        if self.step_index is None:
            self._init_step_index(timestep)
        j: int = self._step_index  # type: ignore[assignment]
        i, stage = self._plan[j]
        sigma = self._evaluated[j].to(sample.device)
        denoised = schedules.denoised(self.config, model_output, sample, sigma)
        now, down, up = (t[i].to(sample.device) for t in (self._now, self._down, self._up))
        if stage == 0 and down == 0:  # Euler to sigma_down (0)
            x = sample + (sample - denoised) / now * (down - now)
        elif stage == 0:  # Euler to the midpoint, where the model is asked again
            self._start = sample
            x = sample + (sample - denoised) / now * (self._mid[i].to(sample.device) - now)
        else:
            start, self._start = self._start, None
            assert start is not None
            slope = (
                (start - denoised) / now if self.second_from_start else (sample - denoised) / sigma
            )
            x = start + slope * (down - now)
        if (stage == 1 or down == 0) and self._next[i] > 0 and up > 0:
            drawn = randn_tensor(
                model_output.shape, dtype=x.dtype, device=model_output.device, generator=generator
            )
            x = x + drawn * up
        self._step_index = j + 1  # type: ignore[assignment]
        if not return_dict:
            return (x, denoised)
        return KDPM2AncestralDiscreteSchedulerOutput(prev_sample=x, pred_original_sample=denoised)


class DPMPP2SAncestralScheduler(TwoStageScheduler):
    """A1111's DPM++ 2S a."""


class DPM2AncestralScheduler(TwoStageScheduler):
    """A1111's DPM2 a."""

    second_from_start = False


class DPM2Scheduler(TwoStageScheduler):
    """A1111's DPM2."""

    eta = 0.0
    second_from_start = False


CLASSES: dict[str, type[TwoStageScheduler]] = {
    cls.__name__: cls for cls in (DPMPP2SAncestralScheduler, DPM2AncestralScheduler, DPM2Scheduler)
}
