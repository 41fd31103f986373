"""Images in and out, as A1111 takes and gives them (Pillow only, no torch).

In: base64 or `data:` URIs; resized to the job's size by A1111's resize modes; masks blurred.
Out: PNG bytes with the infotext in a `parameters` text chunk (tEXt, or iTXt when the text is
not Latin-1), as A1111 writes them.
"""

from __future__ import annotations

import io

from PIL import Image, ImageFilter, ImageOps, PngImagePlugin

from a1111_proxy.engine.errors import InvalidParams
from a1111_proxy.images import decode_base64, open_lazily

JUST_RESIZE, CROP_AND_RESIZE, RESIZE_AND_FILL, LATENT_RESIZE = 0, 1, 2, 3


def decode(data: str, what: str = "image") -> Image.Image:
    """A base64 string or data: URI -> a Pillow image, in any format Pillow opens (a GIF's first
    frame), as A1111 decodes it. The API checked its pixel count at submission, so Pillow's own
    (lower) decompression-bomb limit is not applied again. Raises InvalidParams."""
    try:
        image = open_lazily(decode_base64(data))
        image.load()
    except (ValueError, OSError) as exc:
        raise InvalidParams(f"{what} is not a base64-encoded image ({exc})") from None
    return ImageOps.exif_transpose(image)


def encode_png(image: Image.Image, infotext: str | None) -> bytes:
    info = PngImagePlugin.PngInfo()
    if infotext:
        info.add_text("parameters", infotext)  # falls back to iTXt for non-Latin-1 text
    out = io.BytesIO()
    image.save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def resize(image: Image.Image, mode: int, width: int, height: int) -> Image.Image:
    """A1111's resize modes: 0 just resize, 1 crop and resize, 2 resize and fill, 3 as 0
    (plain img2img resizes its latents instead: upscale.encoded_to_size)."""
    if mode == CROP_AND_RESIZE:
        return ImageOps.fit(image, (width, height), Image.Resampling.LANCZOS)
    if mode == RESIZE_AND_FILL:
        return _resize_and_fill(image, width, height)
    return image.resize((width, height), Image.Resampling.LANCZOS)


def _resize_and_fill(image: Image.Image, width: int, height: int) -> Image.Image:
    """Fit inside, then fill the bands by stretching the image's edge rows or columns."""
    ratio = width / height
    src_ratio = image.width / image.height
    w = width if ratio < src_ratio else image.width * height // image.height
    h = height if ratio >= src_ratio else image.height * width // image.width
    fitted = image.resize((w, h), Image.Resampling.LANCZOS)
    out = Image.new(image.mode, (width, height))
    x, y = (width - w) // 2, (height - h) // 2
    out.paste(fitted, (x, y))
    if ratio < src_ratio and y > 0:
        out.paste(fitted.crop((0, 0, w, 1)).resize((width, y)), (0, 0))
        out.paste(fitted.crop((0, h - 1, w, h)).resize((width, height - y - h)), (0, y + h))
    elif ratio > src_ratio and x > 0:
        out.paste(fitted.crop((0, 0, 1, h)).resize((x, height)), (0, 0))
        out.paste(fitted.crop((w - 1, 0, w, h)).resize((width - x - w, height)), (x + w, 0))
    return out


def prepare_mask(mask: Image.Image, *, invert: bool, blur_x: int, blur_y: int) -> Image.Image:
    """White = repaint. Inverted and blurred as A1111 does."""
    gray = mask.convert("RGBA").split()[-1] if _alpha_only(mask) else mask.convert("L")
    if invert:
        gray = ImageOps.invert(gray)
    if blur_x > 0 or blur_y > 0:
        gray = gray.filter(ImageFilter.GaussianBlur((max(blur_x, 0), max(blur_y, 0))))
    return gray


def _alpha_only(mask: Image.Image) -> bool:
    # A transparent PNG whose colour is all black: its alpha channel is the mask.
    return mask.mode in ("RGBA", "LA") and mask.convert("L").getextrema() == (0, 0)


def mask_box(mask: Image.Image, padding: int) -> tuple[int, int, int, int] | None:
    """The masked region grown by `padding`, clamped to the image (A1111's "Only masked")."""
    box = mask.point(lambda v: 255 if v > 0 else 0).getbbox()
    if box is None:
        return None
    left, top, right, bottom = box
    return (
        max(left - padding, 0),
        max(top - padding, 0),
        min(right + padding, mask.width),
        min(bottom + padding, mask.height),
    )


def expand_to_ratio(
    box: tuple[int, int, int, int], width: int, height: int, limit: tuple[int, int]
) -> tuple[int, int, int, int]:
    """Grow `box` to the aspect ratio width:height so the crop is not distorted when scaled."""
    left, top, right, bottom = box
    bw, bh = right - left, bottom - top
    want = width / height
    if bw / bh < want:
        grow = int(bh * want) - bw
        left, right = left - grow // 2, right + grow - grow // 2
    else:
        grow = int(bw / want) - bh
        top, bottom = top - grow // 2, bottom + grow - grow // 2
    max_w, max_h = limit
    if left < 0:
        right, left = right - left, 0
    if right > max_w:
        left, right = max(left - (right - max_w), 0), max_w
    if top < 0:
        bottom, top = bottom - top, 0
    if bottom > max_h:
        top, bottom = max(top - (bottom - max_h), 0), max_h
    return left, top, right, bottom


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's "fill": paint the masked area with heavily blurred surrounding colours."""
    base = image.convert("RGB")
    keep = ImageOps.invert(mask.point(lambda v: 255 if v > 127 else 0))
    filled = base.copy()
    for radius in (256, 64, 16, 4, 1):
        blurred = filled.filter(ImageFilter.GaussianBlur(radius))
        filled = Image.composite(base, blurred, keep)
    return filled


def doubled(mask: Image.Image) -> Image.Image:
    """A1111's mask_for_overlay for a whole-picture inpaint: the blurred, resized mask with its
    values doubled (clipped at 255), so the generated image covers the inner half of the blur."""
    return mask.convert("L").point(lambda v: min(v * 2, 255))


def overlay(generated: Image.Image, original: Image.Image, mask: Image.Image) -> Image.Image:
    """Keep the original outside the (blurred) mask, as A1111's inpainting result does."""
    return Image.composite(generated.convert("RGB"), original.convert("RGB"), mask)
