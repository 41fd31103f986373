"""Input images in request bodies: found, checked from their headers, passed on unchanged.

Every image a client sends (img2img `init_images` and `mask`, ControlNet units, extras,
interrogate, ControlNet detect) is read as A1111's `decode_base64_to_image` reads it: base64,
raw or behind a `data:image/...;base64,` prefix, of any file Pillow opens. Its size comes from
its header and must stay within a pixel budget (decompression bombs), and the pixels of all the
images of one request within another (`request_max_pixels`: what the API, and then A1111, would
decode for it); its pixels are not decoded, and the client's string goes on to A1111 unchanged.
Only when the operator opts in (`resize_max_side`) is a larger image decoded and resized down
(LANCZOS, aspect kept), and the caller told so, once the whole request is within its budgets.
http(s) URLs are refused unless allowed. All of it runs on the API's CpuPool, off the event loop.
"""

from __future__ import annotations

import base64
import binascii
import io
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

MAX_PIXELS = 16384 * 16384


REQUEST_MAX_PIXELS = 4 * 4096 * 4096


@dataclass(frozen=True)
class ImageRules:
    max_pixels: int = MAX_PIXELS  # one image
    resize_max_side: int = 0  # 0: never resize
    allow_urls: bool = False
    request_max_pixels: int = REQUEST_MAX_PIXELS  # all the images of one request together


class ImageProblem(ValueError):
    """What is wrong with one image, and where."""

    def __init__(self, loc: list[str | int], message: str) -> None:
        super().__init__(message)
        self.loc = loc
        self.message = message


@dataclass(frozen=True)
class Resized:
    """An input image the opt-in resize changed: where, and from what size to what size."""

    loc: list[str | int]
    before: tuple[int, int]
    after: tuple[int, int]

    def as_dict(self) -> dict[str, Any]:
        return {"loc": self.loc, "from": list(self.before), "to": list(self.after)}


@dataclass
class Checked:
    problems: list[ImageProblem] = field(default_factory=list)
    resized: list[Resized] = field(default_factory=list)


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
        noise_mask = body.get("noise_mask")  # our extension (engine/noise_mask.py)
        if isinstance(noise_mask, dict) and isinstance(noise_mask.get("mask"), str):
            yield ["noise_mask", "mask"], noise_mask, "mask"
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
                yield from _unit_images([*base, key], unit, key)
                for n, _ in enumerate(_list(unit.get(key))):  # several (IP-Adapter's images)
                    yield from _unit_images([*base, key, n], unit[key], n)


def _unit_images(
    loc: list[str | int], container: Any, key: Any
) -> Iterator[tuple[list[str | int], Any, Any]]:
    value = container[key] if isinstance(container, list) else container.get(key)
    if isinstance(value, str) and value:
        yield loc, container, key
    elif isinstance(value, dict):
        for sub in ("image", "mask"):
            if isinstance(value.get(sub), str) and value[sub]:
                yield [*loc, sub], value, sub


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


def check_images(kind: str, body: dict[str, Any], rules: ImageRules) -> Checked:
    """Check every image of the body from its header, each and all together; then, when the
    rules ask for it and nothing was refused, resize the large ones in place."""
    checked = Checked()
    opened: list[tuple[list[str | int], Any, Any, Image.Image]] = []
    total = 0
    for loc, container, key in list(image_fields(kind, body)):
        value = container[key]
        if not isinstance(value, str):
            continue
        try:
            image = check_image(value, rules)
            total += image.width * image.height
            within_budget(loc, image.size, total, rules.request_max_pixels)
        except ValueError as exc:
            checked.problems.append(ImageProblem(loc, str(exc)))
            if total > rules.request_max_pixels:
                break  # the rest need not be decoded: the request is refused already
            continue
        opened.append((loc, container, key, image))
    if not checked.problems and rules.resize_max_side:
        for loc, container, key, image in opened:
            try:
                checked.resized += _resize_in_place(container, key, loc, image, rules)
            except ValueError as exc:
                checked.problems.append(ImageProblem(loc, str(exc)))
    return checked


def within_budget(loc: list[str | int], size: tuple[int, int], total: int, budget: int) -> None:
    """Refuse (ValueError) the image that takes the request's images past `budget` pixels."""
    if total > budget:
        raise ValueError(
            f"with {field_path(loc)} ({size[0]}x{size[1]}) this request's images come to "
            f"{total} pixels, more than the {budget} one request may carry; send fewer or "
            "smaller images, or split them over several requests (or raise "
            "A1111_PROXY_REQUEST_MAX_PIXELS)"
        )


def field_path(loc: list[str | int]) -> str:
    """["init_images", 3] -> "init_images[3]"; ["alwayson_scripts", "controlnet", "args", 0,
    "image"] -> "alwayson_scripts.controlnet.args[0].image"."""
    parts = [f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc]
    return "".join(parts).removeprefix(".")


def check_image(value: str, rules: ImageRules) -> Image.Image:
    """The image, opened lazily (its header read, its pixels not decoded), if within the one
    image's budget; ValueError saying why not otherwise."""
    if value.startswith(("http://", "https://")):
        # Allowed URLs were fetched (through the SSRF guard) before we got here.
        raise ValueError(
            "image URLs are not accepted here: send the image as base64 or a data: "
            "URI (or set A1111_PROXY_IMAGE_URLS=true)"
        )
    image = open_lazily(decode_base64(value))
    width, height = image.size
    if width * height > rules.max_pixels:
        raise ValueError(
            f"the image is {width}x{height}, more than {rules.max_pixels} pixels; send a smaller "
            "image (or raise A1111_PROXY_IMAGE_MAX_PIXELS)"
        )
    return image


def _resize_in_place(
    container: Any, key: Any, loc: list[str | int], image: Image.Image, rules: ImageRules
) -> list[Resized]:
    """Resize the image at `container[key]` when its longer side is over the rules' side."""
    if max(image.size) <= rules.resize_max_side:
        return []
    png, size = _resized(image, rules.resize_max_side)
    prefix = "data:image/png;base64," if container[key].startswith("data:") else ""
    container[key] = prefix + base64.b64encode(png).decode("ascii")
    return [Resized(loc, image.size, size)]


def decode_base64(value: str) -> bytes:
    """The bytes of a base64 image, as A1111's decode_base64_to_image finds them: after a
    `data:image/<type>;base64,` prefix when there is one, ignoring characters outside the
    base64 alphabet (line breaks)."""
    data = value
    if value.startswith("data:"):
        parts = value.split(";")
        if not value.startswith("data:image/") or len(parts) < 2 or "," not in parts[1]:
            raise ValueError(
                "a data: URI must be data:image/<type>;base64,<data> (as A1111 "
                "reads them), or send raw base64"
            )
        data = parts[1].split(",")[1]
    try:
        return base64.b64decode(data)
    except (binascii.Error, ValueError):
        raise ValueError(
            "not valid base64 (send raw base64 or a data:image/...;base64, URI)"
        ) from None


def open_lazily(raw: bytes) -> Image.Image:
    """The image in `raw`, opened as `Image.open` does (format from the first bytes, size from
    the header, pixels not decoded until `load()`), but without Pillow's process-wide
    decompression-bomb limit: callers check the size against their own."""
    Image.preinit()
    Image.init()
    prefix = raw[:16]
    for name in Image.ID:
        factory, accept = Image.OPEN[name]
        try:
            accepted = not accept or accept(prefix)
            if accepted and not isinstance(accepted, str):  # a str: Pillow's warning, no match
                return factory(io.BytesIO(raw), "")
        except (SyntaxError, IndexError, TypeError, struct.error):  # as Image.open: not this one
            continue
        except Exception as exc:
            raise ValueError(f"the {name} image's header is damaged ({exc})") from None
    raise ValueError(
        "not an image (Pillow, which A1111 decodes with, cannot identify it): "
        "send a PNG, JPEG, WebP or another format A1111 opens"
    )


def _resized(image: Image.Image, max_side: int) -> tuple[bytes, tuple[int, int]]:
    try:
        image.load()
    except Exception:
        raise ValueError("the image data is damaged or truncated") from None
    if image.mode not in ("L", "LA", "RGB", "RGBA"):
        image = image.convert("RGBA" if image.has_transparency_data else "RGB")
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    out = io.BytesIO()
    # The EXIF orientation goes along, so the image is still shown (and used) the same way up.
    image.resize(size, Image.Resampling.LANCZOS).save(out, format="PNG", exif=image.getexif())
    return out.getvalue(), size
