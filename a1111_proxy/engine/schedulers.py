"""A1111 sampler + schedule -> a fresh diffusers scheduler for one run (diffusers).

Schedulers hold state, so every run gets its own, built from the model's scheduler config (its
betas and prediction type) plus the sampler's settings. The run's scheduler also remembers its
last x0 estimate (for previews and A1111-style interrupts), takes A1111's initial noise where an
img2img pipeline would draw its own, and draws step noise from A1111's per-image generators
(the pipeline gets throw-away generators for what it draws itself).
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import sys
from collections.abc import Callable
from typing import Any

import diffusers
import torch

from a1111_proxy.engine import ddim, dpm_solver, eta, plms, restart, sigmas, two_stage
from a1111_proxy.engine.masked_content import LatentFill
from a1111_proxy.engine.noise import BrownianNoise, Generator, Philox, draw
from a1111_proxy.engine.samplers import Resolved
from a1111_proxy.engine.sampling_loop import LoopScheduler

_SPACING = {"sgm_uniform": "trailing", "simple": "trailing", "ddim": "leading"}
_SIGMA_FLAGS = {
    "karras": "use_karras_sigmas",
    "exponential": "use_exponential_sigmas",
    "beta": "use_beta_sigmas",
}


def make(
    base_config: Any,
    resolved: Resolved,
    *,
    sdxl: bool = False,
    eta_value: float | None = None,
    img2img: bool = False,
) -> Any:
    """A fresh scheduler for `resolved`; its sigmas from sigmas.py where the diffusers class
    cannot make the schedule (`sdxl`: which Align Your Steps table); `eta_value`: the eta it
    runs with (Params.eta_for; DDIM takes its eta from the pipeline call instead). The sampling
    loops (engine/sampling_loop.py) also take whether the run is img2img (A1111 gives DPM fast /
    adaptive other bounds there)."""
    sampler = resolved.sampler
    cls = scheduler_class(sampler.scheduler_class)
    wanted: dict[str, Any] = dict(sampler.kwargs)
    wanted["timestep_spacing"] = _SPACING.get(resolved.schedule, "linspace")
    accepted = set(inspect.signature(cls.__init__).parameters)
    config = {k: v for k, v in dict(base_config).items() if k in accepted}
    for flag in _SIGMA_FLAGS.values():
        if flag in accepted:
            config[flag] = False
    sigma_flag = _SIGMA_FLAGS.get(resolved.schedule)
    formula = (
        resolved.schedule in sigmas.OWN
        or (sigma_flag is not None and sigma_flag not in accepted)
        or (
            resolved.schedule in sigmas.UNIFORM and sampler.scheduler_class in sigmas.SHORT_LINSPACE
        )
    )
    if formula and not sampler.stepwise:
        raise ValueError(f"{sampler.name} cannot use the {resolved.schedule} schedule")
    if sigma_flag is not None and not formula:
        wanted[sigma_flag] = True
    config.update({k: v for k, v in wanted.items() if k in accepted})
    scheduler = cls.from_config(config)
    eta.apply(scheduler, eta_value)
    if formula:
        sigmas.install(scheduler, resolved.schedule, sdxl)
    if sampler.discard_next_to_last_sigma:
        sigmas.discard_next_to_last(scheduler)
    if isinstance(scheduler, LoopScheduler):
        scheduler.eta = 1.0 if eta_value is None else eta_value
        scheduler.img2img = img2img
    return scheduler


def scheduler_class(name: str) -> Any:
    """A diffusers scheduler class, or one of the engine's own (two_stage.py, ddim.py, plms.py,
    eta.py, dpm_solver.py, restart.py), by name."""
    for ours in (
        two_stage.CLASSES,
        ddim.CLASSES,
        plms.CLASSES,
        eta.CLASSES,
        dpm_solver.CLASSES,
        restart.CLASSES,
    ):
        if name in ours:
            return ours[name]
    return getattr(diffusers, name)


# Step noise a scheduler's `randn_tensor` gives instead of its own, while set: how the ancestral
# schedulers draw from A1111's "NV" generators, which are not torch generators.
_STEP_NOISE: contextvars.ContextVar[Callable[[tuple[int, ...], torch.device], torch.Tensor]] = (
    contextvars.ContextVar("step_noise")
)


def _takes_step_noise(scheduler: Any) -> None:
    """Route the randn_tensor of `scheduler`'s module through _STEP_NOISE, and of its base
    classes' (the engine's schedulers step with diffusers' code too), once per module; without
    a value set it is diffusers' own."""
    for cls in type(scheduler).__mro__:
        module = sys.modules.get(cls.__module__)
        if module is not None and cls.__module__.startswith(("diffusers.", "a1111_proxy.")):
            _route(module)


def _route(module: Any) -> None:
    own = getattr(module, "randn_tensor", None)
    if module is None or own is None or getattr(own, "_a1111_step_noise", False):
        return

    @functools.wraps(own)
    def randn_tensor(shape: Any, *args: Any, **kwargs: Any) -> Any:
        given = _STEP_NOISE.get(None)
        if given is None:
            return own(shape, *args, **kwargs)
        found = given(tuple(shape), kwargs.get("device") or torch.device("cpu"))
        return found.to(dtype=kwargs.get("dtype") or found.dtype)

    randn_tensor._a1111_step_noise = True  # type: ignore[attr-defined]
    vars(module)["randn_tensor"] = randn_tensor


class Tracking:
    """Hooks on one run's scheduler: its last x0 estimate, and A1111's noise for add_noise."""

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self.last_x0: torch.Tensor | None = None
        self.noise: torch.Tensor | None = None  # A1111's initial noise, for add_noise
        self.generators: list[Generator] | None = None  # A1111's, for the step noise
        self.brownian_seeds: list[int] | None = None  # SDE samplers: A1111's seeded trees
        self.fill: LatentFill | None = None  # inpainting's latent noise / latent nothing
        self._brownian: BrownianNoise | None = None
        self._step, self._add_noise = scheduler.step, scheduler.add_noise
        # On this instance only; wraps() keeps the signatures, which pipelines inspect to decide
        # whether to pass `generator` and `eta`.
        scheduler.step = functools.wraps(self._step)(lambda *a, **k: self.step(*a, **k))
        scheduler.add_noise = functools.wraps(self._add_noise)(
            lambda *a, **k: self.add_noise(*a, **k)
        )

    def step(self, *args: Any, **kwargs: Any) -> Any:
        return_dict = kwargs.pop("return_dict", True)
        philox = self._philox()
        if self.generators is not None and "generator" in kwargs and philox is None:
            kwargs["generator"] = self.generators
        if self.brownian_seeds is not None:
            self._brownian_noise(args, kwargs)
        token = None if philox is None else _STEP_NOISE.set(philox)
        try:
            out = self._step(*args, return_dict=True, **kwargs)
        finally:
            if token is not None:
                _STEP_NOISE.reset(token)
        x0 = getattr(out, "pred_original_sample", None)
        if x0 is None:
            x0 = getattr(out, "denoised", None)
        if x0 is None and getattr(self.scheduler, "model_outputs", None):
            x0 = self.scheduler.model_outputs[-1]
        self.last_x0 = x0
        return out if return_dict else (out.prev_sample,)

    def _philox(self) -> Callable[[tuple[int, ...], torch.device], torch.Tensor] | None:
        """With "NV" generators: what the step draws, one draw per image as A1111's
        ImageRNG.next() makes it."""
        generators = self.generators
        if not generators or not isinstance(generators[0], Philox):
            return None
        _takes_step_noise(self.scheduler)

        def step_noise(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
            return torch.stack([draw(g, shape[1:], device) for g in generators])

        return step_noise

    def _brownian_noise(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """DPM++ SDE draws from the scheduler's own noise sampler (made seeded here); the
        multistep SDE solvers take the step's noise as `variance_noise`."""
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        sample = args[2] if len(args) > 2 else kwargs["sample"]
        scheduler = self.scheduler
        if self._brownian is None:
            assert self.brownian_seeds is not None
            self._brownian = BrownianNoise(sample, scheduler.sigmas, self.brownian_seeds)
        if hasattr(scheduler, "noise_sampler"):
            scheduler.noise_sampler = self._brownian
            return
        if scheduler.step_index is None:
            scheduler._init_step_index(timestep)
        i = scheduler.step_index
        kwargs["variance_noise"] = self._brownian(scheduler.sigmas[i], scheduler.sigmas[i + 1])

    def add_noise(
        self, original: torch.Tensor, noise: torch.Tensor, timesteps: Any
    ) -> torch.Tensor:
        if self.noise is not None and self.noise.shape == noise.shape:
            noise = self.noise.to(device=noise.device)
        if self.fill is not None and self.fill.fits(original):
            original = self.fill(original)  # the encoded image as A1111's init_latent
        # fp32, as A1111 keeps the sampler's latents whatever the UNet's dtype (precision.py)
        noisy: torch.Tensor = self._add_noise(original.float(), noise.float(), timesteps)
        return noisy
