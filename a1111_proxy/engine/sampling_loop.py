"""A k-diffusion sampling loop as a diffusers scheduler (torch, diffusers).

A1111's DPM fast, DPM adaptive and Restart are loops that call the model wherever their solver
needs it (DPM adaptive even decides as it goes how often). Here each is written as a Python
generator (engine/dpm_solver.py, engine/restart.py) that yields an `Ask` (evaluate the model at
this x and sigma) and is sent back an `Answer` (the x the model saw and its denoised estimate),
then returns the final x. `LoopScheduler` drives one through a diffusers pipeline: the pipeline's
latents are always the next x to evaluate, its timesteps are handed out one at a time as the loop
asks (`LoopTimesteps`), and `step` sends the model's answer into the loop.

The loop starts at the first evaluation with the schedule from the begin index that img2img
sets (A1111's sigma_sched); txt2img starts at index 0.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.schedulers.scheduling_euler_discrete import (
    EulerDiscreteScheduler,
    EulerDiscreteSchedulerOutput,
)
from diffusers.utils.torch_utils import randn_tensor

from a1111_proxy.engine import sigmas as schedules


@dataclass(frozen=True)
class Ask:
    """Evaluate the model at `x` (None: the loop's starting x, the pipeline's latents) and
    `sigma`; `state`: x is the sampler's state between steps, not a point inside a step (step
    hooks such as the noise mask may change it)."""

    x: torch.Tensor | None
    sigma: torch.Tensor
    state: bool = True


@dataclass(frozen=True)
class Answer:
    x: torch.Tensor  # what the model saw (a state point may have been changed by a hook)
    denoised: torch.Tensor


Loop = Generator[Ask, Answer, torch.Tensor]
Noise = Callable[[], torch.Tensor]  # unit noise of x's shape, one draw per image


def evaluate(
    x: torch.Tensor | None, sigma: torch.Tensor, state: bool = True
) -> Generator[Ask, Answer, Answer]:
    """`answer = yield from evaluate(x, sigma)`: one model evaluation inside a loop."""
    answer = yield Ask(x, sigma, state)
    return answer


class LoopScheduler(EulerDiscreteScheduler):
    """Base: runs `loop` (subclasses) over the schedule the diffusers flags or engine/sigmas.py
    make, as EulerDiscreteScheduler makes it for Euler."""

    eta = 1.0  # A1111's eta for the ancestral loops (schedulers.make sets the request's)
    img2img = False  # A1111 passes txt2img and img2img different sigma_min / sigma_max

    def set_timesteps(  # type: ignore[override]  # the pipelines pass steps and device only
        self, num_inference_steps: int, device: Any = None, **kwargs: Any
    ) -> None:
        super().set_timesteps(num_inference_steps, device=device, **kwargs)
        self.use_sigmas(self.sigmas, device)

    def use_sigmas(self, sigmas: torch.Tensor, device: Any = None) -> None:
        """Run over `sigmas` (descending; A1111's get_sigmas for the steps)."""
        self.schedule = sigmas.detach().to("cpu", torch.float32)
        self.sigmas = self.schedule
        self.num_inference_steps = len(self.schedule) - 1  # type: ignore[assignment]
        self.timesteps = LoopTimesteps(self)  # type: ignore[assignment]
        self._trained = schedules.trained_sigmas(self.config)
        self._begin_index = None
        self._reset()

    def _reset(self) -> None:
        self._loop: Loop | None = None
        self._asked: Ask | None = None
        self._finished = False
        self._stepped = False
        self._evaluated: list[torch.Tensor] = []  # the timesteps the model was asked at
        self._generator: Any = None
        self._shape: tuple[int, ...] = ()
        self._device = torch.device("cpu")
        self._step_index = None

    def loop(self, sigma_sched: torch.Tensor, noise: Noise) -> Loop:
        raise NotImplementedError

    def evaluations(self, sigma_sched: torch.Tensor) -> int:
        """How many model evaluations the loop makes (for DPM adaptive, the steps asked)."""
        raise NotImplementedError

    @property
    def sigma_sched(self) -> torch.Tensor:
        return self.schedule[self._begin_index or 0 :]

    @property
    def init_noise_sigma(self) -> torch.Tensor:
        return self.schedule[0]  # A1111: x = noise * sigmas[0]

    @property
    def state_in_first_order(self) -> bool:
        """The latents are the sampler's state (not a point inside a step), or nothing runs."""
        asked = self.pending()
        return asked is None or asked.state

    def set_begin_index(self, begin_index: int = 0) -> None:
        if begin_index != self._begin_index:
            self._begin_index = begin_index  # type: ignore[assignment]
            self._reset()

    def pending(self) -> Ask | None:
        """What the loop asks next; None once it has returned."""
        if self._loop is None and not self._finished:
            self._loop = self.loop(self.sigma_sched, self._noise)
            self._asked = next(self._loop)
            self._step_index = 0  # type: ignore[assignment]
        return self._asked

    def timestep_of(self, sigma: torch.Tensor) -> torch.Tensor:
        """The UNet's (fractional) timestep for sigma: k-diffusion's sigma_to_t."""
        return schedules.sigma_to_t(sigma.reshape(1).float().cpu(), self._trained)[0]

    def scale_model_input(self, sample: torch.Tensor, timestep: Any) -> torch.Tensor:
        asked = self.pending()
        assert asked is not None, "the sampling loop has ended"
        sigma = asked.sigma.to(sample.device)
        return sample / ((sigma**2 + 1) ** 0.5)

    def step(  # type: ignore[override]  # no s_churn: the loops have their own noise
        self,
        model_output: Any,
        timestep: Any,
        sample: Any,
        generator: Any = None,
        return_dict: bool = True,
    ) -> Any:
        asked = self.pending()
        assert asked is not None and self._loop is not None, "the sampling loop has ended"
        denoised = schedules.denoised(
            self.config, model_output, sample, asked.sigma.to(sample.device)
        )
        self._generator, self._shape = generator, tuple(model_output.shape)
        self._device = sample.device
        self._evaluated.append(self.timestep_of(asked.sigma))
        try:
            self._asked = self._loop.send(Answer(sample, denoised))
            x = self._asked.x
        except StopIteration as end:
            self._asked, self._finished, x = None, True, end.value
        self._stepped = True
        self._step_index = len(self._evaluated)  # type: ignore[assignment]
        assert x is not None
        if not return_dict:
            return (x, denoised)
        return EulerDiscreteSchedulerOutput(prev_sample=x, pred_original_sample=denoised)

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: Any
    ) -> torch.Tensor:
        """original + noise * the sigma of the next evaluation (A1111's xi = x + noise *
        sigma_sched[0] before the first); nothing once the loop has ended."""
        asked = self.pending()
        if asked is None:
            return original_samples
        sigma = asked.sigma if self._evaluated else self.sigma_sched[0]
        return original_samples + noise * sigma.to(original_samples.device)

    def _noise(self) -> torch.Tensor:
        """One draw per image from the step's generators (A1111's ImageRNG.next())."""
        drawn: torch.Tensor = randn_tensor(
            self._shape, generator=self._generator, device=self._device, dtype=torch.float32
        )
        return drawn


class LoopTimesteps:
    """A LoopScheduler's `timesteps`: what the pipeline iterates, indexes and slices, handed out
    one evaluation at a time; iteration ends when the loop returns or the pipeline stops
    stepping (an interrupt)."""

    def __init__(self, scheduler: LoopScheduler) -> None:
        self.scheduler = scheduler

    def __len__(self) -> int:
        scheduler = self.scheduler
        done = len(scheduler._evaluated)
        return max(scheduler.evaluations(scheduler.sigma_sched), done + (not scheduler._finished))

    def __iter__(self) -> Iterator[torch.Tensor]:
        scheduler = self.scheduler
        asked = scheduler.pending()
        while asked is not None:
            scheduler._stepped = False
            yield scheduler.timestep_of(asked.sigma)
            if not scheduler._stepped:
                return
            asked = scheduler.pending()

    def __getitem__(self, key: int | slice) -> Any:
        if isinstance(key, int):
            return self._at(key)
        if key.stop is None:  # img2img's timesteps[t_start:]: the schedule from t_start
            self.scheduler.set_begin_index(key.start or 0)
            return self
        start = key.start or 0
        return torch.stack([self._at(i) for i in range(start, key.stop)])

    def _at(self, index: int) -> torch.Tensor:
        """The index-th evaluation's timestep (the next one when it is the count so far)."""
        scheduler = self.scheduler
        asked = scheduler.pending()
        done = scheduler._evaluated
        if index < len(done):
            return done[index]
        if index == len(done) and asked is not None:
            return scheduler.timestep_of(asked.sigma)
        return torch.tensor(0.0)  # past the end: add_noise adds nothing there
