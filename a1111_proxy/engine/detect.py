"""ControlNet's `/controlnet/detect` on the engine: the weight-free preprocessors on their own.

`problems()` is plain Python (the API checks the body at submit); `run()` needs numpy and scipy.
The answer is the extension's: `{"images": [base64 PNG, ...], "info": "Success"}`, each map at
the preprocessor's resolution.
"""

from __future__ import annotations

import base64
from typing import Any

from a1111_proxy.engine.controlnet import ControlUnit, find_module
from a1111_proxy.engine.errors import InvalidParams


def problems(body: dict[str, Any]) -> list[str]:
    try:
        _unit(body)
        _images(body)
    except InvalidParams as exc:
        return [str(exc)]
    return []


def run(body: dict[str, Any]) -> dict[str, Any]:
    """Raises InvalidParams."""
    # Here, not at the top: preprocessors needs numpy and scipy, which the API never imports.
    from a1111_proxy.engine import images, preprocessors

    unit = _unit(body)
    out = []
    for i, data in enumerate(_images(body)):
        source = images.decode(data, f"controlnet_input_images[{i}]").convert("RGB")
        resolution = unit.resolution() if unit.module.resolution else None
        detected = preprocessors.detect(
            source, unit.module.name, resolution=resolution, a=unit.slider(0), b=unit.slider(1)
        )
        out.append(base64.b64encode(images.encode_png(detected, None)).decode("ascii"))
    return {"images": out, "info": "Success"}


def _unit(body: dict[str, Any]) -> ControlUnit:
    def number(key: str) -> float:
        value = body.get(key, -1)
        try:
            return float(-1 if value is None else value)
        except (TypeError, ValueError):
            raise InvalidParams(f"{key} must be a number (got {value!r})") from None

    module = find_module(str(body.get("controlnet_module") or "none"))
    return ControlUnit(
        index=0,
        module=module,
        model="None",
        processor_res=int(number("controlnet_processor_res")),
        threshold_a=number("controlnet_threshold_a"),
        threshold_b=number("controlnet_threshold_b"),
    )


def _images(body: dict[str, Any]) -> list[str]:
    found = body.get("controlnet_input_images")
    if not isinstance(found, list) or not found or not all(isinstance(i, str) for i in found):
        raise InvalidParams("controlnet_input_images must be a non-empty list of base64 images")
    return found
