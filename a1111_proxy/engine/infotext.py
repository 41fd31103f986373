"""A1111's generation text ("infotext") and the `info` JSON of its responses.

The infotext is what A1111 writes into each PNG's `parameters` chunk and `info.infotexts`:

    <prompt>
    Negative prompt: <negative prompt>
    Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7.0, Seed: 1, ...
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from a1111_proxy import __version__
from a1111_proxy.engine.params import Params

VERSION = f"a1111-proxy-{__version__}"


@dataclass(frozen=True)
class ModelInfo:
    name: str  # A1111's "Model": the checkpoint's file stem
    hash: str | None  # A1111's "Model hash": sha256[:10] of the file (None for diffusers folders)


@dataclass(frozen=True)
class VaeInfo:
    name: str  # A1111's "VAE": the VAE file's name, extension included
    hash: str  # A1111's "VAE hash": sha256[:10] of the file


@dataclass
class Generation:
    """What one job produced, for the infotext and `info`."""

    params: Params
    model: ModelInfo
    seeds: list[int]
    subseeds: list[int]
    extra: dict[str, Any] = field(default_factory=dict)  # A1111's extra_generation_params
    job_timestamp: str = field(default_factory=lambda: time.strftime("%Y%m%d%H%M%S"))
    is_using_inpainting_conditioning: bool = False
    vae: VaeInfo | None = None  # a VAE from sd_vae; None: the checkpoint's own

    def note_eta(self) -> None:
        """A1111's "Eta" extra parameter, set as sampling starts: for the samplers that take the
        request's eta, when it is not A1111's default 1."""
        p = self.params
        if p.sampler.sampler.eta and p.eta is not None and p.eta != 1.0:
            self.extra["Eta"] = p.eta

    def infotext(self, index: int) -> str:
        p = self.params
        fields: dict[str, Any] = {
            "Steps": p.steps,
            "Sampler": p.sampler.sampler.name,
            "Schedule type": p.sampler.schedule_label,
            "CFG scale": p.cfg_scale,
            "Seed": self.seeds[index],
            "Size": f"{p.width}x{p.height}",
            "Model hash": self.model.hash,
            "Model": self.model.name,
            "VAE hash": self.vae.hash if self.vae else None,
            "VAE": self.vae.name if self.vae else None,
            "Variation seed": self.subseeds[index] if p.subseed_strength else None,
            "Variation seed strength": p.subseed_strength or None,
            "Seed resize from": _seed_resize(p),
            "Denoising strength": (
                p.denoising_strength if p.kind == "img2img" or p.hires else None
            ),
            "Clip skip": p.clip_skip if p.clip_skip > 1 else None,
            "ENSD": p.eta_noise_seed_delta if _uses_ensd(p) else None,
            "RNG": p.randn_source if p.randn_source != "GPU" else None,
        }
        for key, value in self.extra.items():
            fields.setdefault(key, value)
        fields["Version"] = VERSION
        line = ", ".join(
            key if key == value else f"{key}: {_quote(value)}"
            for key, value in fields.items()
            if value is not None
        )
        negative = f"\nNegative prompt: {p.negative_prompt}" if p.negative_prompt else ""
        return f"{p.prompt}{negative}\n{line}"

    def info(self, count: int) -> str:
        """`info` as A1111 sends it: a JSON string, keys in A1111's order."""
        p = self.params
        body = {
            "prompt": p.prompt,
            "all_prompts": [p.prompt] * len(self.seeds),
            "negative_prompt": p.negative_prompt,
            "all_negative_prompts": [p.negative_prompt] * len(self.seeds),
            "seed": self.seeds[0],
            "all_seeds": self.seeds,
            "subseed": self.subseeds[0],
            "all_subseeds": self.subseeds,
            "subseed_strength": p.subseed_strength,
            "width": p.width,
            "height": p.height,
            "sampler_name": p.sampler.sampler.name,
            "cfg_scale": p.cfg_scale,
            "steps": p.steps,
            "batch_size": p.batch_size,
            "restore_faces": False,
            "face_restoration_model": None,
            "sd_model_name": self.model.name,
            "sd_model_hash": self.model.hash,
            "sd_vae_name": self.vae.name if self.vae else None,
            "sd_vae_hash": self.vae.hash if self.vae else None,
            "seed_resize_from_w": p.seed_resize_from_w,
            "seed_resize_from_h": p.seed_resize_from_h,
            "denoising_strength": p.denoising_strength,
            "extra_generation_params": self._extra_generation_params(),
            "index_of_first_image": 0,
            "infotexts": [self.infotext(i) for i in range(count)],
            "styles": p.styles,
            "job_timestamp": self.job_timestamp,
            "clip_skip": p.clip_skip,
            "is_using_inpainting_conditioning": self.is_using_inpainting_conditioning,
            "version": VERSION,
        }
        return json.dumps(body, default=lambda _: None)

    def _extra_generation_params(self) -> dict[str, Any]:
        """A1111's p.extra_generation_params: its k-diffusion samplers add the schedule they
        ran when sampling (after what img2img's init and the networks wrote)."""
        used = self.params.sampler.schedule_used
        return {**self.extra, "Schedule type": used} if used is not None else dict(self.extra)


_MASKED_CONTENT = {0: "fill", 2: "latent noise", 3: "latent nothing"}  # 1 "original": none


def inpaint_fields(p: Params, *, only_masked: bool) -> dict[str, Any]:
    """What A1111's img2img init writes for a masked job, in its order: the mask mode when
    inverted, the blur when any (its value only when x and y agree), the "Only masked" area
    and padding, and the masked content unless it is "original"."""
    blurred = p.mask_blur_x > 0 or p.mask_blur_y > 0
    fields: dict[str, Any] = {
        "Mask mode": "Inpaint not masked" if p.inpainting_mask_invert else None,
        "Mask blur": p.mask_blur_x if blurred and p.mask_blur_x == p.mask_blur_y else None,
        "Inpaint area": "Only masked" if only_masked else None,
        "Masked area padding": p.inpaint_full_res_padding if only_masked else None,
        "Masked content": _MASKED_CONTENT.get(p.inpainting_fill),
    }
    return {key: value for key, value in fields.items() if value is not None}


def _uses_ensd(p: Params) -> bool:
    """A1111's is_sampler_using_eta_noise_seed_delta: a delta is set, the sampler is one that
    uses it (the ancestral ones), and eta is not 0 (unset means A1111's eta_ancestral, 1)."""
    return p.eta_noise_seed_delta != 0 and p.sampler.sampler.uses_ensd and p.eta != 0


def _seed_resize(p: Params) -> str | None:
    if p.seed_resize_from_w > 0 and p.seed_resize_from_h > 0:
        return f"{p.seed_resize_from_w}x{p.seed_resize_from_h}"
    return None


def _quote(value: Any) -> str:
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)
