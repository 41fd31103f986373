"""What one txt2img/img2img job asks the engine for, checked and with A1111's defaults filled in.

Plain Python (no torch): the API uses `problems()` to refuse a request at submit time, and the
engine uses `Params.from_payload()` to run it.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ValidationError

from a1111_proxy.engine import controlnet, detect, image_prompts, lora
from a1111_proxy.engine import hires as hires_fix
from a1111_proxy.engine.controlnet import ControlUnit
from a1111_proxy.engine.errors import HiresError, InvalidParams, UnknownSampler
from a1111_proxy.engine.image_prompts import ImagePromptUnit
from a1111_proxy.engine.lora import LoraUse
from a1111_proxy.engine.samplers import Resolved, Sampler, resolve
from a1111_proxy.schemas import REQUEST_MODELS, Img2ImgRequest, NoiseMask, Txt2ImgRequest

Kind = Literal["txt2img", "img2img"]
RandnSource = Literal["GPU", "CPU", "NV"]  # where the initial noise is drawn (A1111's default: GPU)
RANDN_SOURCES: dict[str, RandnSource] = {"GPU": "GPU", "CPU": "CPU", "NV": "NV"}

MAX_SEED = 4294967294
# The txt2img-only fields A1111's img2img body does not have (our schema shares one base class).
TXT2IMG_ONLY = frozenset(
    {
        "enable_hr",
        "firstphase_width",
        "firstphase_height",
        "hr_scale",
        "hr_upscaler",
        "hr_second_pass_steps",
        "hr_resize_x",
        "hr_resize_y",
        "hr_checkpoint_name",
        "hr_sampler_name",
        "hr_scheduler",
        "hr_prompt",
        "hr_negative_prompt",
        "firstpass_image",
    }
)


@dataclass(frozen=True)
class Params:
    kind: Kind
    prompt: str
    negative_prompt: str
    seed: int
    subseed: int
    subseed_strength: float
    seed_resize_from_w: int
    seed_resize_from_h: int
    sampler: Resolved
    batch_size: int
    n_iter: int
    steps: int
    cfg_scale: float
    width: int
    height: int
    eta: float | None
    denoising_strength: float | None
    clip_skip: int
    checkpoint: str | None
    randn_source: RandnSource
    eta_noise_seed_delta: int
    send_images: bool
    styles: list[str]
    parameters: dict[str, Any]  # the request as A1111 echoes it
    init_images: tuple[str, ...] = ()
    resize_mode: int = 0
    mask: str | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    inpainting_fill: int = 1
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: bool = False
    hires: hires_fix.Hires | None = None  # txt2img's hires fix (engine/hires.py)
    # LoRA and ControlNet (engine/lora.py, engine/controlnet.py)
    loras: tuple[LoraUse, ...] = ()  # from the prompt's <lora:...> tags
    controlnet_units: tuple[ControlUnit, ...] = ()  # the enabled ones
    pad_cond_uncond: bool = False  # A1111's option: pad prompt/negative to one length
    image_prompts: tuple[ImagePromptUnit, ...] = ()  # IP-Adapter units (engine/ip_adapter.py)
    noise_mask: NoiseMask | None = None  # our extension (engine/noise_mask.py)
    sd_vae: str | None = None  # A1111's option (engine/vae.py); None: the backend's default
    eta_ancestral: float = 1.0  # A1111's options: the eta of a request without one
    eta_ddim: float = 0.0

    def eta_for(self, sampler: Sampler) -> float | None:
        """The eta `sampler` runs with (A1111's Sampler.initialize: the request's, else the
        option the sampler reads); None for a sampler that takes no eta."""
        if sampler.eta_option is None:
            return None
        if self.eta is not None:
            return self.eta
        return self.eta_ddim if sampler.eta_option == "eta_ddim" else self.eta_ancestral

    @property
    def count(self) -> int:
        return self.batch_size * self.n_iter

    def all_seeds(self) -> list[int]:
        """A1111: seed + i per image, unless a variation strength is set (then all share it)."""
        step = 1 if self.subseed_strength == 0 else 0
        return [self.seed + i * step for i in range(self.count)]

    def all_subseeds(self) -> list[int]:
        return [self.subseed + i for i in range(self.count)]

    @classmethod
    def from_payload(
        cls, kind: str, payload: dict[str, Any], *, rng: random.Random | None = None
    ) -> Params:
        """Parse as A1111 does and fix random seeds. Raises InvalidParams."""
        request = _validate(kind, payload)
        _refuse_unsupported(request)
        sampler = _sampler(request)
        settings = request.override_settings or {}
        rng = rng or random.Random()
        params = cls(
            kind="img2img" if isinstance(request, Img2ImgRequest) else "txt2img",
            prompt=request.prompt or "",
            negative_prompt=request.negative_prompt or "",
            seed=_fixed_seed(request.seed, rng),
            subseed=_fixed_seed(request.subseed, rng),
            subseed_strength=float(request.subseed_strength or 0.0),
            seed_resize_from_w=request.seed_resize_from_w or -1,
            seed_resize_from_h=request.seed_resize_from_h or -1,
            sampler=sampler,
            batch_size=request.batch_size or 1,
            n_iter=request.n_iter or 1,
            steps=request.steps or 50,
            cfg_scale=7.0 if request.cfg_scale is None else float(request.cfg_scale),
            width=_multiple_of_8("width", 512 if request.width is None else request.width),
            height=_multiple_of_8("height", 512 if request.height is None else request.height),
            eta=request.eta,
            denoising_strength=request.denoising_strength,
            clip_skip=_int_setting(settings, "CLIP_stop_at_last_layers", 1, low=1, high=12),
            checkpoint=settings.get("sd_model_checkpoint") or None,
            randn_source=_randn_source(settings),
            eta_noise_seed_delta=_int_setting(
                settings, "eta_noise_seed_delta", 0, low=0, high=2**32
            ),
            pad_cond_uncond=bool(settings.get("pad_cond_uncond", False)),
            sd_vae=_sd_vae(settings),
            eta_ancestral=_float_setting(settings, "eta_ancestral", 1.0),
            eta_ddim=_float_setting(settings, "eta_ddim", 0.0),
            send_images=request.send_images,
            noise_mask=request.noise_mask,
            styles=list(request.styles or []),
            parameters=echo_parameters(kind, request),
        )
        if isinstance(request, Img2ImgRequest):
            params = _with_img2img(params, request)
        else:
            params = _with_hires(params, request)
        return _with_networks(params, request)


def problems(kind: str, payload: dict[str, Any]) -> list[str]:
    """Why the engine would refuse this request (empty when it would run it)."""
    if kind not in REQUEST_MODELS:
        return _other_job_problems(kind, payload)
    try:
        Params.from_payload(kind, payload)
    except InvalidParams as exc:
        return [str(exc)]
    return []


def _other_job_problems(kind: str, payload: dict[str, Any]) -> list[str]:
    """ControlNet's detect runs on the engine (engine/detect.py); interrogate and extras do not."""
    if kind == "controlnet-detect":
        return detect.problems(payload)
    return [
        f"{kind} is not supported by the diffusers engine (it has no interrogator, upscaler or "
        "face restoration models); run it on an A1111 backend"
    ]


def echo_parameters(kind: str, request: Txt2ImgRequest) -> dict[str, Any]:
    """A1111's `parameters`: every field of its request model, defaults filled in, in order;
    unknown keys dropped; img2img's images left out unless include_init_images."""
    fields = [f for f in type(request).model_fields if kind == "txt2img" or f not in TXT2IMG_ONLY]
    echoed = {name: getattr(request, name) for name in fields}
    if echoed.get("noise_mask") is not None:
        echoed["noise_mask"] = echoed["noise_mask"].model_dump()
    if kind == "img2img" and not echoed.get("include_init_images"):
        echoed["init_images"] = None
        echoed["mask"] = None
    return echoed


def _validate(kind: str, payload: dict[str, Any]) -> Txt2ImgRequest:
    try:
        return REQUEST_MODELS[kind].model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise InvalidParams(f"{where}: {first['msg']}") from None


def _refuse_unsupported(request: Txt2ImgRequest) -> None:
    refused = {
        "restore_faces": "face restoration (restore_faces) is",
        "tiling": "tiling is",
        "refiner_checkpoint": "a refiner (refiner_checkpoint) is",
        "script_name": "scripts (script_name) are",
    }
    for name, what in refused.items():
        if getattr(request, name, None):
            raise InvalidParams(f"{what} not supported by the diffusers engine; leave {name} unset")
    for script, value in (request.alwayson_scripts or {}).items():
        args = value.get("args") if isinstance(value, dict) else value
        if args and script.lower() != "controlnet":
            raise InvalidParams(
                f"alwayson_scripts {script!r} is not supported by the diffusers engine (only "
                "ControlNet is); remove it (or send it with empty args)"
            )


def _with_networks(params: Params, request: Txt2ImgRequest) -> Params:
    """LoRA tags and ControlNet units (engine/lora.py, engine/controlnet.py)."""
    for text in (request.prompt or "", request.negative_prompt or ""):
        others = lora.other_networks(text)
        if others and not request.disable_extra_networks:
            raise InvalidParams(
                f"extra networks such as {others[0]!r} (hypernetworks, ...) are not supported "
                "by the diffusers engine; only <lora:...> is. Remove it from the prompt"
            )
    uses = () if request.disable_extra_networks else lora.parse_uses(request.prompt or "")
    units = controlnet.parse_units(request.alwayson_scripts)
    if units and _runs_adaptive(params):
        raise InvalidParams(
            "ControlNet does not run with the DPM adaptive sampler in the diffusers engine (its "
            "step count is not known ahead, so guidance start/end cannot be placed); pick "
            "another sampler (DPM fast, DPM++ 2M, ...)"
        )
    prompts = image_prompts.parse_units(request.alwayson_scripts)
    return dataclasses.replace(params, loras=uses, controlnet_units=units, image_prompts=prompts)


def _runs_adaptive(params: Params) -> bool:
    passes = [params.sampler] + ([params.hires.sampler] if params.hires else [])
    return any(resolved.sampler.adaptive for resolved in passes)


def _sampler(request: Txt2ImgRequest) -> Resolved:
    try:
        return resolve(request.sampler_name or request.sampler_index, request.scheduler)
    except UnknownSampler as exc:
        raise InvalidParams(str(exc)) from None


def _fixed_seed(seed: int | None, rng: random.Random) -> int:
    if seed is None or seed == -1:
        return rng.randrange(MAX_SEED)
    if seed < 0:
        raise InvalidParams(f"seed {seed} is negative; use -1 for a random seed or 0..{MAX_SEED}")
    return int(seed)


def _multiple_of_8(name: str, value: int) -> int:
    if value < 64 or value % 8:
        lower = max(64, value - value % 8)
        raise InvalidParams(
            f"{name} must be a multiple of 8 and at least 64 (got {value}); "
            f"try {lower} or {lower + 8}"
        )
    return value


def _int_setting(settings: dict[str, Any], key: str, default: int, *, low: int, high: int) -> int:
    value = settings.get(key, default)
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise InvalidParams(
            f"override_settings.{key} must be a whole number (got {value!r})"
        ) from None
    if not low <= number <= high:
        raise InvalidParams(f"override_settings.{key} must be from {low} to {high} (got {number})")
    return number


def _float_setting(settings: dict[str, Any], key: str, default: float) -> float:
    value = settings.get(key, default)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InvalidParams(f"override_settings.{key} must be a number (got {value!r})") from None
    if number < 0:
        raise InvalidParams(f"override_settings.{key} must not be negative (got {number})")
    return number


def _sd_vae(settings: dict[str, Any]) -> str | None:
    value = settings.get("sd_vae")
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise InvalidParams(
            f"override_settings.sd_vae must be a VAE file name, 'Automatic' or 'None' (got "
            f"{value!r})"
        )
    return value


def _randn_source(settings: dict[str, Any]) -> RandnSource:
    value = str(settings.get("randn_source", "GPU"))
    found = RANDN_SOURCES.get(value)
    if found is None:
        raise InvalidParams(
            f"override_settings.randn_source {value!r} is not supported; use 'GPU' (the default), "
            "'CPU' or 'NV'"
        )
    return found


def _with_hires(params: Params, request: Txt2ImgRequest) -> Params:
    try:
        found = hires_fix.from_request(
            request, width=params.width, height=params.height, sampler=params.sampler
        )
    except HiresError as exc:
        raise InvalidParams(str(exc)) from None
    if found is None:
        return params
    return dataclasses.replace(params, hires=found, denoising_strength=found.denoising_strength)


def _with_img2img(params: Params, request: Img2ImgRequest) -> Params:
    strength = request.denoising_strength
    if not 0.0 <= strength <= 1.0:
        raise InvalidParams(f"denoising_strength must be from 0 to 1 (got {strength})")
    if request.resize_mode not in (0, 1, 2, 3, None):
        raise InvalidParams(f"resize_mode must be 0, 1, 2 or 3 (got {request.resize_mode})")
    fill = 1 if request.inpainting_fill is None else request.inpainting_fill
    if fill not in (0, 1, 2, 3):
        raise InvalidParams(f"inpainting_fill must be 0, 1, 2 or 3 (got {fill})")
    for image in [*request.init_images, request.mask or ""]:
        if image.startswith(("http://", "https://")):
            raise InvalidParams(
                "the diffusers engine does not fetch image URLs; send init_images and mask as "
                "base64 or data: URIs"
            )
    blur = request.mask_blur
    return dataclasses.replace(
        params,
        init_images=tuple(request.init_images),
        resize_mode=request.resize_mode or 0,
        mask=request.mask or None,
        mask_blur_x=_or_default(request.mask_blur_x, 4) if blur is None else blur,
        mask_blur_y=_or_default(request.mask_blur_y, 4) if blur is None else blur,
        inpainting_fill=fill,
        inpaint_full_res=bool(request.inpaint_full_res),
        inpaint_full_res_padding=request.inpaint_full_res_padding or 0,
        inpainting_mask_invert=bool(request.inpainting_mask_invert),
        batch_size=_batch_for_images(params.batch_size, request.init_images),
    )


def _batch_for_images(batch_size: int, init_images: list[str]) -> int:
    """A1111: several init images make a batch of that many, one image each; more images than
    batch_size is refused."""
    if len(init_images) <= 1:
        return batch_size
    if len(init_images) > batch_size:
        raise InvalidParams(
            f"bad number of images passed: {len(init_images)}; expecting {batch_size} or less "
            "(set batch_size to the number of init_images)"
        )
    return len(init_images)


def _or_default(value: int | None, default: int) -> int:
    return default if value is None else value
