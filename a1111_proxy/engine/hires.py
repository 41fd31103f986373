"""Hires fix as A1111's txt2img asks for it (plain Python, no torch): the second pass's size,
upscaler, steps, strength, prompts and sampler, checked, and its infotext fields.

A1111 (`processing.StableDiffusionProcessingTxt2Img`): the first pass runs at width x height; its
result is upscaled to `hr_scale` times that (or to `hr_resize_x` x `hr_resize_y`, cropped to keep
the aspect ratio) either in latent space ("Latent ..." modes) or as an image (Lanczos, Nearest,
None), then denoised again img2img-style with `denoising_strength`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from a1111_proxy.engine.errors import HiresError, UnknownSampler
from a1111_proxy.engine.samplers import Resolved, resolve
from a1111_proxy.schemas import Txt2ImgRequest

# A1111's shared.latent_upscale_modes: name -> (torch interpolate mode, antialias)
LATENT_MODES: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
IMAGE_UPSCALERS = ("None", "Lanczos", "Nearest")
SAME = (None, "", "Use same sampler", "Same as primary", "Use same scheduler")
SAME_CHECKPOINT = (None, "", "Use same checkpoint")
DEFAULT_STRENGTH = 0.7  # A1111's UI default; its API fails without one
MAX_SIDE = 8192
LATENT_FACTOR = 8


def upscalers() -> list[dict[str, Any]]:
    """`GET /sdapi/v1/upscalers` as A1111 answers it, for what the engine has."""
    return [
        {"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
        for name in IMAGE_UPSCALERS
    ]


def latent_upscale_modes() -> list[dict[str, str]]:
    return [{"name": name} for name in LATENT_MODES]


@dataclass(frozen=True)
class Hires:
    upscaler: str  # a LATENT_MODES or IMAGE_UPSCALERS name
    upscaler_given: str | None  # as sent (A1111 writes "Hires upscaler" only when sent)
    scale: float
    resize_x: int
    resize_y: int
    target_width: int  # A1111's hr_upscale_to_x / _y
    target_height: int
    truncate_x: int  # latent columns / rows cropped off to reach hr_resize_x x hr_resize_y
    truncate_y: int
    steps: int  # hr_second_pass_steps; 0: the first pass's steps
    denoising_strength: float
    prompt: str
    negative_prompt: str
    sampler: Resolved
    sampler_differs: bool
    schedule_differs: bool

    @property
    def latent(self) -> tuple[str, bool] | None:
        return LATENT_MODES.get(self.upscaler)

    @property
    def latent_size(self) -> tuple[int, int]:
        """(width, height) of the second pass's latents, after the crop."""
        return (
            self.target_width // LATENT_FACTOR - self.truncate_x,
            self.target_height // LATENT_FACTOR - self.truncate_y,
        )

    def infotext(self, prompt: str, negative_prompt: str) -> dict[str, Any]:
        """A1111's extra_generation_params for hires fix, in its order (None: not written)."""
        fields: dict[str, Any] = {
            "Hires sampler": self.sampler.sampler.name if self.sampler_differs else None,
            "Hires prompt": self.prompt if self.prompt != prompt else None,
            "Hires negative prompt": (
                self.negative_prompt if self.negative_prompt != negative_prompt else None
            ),
            "Hires schedule type": self.sampler.schedule_used if self.schedule_differs else None,
        }
        if self.resize_x == 0 and self.resize_y == 0:
            fields["Hires upscale"] = self.scale
        else:
            fields["Hires resize"] = f"{self.resize_x}x{self.resize_y}"
        fields["Hires steps"] = self.steps or None
        fields["Hires upscaler"] = self.upscaler_given
        return {key: value for key, value in fields.items() if value is not None}


def from_request(
    request: Txt2ImgRequest, *, width: int, height: int, sampler: Resolved
) -> Hires | None:
    """The hires fix of a txt2img request (None when enable_hr is off). Raises HiresError."""
    if not request.enable_hr:
        return None
    checkpoint = request.hr_checkpoint_name
    if checkpoint not in SAME_CHECKPOINT:
        raise HiresError(
            f"hr_checkpoint_name {checkpoint!r}: the diffusers engine runs the second pass on "
            "the same checkpoint; leave hr_checkpoint_name unset"
        )
    upscaler = _upscaler(request.hr_upscaler)
    scale = 2.0 if request.hr_scale is None else float(request.hr_scale)
    resize_x = _non_negative(request, "hr_resize_x")
    resize_y = _non_negative(request, "hr_resize_y")
    target = _target(width, height, scale, resize_x, resize_y)
    steps = _non_negative(request, "hr_second_pass_steps")
    if steps > 500:
        raise HiresError(f"hr_second_pass_steps must be at most 500 (got {steps})")
    strength = request.denoising_strength
    hr_sampler = _hr_sampler(request, sampler)
    return Hires(
        upscaler=upscaler,
        upscaler_given=request.hr_upscaler,
        scale=scale,
        resize_x=resize_x,
        resize_y=resize_y,
        target_width=target[0],
        target_height=target[1],
        truncate_x=target[2],
        truncate_y=target[3],
        steps=steps,
        denoising_strength=DEFAULT_STRENGTH if strength is None else float(strength),
        prompt=request.hr_prompt or request.prompt or "",
        negative_prompt=request.hr_negative_prompt or request.negative_prompt or "",
        sampler=hr_sampler,
        sampler_differs=hr_sampler.sampler.name != sampler.sampler.name,
        # A1111 writes the second pass's schedule where one runs and differs from the first's.
        schedule_differs=hr_sampler.schedule_used not in (None, sampler.schedule_used),
    )


def _upscaler(name: str | None) -> str:
    if name is None:
        return "Latent"  # A1111's latent_upscale_default_mode_name
    if name in LATENT_MODES or name in IMAGE_UPSCALERS:
        return name
    raise HiresError(
        f"hr_upscaler {name!r} is not available on the diffusers engine; use one of: "
        + ", ".join([*LATENT_MODES, *IMAGE_UPSCALERS])
    )


def _non_negative(request: Txt2ImgRequest, name: str) -> int:
    value = getattr(request, name) or 0
    if value < 0:
        raise HiresError(f"{name} must be 0 or more (got {value})")
    return int(value)


def _target(
    width: int, height: int, scale: float, resize_x: int, resize_y: int
) -> tuple[int, int, int, int]:
    """A1111's calculate_target_resolution: (to_x, to_y, truncate_x, truncate_y)."""
    truncate_x = truncate_y = 0
    if resize_x == 0 and resize_y == 0:
        if not scale > 0:
            raise HiresError(f"hr_scale must be more than 0 (got {scale}); 2 doubles the size")
        to_x, to_y = int(width * scale), int(height * scale)
    elif resize_y == 0:
        to_x, to_y = resize_x, resize_x * height // width
    elif resize_x == 0:
        to_x, to_y = resize_y * width // height, resize_y
    else:
        if width / height < resize_x / resize_y:
            to_x, to_y = resize_x, resize_x * height // width
        else:
            to_x, to_y = resize_y * width // height, resize_y
        truncate_x = (to_x - resize_x) // LATENT_FACTOR
        truncate_y = (to_y - resize_y) // LATENT_FACTOR
    if min(to_x, to_y) < 64 or max(to_x, to_y) > MAX_SIDE:
        raise HiresError(
            f"hires fix would make {to_x}x{to_y} images; each side must be from 64 to "
            f"{MAX_SIDE}: change hr_scale or hr_resize_x/hr_resize_y"
        )
    return to_x, to_y, truncate_x, truncate_y


def _hr_sampler(request: Txt2ImgRequest, sampler: Resolved) -> Resolved:
    name = request.hr_sampler_name
    schedule = request.hr_scheduler
    if name in SAME and schedule in SAME:
        return sampler
    try:
        return resolve(
            sampler.sampler.name if name in SAME else name,
            (request.scheduler if schedule in SAME else schedule),
        )
    except UnknownSampler as exc:
        raise HiresError(f"hr_sampler_name/hr_scheduler: {exc}") from None
