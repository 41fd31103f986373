"""A1111's timesteps samplers (sd_samplers_timesteps.py): DDIM here, PLMS in engine/plms.py, as
diffusers schedulers (torch, diffusers).

A1111 walks the timesteps t = clip(range(0, 1000, 1000 // steps) + 1, 0, 999), which diffusers'
"leading" spacing matches only in part: A1111 evaluates the model at every one of them but the
first, from the top down, each step going to the alpha of the timestep below it, and the last to
alphas_cumprod[1] (t[0]), not alphas_cumprod[0]. So 20 steps run 19 evaluations (51 ... 951),
30 steps run 30 (1000 // 30 = 33 leaves 31 timesteps), and where 1000 // steps divides 999 the
top one is clipped to 999, a gap one shorter than the others.

img2img (and hires fix's second pass) is A1111's sample_img2img: with t_enc =
int(min(strength, 0.999) * steps), the walk is cut to t[:t_enc], the image noised at t[t_enc],
and the model evaluated from t[t_enc - 1] down: the first step takes the image one timestep
noisier than the one it is told. With t_enc <= 1 nothing is evaluated and the noised image is
the result. `enter_img2img` sets this up on a run's pipeline.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.schedulers.scheduling_ddim import DDIMScheduler, DDIMSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor


def timesteps(steps: int, train_steps: int = 1000) -> list[int]:
    """A1111's CompVisSampler.get_timesteps, ascending."""
    return [min(t + 1, train_steps - 1) for t in range(0, train_steps, train_steps // steps)]


def t_enc(denoising_strength: float, steps: int) -> int:
    """A1111's setup_img2img_steps: how far into the walk img2img enters."""
    return int(min(denoising_strength, 0.999) * steps)


class TimestepsScheduler(DDIMScheduler):
    """A1111's walk, txt2img or img2img (`t_enc`); subclasses lay out the evaluations and step.

    `timesteps` holds the evaluated ones, descending; `_indices` their places in the walk."""

    t_enc: int | None = None  # img2img: set before the pipeline calls set_timesteps
    _done = 0  # evaluations stepped since set_timesteps
    _noised_at: tuple[int, int] | None = None  # img2img: (first timestep, the one noised at)

    def set_timesteps(self, num_inference_steps: int, device: Any = None) -> None:
        walk = timesteps(num_inference_steps, self.config["num_train_timesteps"])
        self.num_inference_steps = num_inference_steps  # type: ignore[assignment]  # None in diffusers
        self._walk = walk
        # txt2img evaluates from the top; img2img is noised at t[t_enc], evaluated from below it.
        entered = len(walk) - 1 if self.t_enc is None else min(self.t_enc, len(walk) - 1)
        top = entered if self.t_enc is None else entered - 1
        self._indices = list(range(top, 0, -1))
        # Nothing to evaluate (img2img's t_enc <= 1, or 1 step): one step that changes nothing.
        order = self._layout() if self._indices else [walk[entered]]
        self._noised_at = None if self.t_enc is None else (order[0], walk[entered])
        self.timesteps = torch.tensor(order, dtype=torch.int64, device=device)
        self._done = 0

    def _layout(self) -> list[int]:
        """The timestep of each model evaluation (DDIM: one per step)."""
        return [self._walk[i] for i in self._indices]

    @property
    def step_index(self) -> int:
        """How many evaluations were stepped (the next one's place in `timesteps`)."""
        return self._done

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor
    ) -> torch.Tensor:
        """img2img's start: at the timestep above the first evaluated (A1111's t[t_enc])."""
        if self._noised_at is not None:
            first, entered = self._noised_at
            timesteps = torch.where(timesteps == first, entered, timesteps)  # type: ignore[assignment]
        noisy: torch.Tensor = super().add_noise(original_samples, noise, timesteps)
        return noisy

    def _alphas(self, index: int) -> tuple[float, float, float]:
        """a_t, a_prev (the walk's timestep below) and sqrt(1 - a_t), as A1111's loops take them:
        a_t from the float32 alphas, a_prev in float64."""
        alphas = self.alphas_cumprod
        t, below = self._walk[index], self._walk[index - 1]
        return float(alphas[t]), float(alphas[below].double()), float((1 - alphas[t]).sqrt())

    def _move(
        self, sample: torch.Tensor, eps: torch.Tensor, index: int, sigma: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """sd_samplers_timesteps_impl's step to the walk's timestep below `index` (without the
        noise), in the sample's dtype as A1111 computes it: (x_prev, pred_x0)."""
        a_t, a_prev, rest = self._alphas(index)

        def scalar(value: float) -> torch.Tensor:
            return torch.tensor(value, dtype=sample.dtype, device=sample.device)

        x0 = (sample - scalar(rest) * eps) / scalar(a_t).sqrt()
        to_t = (1.0 - scalar(a_prev) - scalar(sigma) ** 2).sqrt() * eps
        return scalar(a_prev).sqrt() * x0 + to_t, x0

    def _out(self, prev: torch.Tensor, x0: torch.Tensor, return_dict: bool) -> Any:
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


class A1111DDIMScheduler(TimestepsScheduler):
    """DDIM on A1111's timesteps: each step to the alpha of the walk's timestep below it."""

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
        """sd_samplers_timesteps_impl.ddim's step; the model's output read by its prediction type
        (A1111 turns a v prediction into the noise the same way)."""
        if not self._indices:  # img2img with t_enc <= 1: A1111 evaluates nothing
            self._done += 1
            return self._out(sample, sample, return_dict)
        index = self._indices[self._done]
        self._done += 1
        a_t, a_prev, _ = self._alphas(index)
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        eps = self._noise(model_output, sample, self._walk[index])
        prev, x0 = self._move(sample, eps, index, sigma)
        if eta > 0:
            if variance_noise is None:
                variance_noise = randn_tensor(
                    model_output.shape,
                    generator=generator,
                    device=model_output.device,
                    dtype=model_output.dtype,
                )
            prev = prev + torch.tensor(sigma, dtype=prev.dtype, device=prev.device) * variance_noise
        return self._out(prev, x0, return_dict)


def enter_img2img(pipe: Any, scheduler: Any, denoising_strength: float, steps: int) -> None:
    """Make `pipe` (one run's img2img or inpaint pipeline) run `scheduler`'s img2img walk as
    A1111 does: the pipeline takes the scheduler's timesteps as they are, where its own
    get_timesteps would cut them by strength."""
    scheduler.t_enc = t_enc(denoising_strength, steps)

    def get_timesteps(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, int]:
        return scheduler.timesteps, len(scheduler.timesteps)

    pipe.get_timesteps = get_timesteps


CLASSES: dict[str, type[TimestepsScheduler]] = {"A1111DDIMScheduler": A1111DDIMScheduler}
