"""A1111's DPM fast and DPM adaptive: k-diffusion's DPMSolver (DPM-Solver, Lu et al. 2022) as
sampling loops (torch; driven by engine/sampling_loop.py).

Both walk t = -log(sigma) from sigma_max to sigma_min, which A1111 takes from the model in
txt2img (its smallest and largest trained sigma, whatever the schedule; the schedule only scales
the initial noise, by its first sigma) and from img2img's sigma_sched (its first and its
next-to-last). `sample_dpm_fast` makes exactly n model evaluations: floor(n / 3) + 1 equal steps in
t, third order but for the last one or two (orders [3, ..., 2, 1] when n divides by 3, else
[3, ..., n % 3]). `sample_dpm_adaptive` takes steps of a second and a third order solution
(DPM-Solver-23) from one set of three evaluations, and a PID controller on their difference
sizes the next step (rejected steps are taken again from the same x), so the number of
evaluations follows the model, not the steps asked. With eta (A1111's default 1) each step goes
to the ancestral step's sigma_down and adds noise from the image's generator; the noise is drawn
after every step (accepted step), as k-diffusion draws it, even when it adds none.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator

import torch

from a1111_proxy.engine.sampling_loop import Answer, Ask, Loop, LoopScheduler, Noise, evaluate

Solving = Generator[Ask, Answer, torch.Tensor]


def _sigma(t: torch.Tensor) -> torch.Tensor:
    return t.neg().exp()


def _t(sigma: torch.Tensor) -> torch.Tensor:
    return -sigma.log()


def ancestral_step(
    sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float
) -> tuple[torch.Tensor, torch.Tensor | float]:
    """k-diffusion's get_ancestral_step: (sigma_down, sigma_up)."""
    if not eta:
        return sigma_to, 0.0
    up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - up**2) ** 0.5, up


def _eps(
    x: torch.Tensor | None, t: torch.Tensor, state: bool = True
) -> Generator[Ask, Answer, tuple[torch.Tensor, torch.Tensor]]:
    """DPMSolver.eps: the model at sigma(t), as noise: (x - denoised) / sigma(t)."""
    answer = yield from evaluate(x, _sigma(t), state)
    return answer.x, (answer.x - answer.denoised) / _sigma(t)


def _first_order(
    x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, eps: torch.Tensor
) -> torch.Tensor:
    h = t_next - t
    return x - _sigma(t_next) * h.expm1() * eps


def _second_order(
    x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, eps: torch.Tensor, r1: float = 1 / 2
) -> Generator[Ask, Answer, tuple[torch.Tensor, torch.Tensor]]:
    """dpm_solver_2_step: (x at t_next, the noise at t + r1 h for a third-order step)."""
    h = t_next - t
    s1 = t + r1 * h
    u1 = x - _sigma(s1) * (r1 * h).expm1() * eps
    _, eps_r1 = yield from _eps(u1, s1, state=False)
    x_2 = (
        x
        - _sigma(t_next) * h.expm1() * eps
        - _sigma(t_next) / (2 * r1) * h.expm1() * (eps_r1 - eps)
    )
    return x_2, eps_r1


def _third_order(
    x: torch.Tensor,
    t: torch.Tensor,
    t_next: torch.Tensor,
    eps: torch.Tensor,
    eps_r1: torch.Tensor | None = None,
) -> Solving:
    """dpm_solver_3_step (r1 = 1/3, r2 = 2/3); eps_r1 when already evaluated (the adaptive
    solver's second-order step made it)."""
    r1, r2 = 1 / 3, 2 / 3
    h = t_next - t
    s1, s2 = t + r1 * h, t + r2 * h
    if eps_r1 is None:
        u1 = x - _sigma(s1) * (r1 * h).expm1() * eps
        _, eps_r1 = yield from _eps(u1, s1, state=False)
    u2 = (
        x
        - _sigma(s2) * (r2 * h).expm1() * eps
        - _sigma(s2) * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1) * (eps_r1 - eps)
    )
    _, eps_r2 = yield from _eps(u2, s2, state=False)
    return (
        x
        - _sigma(t_next) * h.expm1() * eps
        - _sigma(t_next) / r2 * (h.expm1() / h - 1) * (eps_r2 - eps)
    )


def _towards(
    s: torch.Tensor, t: torch.Tensor, t_end: torch.Tensor, eta: float
) -> tuple[torch.Tensor, torch.Tensor | float]:
    """Where a step from s to t lands with eta (t_ no later than t_end) and the noise it adds."""
    if not eta:
        return t, 0.0
    down, _ = ancestral_step(_sigma(s), _sigma(t), eta)
    t_ = torch.minimum(t_end, _t(down))
    return t_, (_sigma(t) ** 2 - _sigma(t_) ** 2) ** 0.5


def dpm_fast(
    t_start: torch.Tensor, t_end: torch.Tensor, nfe: int, eta: float, noise: Noise
) -> Loop:
    """DPMSolver.dpm_solver_fast: nfe evaluations from t_start to t_end."""
    m = math.floor(nfe / 3) + 1
    ts = torch.linspace(t_start, t_end, m + 1)
    orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
    x: torch.Tensor | None = None
    for i, order in enumerate(orders):
        t, t_next = ts[i], ts[i + 1]
        t_next_, su = _towards(t, t_next, t_end, eta)
        x, eps = yield from _eps(x, t)
        if order == 1:
            x = _first_order(x, t, t_next_, eps)
        elif order == 2:
            x, _ = yield from _second_order(x, t, t_next_, eps)
        else:
            x = yield from _third_order(x, t, t_next_, eps)
        x = x + su * noise()
    assert x is not None
    return x


class StepSize:
    """k-diffusion's PIDStepSizeController (A1111's defaults: integral only)."""

    def __init__(
        self, h: float, pcoeff: float, icoeff: float, dcoeff: float, order: float, safety: float
    ) -> None:
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.safety = safety
        self.errs: list[float] = []

    def propose(self, error: torch.Tensor) -> bool:
        """Scale h by the error; whether the step that made it is accepted."""
        inv_error = 1 / (float(error) + 1e-8)
        if not self.errs:
            self.errs = [inv_error, inv_error, inv_error]
        self.errs[0] = inv_error
        factor = self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3
        factor = 1 + math.atan(factor - 1)
        accept = factor >= self.safety
        if accept:
            self.errs[2] = self.errs[1]
            self.errs[1] = self.errs[0]
        self.h *= factor
        return accept


def dpm_adaptive(
    t_start: torch.Tensor,
    t_end: torch.Tensor,
    eta: float,
    noise: Noise,
    progress: Callable[[float], None] = lambda share: None,
) -> Loop:
    """DPMSolver.dpm_solver_adaptive with sample_dpm_adaptive's defaults (order 3, rtol 0.05,
    atol 0.0078, h_init 0.05, pcoeff 0, icoeff 1, dcoeff 0, accept_safety 0.81); `progress`
    hears the share of the way from t_start to t_end after each accepted step."""
    atol, rtol = torch.tensor(0.0078), torch.tensor(0.05)
    s = t_start
    x: torch.Tensor | None = None
    x_prev: torch.Tensor | None = None
    pid = StepSize(0.05, 0.0, 1.0, 0.0, 1.5 if eta else 3, 0.81)
    while s < t_end - 1e-5:
        t = torch.minimum(t_end, s + pid.h)
        t_, su = _towards(s, t, t_end, eta)
        x, eps = yield from _eps(x, s)
        x_prev = x if x_prev is None else x_prev
        x_low, eps_r1 = yield from _second_order(x, s, t_, eps, r1=1 / 3)
        x_high = yield from _third_order(x, s, t_, eps, eps_r1)
        delta = torch.maximum(atol, rtol * torch.maximum(x_low.abs(), x_prev.abs()))
        error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5
        if pid.propose(error):
            x_prev = x_low
            x = x_high + su * noise()
            s = t
            progress(float((s - t_start) / (t_end - t_start)))
    assert x is not None
    return x


class DPMFastScheduler(LoopScheduler):
    """A1111's DPM fast: `steps` evaluations (img2img: those of its sigma_sched)."""

    def loop(self, sigma_sched: torch.Tensor, noise: Noise) -> Loop:
        low, high = self.sigma_range(sigma_sched)
        return dpm_fast(_t(high), _t(low), self.evaluations(sigma_sched), self.eta, noise)

    def evaluations(self, sigma_sched: torch.Tensor) -> int:
        return len(sigma_sched) - 1

    def sigma_range(self, sigma_sched: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A1111's sigma_min and sigma_max: the model's in txt2img, sigma_sched's in img2img."""
        if self.img2img:
            return sigma_sched[-2], sigma_sched[0]
        return self._trained[0], self._trained[-1]


class DPMAdaptiveScheduler(DPMFastScheduler):
    """A1111's DPM adaptive; `share_done`: how far it is (its evaluations are not the steps)."""

    share_done: float | None = 0.0

    def loop(self, sigma_sched: torch.Tensor, noise: Noise) -> Loop:
        low, high = self.sigma_range(sigma_sched)
        self.share_done = 0.0
        return dpm_adaptive(_t(high), _t(low), self.eta, noise, self._heard)

    def _heard(self, share: float) -> None:
        self.share_done = share


CLASSES: dict[str, type[LoopScheduler]] = {
    cls.__name__: cls for cls in (DPMFastScheduler, DPMAdaptiveScheduler)
}
