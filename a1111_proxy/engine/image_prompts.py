"""Image prompts: IP-Adapter units of `alwayson_scripts.ControlNet.args`, as the A1111 extension
(Mikubill/sd-webui-controlnet) takes them (plain Python, no torch; engine/ip_adapter.py runs them).

A unit is an image prompt when its module starts with `ip-adapter` (`ip-adapter_clip_sd15`,
`ip-adapter_clip_sdxl`, ...). Its `image` is one image or a list of them: several images in one
unit are averaged into one image embedding (the extension's multi-input). Several units each add
their own image prompt, at their own weight and step range, as in the extension.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from a1111_proxy.engine.controlnet import (
    IP_ADAPTER_MODULES,
    enabled_args,
    is_ip_adapter,
    number,
)
from a1111_proxy.engine.errors import InvalidParams


@dataclass(frozen=True)
class ImagePromptUnit:
    """One enabled IP-Adapter unit, checked, with the extension's defaults filled in."""

    index: int  # position in args (the infotext's "ControlNet N")
    module: str
    model: str
    weight: float = 1.0
    images: tuple[str, ...] = ()  # base64; empty: img2img's init image
    guidance_start: float = 0.0
    guidance_end: float = 1.0

    @property
    def encoder(self) -> str:
        """The CLIP vision encoder the module names (ViT-H or ViT-bigG)."""
        return IP_ADAPTER_MODULES[self.module]

    def active(self, step: int, steps: int) -> bool:
        """Whether step `step` (0-based) of `steps` is in the unit's range: as the engine's
        ControlNet units (diffusers' rule), start <= step/steps and (step+1)/steps <= end."""
        steps = max(steps, 1)
        return self.guidance_start <= step / steps and (step + 1) / steps <= self.guidance_end

    def infotext(self) -> str:
        """What the extension writes as `ControlNet N` in the infotext."""
        return (
            f"Module: {self.module}, Model: {self.model}, Weight: {self.weight}, "
            f"Guidance Start: {self.guidance_start}, Guidance End: {self.guidance_end}"
        )


def parse_units(alwayson_scripts: dict[str, Any] | None) -> tuple[ImagePromptUnit, ...]:
    """The enabled IP-Adapter units of `alwayson_scripts.ControlNet.args`. Raises
    InvalidParams."""
    return tuple(_unit(i, arg) for i, arg in enabled_args(alwayson_scripts) if is_ip_adapter(arg))


def _unit(index: int, arg: dict[str, Any]) -> ImagePromptUnit:
    where = f"alwayson_scripts.ControlNet.args[{index}]"
    module = str(arg.get("module")).strip().lower()
    if module not in IP_ADAPTER_MODULES:
        raise InvalidParams(
            f"{where}.module {arg.get('module')!r} is not available on the diffusers engine (no "
            f"face ID or InstantID); use one of {', '.join(IP_ADAPTER_MODULES)}"
        )
    model = str(arg.get("model") or "None")
    if model.strip().lower() == "none":
        raise InvalidParams(
            f"{where}.model: the IP-Adapter unit is enabled but has no model; name an "
            "ip-adapter_* model from /controlnet/model_list"
        )
    start = number(arg, "guidance_start", 0.0, where)
    end = number(arg, "guidance_end", number(arg, "guidance", 1.0, where), where)
    if not 0.0 <= start <= end <= 1.0:
        raise InvalidParams(
            f"{where}: guidance_start and guidance_end must satisfy "
            f"0 <= start <= end <= 1 (got {start} and {end})"
        )
    return ImagePromptUnit(
        index=index,
        module=module,
        model=model,
        weight=number(arg, "weight", 1.0, where),
        images=_images(arg.get("image", arg.get("input_image")), where),
        guidance_start=start,
        guidance_end=end,
    )


def _images(value: Any, where: str) -> tuple[str, ...]:
    """One image (a string or {"image": ...}) or a list of them; every one is used."""
    items = value if isinstance(value, list) else [value]
    found = []
    for n, item in enumerate(items):
        image = item.get("image") if isinstance(item, dict) else item
        if image is None or image == "":
            continue
        if not isinstance(image, str):
            raise InvalidParams(f"{where}.image[{n}] must be a base64 image")
        if image.startswith(("http://", "https://")):
            raise InvalidParams(
                f"{where}.image: the diffusers engine does not fetch image URLs; "
                "send base64 or a data: URI"
            )
        found.append(image)
    return tuple(found)
