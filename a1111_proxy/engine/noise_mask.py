"""The `noise_mask` extension (torch): fresh seeded noise put back into a masked region during a
range of steps, so that region is re-imagined while the rest of the image converges.

After step i of the run's n steps, when start <= i/n < end and i is not the last step, the
latents x (now at the next timestep t) become, per latent pixel with a = strength x mask:

    x' = b + sqrt(1 - a^2) (x - b) + a e,    b = add_noise(x0, 0, t),  e = add_noise(0, z, t)

x0 is the step's estimate of the clean image, z fresh unit noise, and add_noise the scheduler's
own (x0 + sigma z for the k-diffusion samplers, sqrt(alpha) x0 + sqrt(1 - alpha) z for DDIM and
the like). So the region keeps the current estimate of the image and gets noise of the right
level of which a fraction a is new (variance preserved): a = 1 is the noise of a fresh start at
this step, a = 0 changes nothing. z comes from a generator per image seeded from the image's seed
(engine/noise.py `stream`, "noise_mask"), so the same seed gives the same image. The mask is
stretched to the latent size (area average); white is 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image

from a1111_proxy.engine import images, noise
from a1111_proxy.engine.params import Params
from a1111_proxy.schemas import NoiseMask

StepHook = Callable[[Any, int, Any, dict[str, Any]], dict[str, Any]]
STREAM = "noise_mask"


def injector(params: Params, seeds: list[int], tracking: Any) -> StepHook | None:
    """The step hook that re-injects the noise, or None when the job has no noise mask."""
    spec = params.noise_mask
    if spec is None or spec.strength == 0 or spec.start >= spec.end:
        return None
    mask = latent_mask(spec, params.width, params.height)
    generators = [noise.stream(seed, STREAM) for seed in seeds]

    def on_step_end(pipe: Any, i: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        steps = getattr(pipe, "_num_timesteps", 0) or params.steps
        if spec.start <= i / steps < spec.end and i + 1 < steps:
            x0 = tracking.last_x0
            tensors["latents"] = inject(pipe.scheduler, t, tensors["latents"], x0, mask, generators)
        return tensors

    return on_step_end


def latent_mask(spec: NoiseMask, width: int, height: int) -> torch.Tensor:
    """strength x the mask at the latent size, (1, 1, height/8, width/8) in [0, 1]."""
    image = images.decode(spec.mask, "noise_mask.mask").convert("L")
    small = image.resize((width // 8, height // 8), Image.Resampling.BOX)
    values = torch.frombuffer(bytearray(small.tobytes()), dtype=torch.uint8).float() / 255.0
    return (values.reshape(1, 1, height // 8, width // 8) * spec.strength).clamp(0, 1)


def inject(
    scheduler: Any,
    t: Any,
    latents: torch.Tensor,
    x0: torch.Tensor | None,
    amount: torch.Tensor,
    generators: list[torch.Generator],
) -> torch.Tensor:
    """The formula of the module's docstring, at the timestep after `t`."""
    if not getattr(scheduler, "state_in_first_order", True):
        return latents  # mid-way through a second-order step: its state must stay as it is
    t_next = _next_timestep(scheduler, t)
    if t_next is None:
        return latents
    x = latents.float()
    z = torch.stack([torch.randn(x.shape[1:], generator=g) for g in generators[: len(x)]])
    z = z.to(x.device)
    clean = x0.float() if x0 is not None and x0.shape == x.shape else torch.zeros_like(x)
    add_noise = type(scheduler).add_noise  # the class's: the run's own is wrapped (Tracking)
    base = add_noise(scheduler, clean, torch.zeros_like(x), t_next)
    fresh = add_noise(scheduler, torch.zeros_like(x), z, t_next)
    a = amount.to(x.device)
    kept = torch.sqrt(1 - a * a)
    out: torch.Tensor = base + kept * (x - base) + a * fresh
    return out.to(latents.dtype)


def _next_timestep(scheduler: Any, t: Any) -> torch.Tensor | None:
    """The timestep the latents are at after the step at `t` (None after the last)."""
    timesteps: torch.Tensor = scheduler.timesteps
    index = getattr(scheduler, "step_index", None)
    if index is None:  # a scheduler without a step index: the position after t's
        where = (timesteps == torch.as_tensor(t, device=timesteps.device)).nonzero()
        if not len(where):
            return None
        index = int(where[0]) + 1
    if index >= len(timesteps):
        return None
    return timesteps[index : index + 1]


def describe(spec: NoiseMask) -> str:
    """The infotext's `Noise mask` value."""
    return f"strength {spec.strength}, steps {_percent(spec.start)}-{_percent(spec.end)}"


def _percent(fraction: float) -> str:
    return f"{math.floor(fraction * 1000) / 10:g}%"
