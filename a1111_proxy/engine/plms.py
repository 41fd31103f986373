"""A1111's PLMS (sd_samplers_timesteps_impl.plms) as a diffusers scheduler (torch, diffusers).

It walks DDIM's timesteps (engine/ddim.py), txt2img and img2img alike, each step DDIM's with
eta 0 but for the noise it steps with: the first step is a pseudo improved Euler, which asks the
model a second time, at the timestep below, about the DDIM step's result and steps with the mean
of the two answers; the later ones combine the model's answer with those of the steps before it
(Adams-Bashforth of order 2, 3, then 4). diffusers' pipelines call `step` once per model
evaluation, so `timesteps` holds the first step's two evaluations one after the other.
"""

from __future__ import annotations

from typing import Any

import torch

from a1111_proxy.engine.ddim import TimestepsScheduler


class A1111PLMSScheduler(TimestepsScheduler):
    """PLMS on A1111's timesteps."""

    def set_timesteps(self, num_inference_steps: int, device: Any = None) -> None:
        super().set_timesteps(num_inference_steps, device)
        self._old_eps: list[torch.Tensor] = []
        self._start: tuple[torch.Tensor, torch.Tensor] | None = None  # the first step's x, e_t

    def _layout(self) -> list[int]:
        """Each step's evaluation, the first step's twice: at its timestep, then the next
        (A1111's t_next, the walk's timestep below it)."""
        first = self._indices[0]
        return [self._walk[first], self._walk[max(first - 1, 0)]] + [
            self._walk[i] for i in self._indices[1:]
        ]

    @property
    def state_in_first_order(self) -> bool:
        """Not between the first step's two evaluations (what step hooks must not disturb)."""
        return self._start is None

    def step(  # type: ignore[override]  # no eta: A1111's plms takes none
        self,
        model_output: torch.Tensor,
        timestep: Any,
        sample: torch.Tensor,
        return_dict: bool = True,
    ) -> Any:
        j = self._done
        self._done += 1
        if not self._indices:  # img2img with t_enc <= 1: A1111 evaluates nothing
            return self._out(sample, sample, return_dict)
        eps = self._noise(model_output, sample, int(self.timesteps[j]))
        if j == 0:  # the pseudo improved Euler's first evaluation: DDIM's step, asked again
            self._start = (sample, eps)
            prev, x0 = self._move(sample, eps, self._indices[0])
            return self._out(prev, x0, return_dict)
        if j == 1:
            assert self._start is not None
            sample, first = self._start
            self._start = None
            prev, x0 = self._move(sample, (first + eps) / 2, self._indices[0])
            self._old_eps.append(first)
            return self._out(prev, x0, return_dict)
        prev, x0 = self._move(sample, self._multistep(eps), self._indices[j - 1])
        self._old_eps = [*self._old_eps, eps][-3:]
        return self._out(prev, x0, return_dict)

    def _multistep(self, eps: torch.Tensor) -> torch.Tensor:
        """A1111's Adams-Bashforth combination with the earlier steps' noise."""
        old = self._old_eps
        if len(old) == 1:
            return (3 * eps - old[-1]) / 2
        if len(old) == 2:
            return (23 * eps - 16 * old[-1] + 5 * old[-2]) / 12
        return (55 * eps - 59 * old[-1] + 37 * old[-2] - 9 * old[-3]) / 24


CLASSES: dict[str, type[TimestepsScheduler]] = {"A1111PLMSScheduler": A1111PLMSScheduler}
