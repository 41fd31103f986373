"""A1111's DDIM (sd_samplers_timesteps.py, sd_samplers_timesteps_impl.ddim) as a diffusers
scheduler (torch, diffusers).

A1111 walks the timesteps t = clip(range(0, 1000, 1000 // steps) + 1, 0, 999), which diffusers'
"leading" spacing matches only in part: A1111 evaluates the model at every one of them but the
first, from the top down, each step going to the alpha of the timestep below it, and the last to
alphas_cumprod[1] (t[0]), not alphas_cumprod[0]. So 20 steps run 19 evaluations (51 ... 951),
30 steps run 30 (1000 // 30 = 33 leaves 31 timesteps), and where 1000 // steps divides 999 the
top one is clipped to 999, a gap one shorter than the others.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.schedulers.scheduling_ddim import DDIMScheduler, DDIMSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor


def timesteps(steps: int, train_steps: int = 1000) -> list[int]:
    """A1111's CompVisSampler.get_timesteps, ascending."""
    return [min(t + 1, train_steps - 1) for t in range(0, train_steps, train_steps // steps)]


class A1111DDIMScheduler(DDIMScheduler):
    """DDIM on A1111's timesteps: `timesteps` holds the evaluated ones, descending; each steps
    to the alpha of the one below it in A1111's list."""

    def set_timesteps(self, num_inference_steps: int, device: Any = None) -> None:
        walk = timesteps(num_inference_steps, self.config["num_train_timesteps"])
        self.num_inference_steps = num_inference_steps  # type: ignore[assignment]  # None in diffusers
        self._below = dict(zip(walk[1:], walk[:-1], strict=True))
        self.timesteps = torch.tensor(walk[1:][::-1], dtype=torch.int64, device=device)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Any,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: Any = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> Any:
        """sd_samplers_timesteps_impl.ddim's step, in the sample's dtype as A1111 computes it;
        the model's output read by its prediction type (A1111 turns a v prediction into the
        noise the same way)."""
        t = int(timestep)
        below = self._below[t]
        alphas = self.alphas_cumprod
        a_t, a_prev = float(alphas[t]), float(alphas[below])
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5

        def scalar(value: float) -> torch.Tensor:
            return torch.tensor(value, dtype=sample.dtype, device=sample.device)

        eps = self._noise(model_output, sample, t)
        x0 = (sample - scalar(float((1 - alphas[t]).sqrt())) * eps) / scalar(a_t).sqrt()
        to_t = (1.0 - scalar(a_prev) - scalar(sigma) ** 2).sqrt() * eps
        prev = scalar(a_prev).sqrt() * x0 + to_t
        if eta > 0:
            if variance_noise is None:
                variance_noise = randn_tensor(
                    model_output.shape,
                    generator=generator,
                    device=model_output.device,
                    dtype=model_output.dtype,
                )
            prev = prev + scalar(sigma) * variance_noise
        if not return_dict:
            return (prev, x0)
        return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    def _noise(self, output: torch.Tensor, sample: torch.Tensor, t: int) -> torch.Tensor:
        """The predicted noise; sqrt(a_t) and sqrt(1 - a_t) in the alphas' float32, as A1111's
        predict_eps_from_z_and_v takes them."""
        alpha = self.alphas_cumprod[t]
        root, rest = float(alpha.sqrt()), float((1 - alpha).sqrt())
        kind = self.config["prediction_type"]
        if kind == "v_prediction":
            return root * output + rest * sample
        if kind == "sample":
            return (sample - root * output) / rest
        return output


CLASSES: dict[str, type[A1111DDIMScheduler]] = {"A1111DDIMScheduler": A1111DDIMScheduler}
