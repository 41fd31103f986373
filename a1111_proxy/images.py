"""Input images in request bodies: found, checked and, when too large, resized down.

Every image a client sends (img2img `init_images` and `mask`, ControlNet units, extras,
interrogate) must decode as PNG, JPEG or WEBP, stay under a pixel budget (decompression bombs
are refused before decoding), and is resized so that no side exceeds `max_side` (LANCZOS,
keeping the aspect ratio, as the ControlNet API did). http(s) URLs are refused unless allowed.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from PIL import Image

FORMATS = frozenset({"PNG", "JPEG", "WEBP"})


@dataclass(frozen=True)
class ImageRules:
    max_pixels: int = 40_000_000
    max_side: int = 2048
    allow_urls: bool = False


class ImageProblem(ValueError):
    """What is wrong with one image, and where."""

    def __init__(self, loc: list[str | int], message: str) -> None:
        super().__init__(message)
        self.loc = loc
        self.message = message


def image_fields(kind: str, body: dict[str, Any]) -> Iterator[tuple[list[str | int], Any, Any]]:
    """(location, container, key) of every image-valued field of a request body."""
    if kind == "img2img":
        for i, _ in enumerate(_list(body.get("init_images"))):
            yield ["init_images", i], body["init_images"], i
        for key in ("mask", "latent_mask", "firstpass_image"):
            if isinstance(body.get(key), str) and body[key]:
                yield [key], body, key
    if kind in ("txt2img", "img2img"):
        yield from _controlnet_images(body)
    if kind in ("interrogate", "extra-single-image") and isinstance(body.get("image"), str):
        yield ["image"], body, "image"
    if kind == "extra-batch-images":
        for i, item in enumerate(_list(body.get("imageList"))):
            if isinstance(item, dict) and isinstance(item.get("data"), str):
                yield ["imageList", i, "data"], item, "data"
    if kind == "controlnet-detect":
        for i, _ in enumerate(_list(body.get("controlnet_input_images"))):
            yield ["controlnet_input_images", i], body["controlnet_input_images"], i


def _controlnet_images(body: dict[str, Any]) -> Iterator[tuple[list[str | int], Any, Any]]:
    scripts = body.get("alwayson_scripts")
    if not isinstance(scripts, dict):
        return
    for name, script in scripts.items():
        if name.lower() != "controlnet":
            continue
        args = script.get("args") if isinstance(script, dict) else script
        for i, unit in enumerate(_list(args)):
            if not isinstance(unit, dict):
                continue
            base: list[str | int] = ["alwayson_scripts", name, "args", i]
            for key in ("image", "input_image", "mask", "mask_image"):
                value = unit.get(key)
                if isinstance(value, str) and value:
                    yield [*base, key], unit, key
                elif isinstance(value, dict):
                    for sub in ("image", "mask"):
                        if isinstance(value.get(sub), str) and value[sub]:
                            yield [*base, key, sub], value, sub


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


async def fetch_image_urls(
    kind: str, body: dict[str, Any], fetch: Any, max_bytes: int
) -> list[ImageProblem]:
    """Replace image URLs by the images themselves (base64), fetched with `fetch(url,
    max_bytes=...)`; return the problems found."""
    problems = []
    for loc, container, key in list(image_fields(kind, body)):
        value = container[key]
        if isinstance(value, str) and value.startswith(("http://", "https://")):
            try:
                container[key] = base64.b64encode(await fetch(value, max_bytes=max_bytes)).decode()
            except ValueError as exc:
                problems.append(ImageProblem(loc, f"{value}: {exc}"))
    return problems


def check_images(kind: str, body: dict[str, Any], rules: ImageRules) -> list[ImageProblem]:
    """Check (and resize in place) every image of the body; return the problems found."""
    problems = []
    for loc, container, key in list(image_fields(kind, body)):
        value = container[key]
        if not isinstance(value, str):
            continue
        try:
            container[key] = check_image(value, rules)
        except ValueError as exc:
            problems.append(ImageProblem(loc, str(exc)))
    return problems


def check_image(value: str, rules: ImageRules) -> str:
    """The image, checked; re-encoded only when it had to be resized."""
    if value.startswith(("http://", "https://")):
        # Allowed URLs were fetched (through the SSRF guard) before we got here.
        raise ValueError("image URLs are not accepted here: send the image as base64 or a data: "
                         "URI (or set A1111_PROXY_IMAGE_URLS=true)")
    prefix, data = _split_data_uri(value)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not valid base64 (send raw base64 or a data:image/...;base64, URI)") from None
    image = _open(raw, rules)
    if max(image.size) <= rules.max_side:
        return value
    return prefix + base64.b64encode(_resized(image, rules.max_side)).decode("ascii")


def _split_data_uri(value: str) -> tuple[str, str]:
    if value.startswith("data:"):
        head, _, data = value.partition(",")
        return head + ",", data
    return "", value


def _open(raw: bytes, rules: ImageRules) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw), formats=sorted(FORMATS))
    except Image.DecompressionBombError:
        raise ValueError("the image has too many pixels") from None
    except Exception:
        raise ValueError("not an image this server reads (PNG, JPEG or WEBP)") from None
    width, height = image.size
    if width * height > rules.max_pixels:
        raise ValueError(f"the image is {width}x{height}, more than {rules.max_pixels} pixels")
    try:
        image.load()
    except Exception:
        raise ValueError("the image data is damaged or truncated") from None
    return image


def _resized(image: Image.Image, max_side: int) -> bytes:
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    out = io.BytesIO()
    image.resize(size, Image.Resampling.LANCZOS).save(out, format="PNG")
    return out.getvalue()
