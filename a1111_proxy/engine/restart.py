"""A1111's Restart sampler (modules/sd_samplers_extra.py's restart_sampler; Restart Sampling for
Improving Generative Processes, Xu et al. 2023) as a sampling loop (torch; driven by
engine/sampling_loop.py).

Heun steps (Euler for the last, to sigma 0) through the schedule, A1111's Karras by default. From
20 steps on, the schedule is made again as Karras over fewer steps between the schedule's first and
next-to-last sigma, and the steps saved are spent on restarts: where that schedule comes nearest
sigma 0.1, the sampler jumps back up to its sigma nearest 2 by adding fresh noise (from the
image's generator, one draw per image as A1111's ImageRNG makes it) and walks down again over
restart_steps Karras sigmas: 9 steps once below 36 steps, steps // 4 twice from 36.
"""

from __future__ import annotations

import itertools
from collections.abc import Generator

import torch

from a1111_proxy.engine import sigmas as schedules
from a1111_proxy.engine.sampling_loop import Answer, Ask, Loop, LoopScheduler, Noise, evaluate

Pair = tuple[torch.Tensor, torch.Tensor]


def plan(sigmas: torch.Tensor) -> list[Pair]:
    """restart_sampler's step_list: the (sigma, next sigma) of every Heun step, restarts
    included (a step up is where noise is added)."""
    steps = sigmas.shape[0] - 1
    restart_list: dict[float, tuple[int, int, float]] = {}
    if steps >= 20:
        restart_steps, restart_times = (steps // 4, 2) if steps >= 36 else (9, 1)
        first, low = sigmas[0].item(), sigmas[-2].item()
        sigmas = schedules.karras(steps - restart_steps * restart_times, low, first)
        restart_list = {0.1: (restart_steps + 1, restart_times, 2.0)}
    at = {int(torch.argmin(abs(sigmas - key), dim=0)): value for key, value in restart_list.items()}
    pairs: list[Pair] = []
    for i in range(len(sigmas) - 1):
        pairs.append((sigmas[i], sigmas[i + 1]))
        if i + 1 in at:
            pairs += _restarts(sigmas, i + 1, *at[i + 1])
    return pairs


def _restarts(
    sigmas: torch.Tensor, min_idx: int, restart_steps: int, times: int, restart_max: float
) -> list[Pair]:
    max_idx = int(torch.argmin(abs(sigmas - restart_max), dim=0))
    if max_idx >= min_idx:
        return []
    high, low = sigmas[max_idx].item(), sigmas[min_idx].item()
    walk = schedules.karras(restart_steps, low, high)[:-1]
    return list(itertools.pairwise(walk)) * times


def _heun(
    x: torch.Tensor | None, sigma: torch.Tensor, sigma_next: torch.Tensor
) -> Generator[Ask, Answer, torch.Tensor]:
    """restart_sampler's heun_step: Euler where sigma_next is 0."""
    answer = yield from evaluate(x, sigma)
    x = answer.x
    d = (x - answer.denoised) / sigma
    dt = sigma_next - sigma
    if sigma_next == 0:
        return x + d * dt
    x_2 = x + d * dt
    second = yield from evaluate(x_2, sigma_next, state=False)
    d_2 = (second.x - second.denoised) / sigma_next
    return x + (d + d_2) / 2 * dt


def restart(sigmas: torch.Tensor, noise: Noise) -> Loop:
    x: torch.Tensor | None = None
    last: torch.Tensor | None = None
    for sigma, sigma_next in plan(sigmas):
        if last is not None and last < sigma:
            assert x is not None
            x = x + noise() * (sigma**2 - last**2) ** 0.5
        x = yield from _heun(x, sigma, sigma_next)
        last = sigma_next
    assert x is not None
    return x


class RestartScheduler(LoopScheduler):
    """A1111's Restart."""

    second_order = True  # A1111 schedules prompt editing over twice the steps

    def loop(self, sigma_sched: torch.Tensor, noise: Noise) -> Loop:
        return restart(sigma_sched, noise)

    def evaluations(self, sigma_sched: torch.Tensor) -> int:
        return sum(1 if sigma_next == 0 else 2 for _, sigma_next in plan(sigma_sched))


CLASSES: dict[str, type[LoopScheduler]] = {"RestartScheduler": RestartScheduler}
