"""ControlNet preprocessors that need no weights (numpy, scipy, Pillow; no torch, no OpenCV).

Each takes an RGB uint8 array (H, W, 3) and the unit's sliders and returns an RGB uint8 array of
the same size: the "detected map" the ControlNet sees. Written from the published descriptions of
the algorithms (Canny 1986; XDoG, Winnemöller 2012) and the extension's documented behaviour,
not from its (GPL) code. scipy is already an engine dependency (the LMS sampler), so canny costs
no new package; OpenCV would be ~60 MB for one function.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image
from scipy import ndimage

Array = np.ndarray


def none(image: Array, a: float, b: float) -> Array:
    return image


def invert(image: Array, a: float, b: float) -> Array:
    """Black lines on white paper -> white lines on black, as scribble/lineart models expect."""
    return 255 - image


def canny(image: Array, low: float, high: float) -> Array:
    """Canny edges: Sobel gradients (L1 magnitude, the strongest colour channel per pixel),
    non-maximum suppression across the edge, hysteresis between `low` and `high`. White edges."""
    magnitude, gx, gy = _gradients(image.astype(np.float32))
    thin = _suppress_non_maxima(magnitude, gx, gy)
    strong = thin > high
    weak = thin > low
    labels, count = ndimage.label(weak, structure=np.ones((3, 3), dtype=bool))
    keep = np.zeros(count + 1, dtype=bool)
    keep[np.unique(labels[strong])] = True
    keep[0] = False
    edges = keep[labels]
    return _rgb(np.where(edges, 255, 0).astype(np.uint8))


def _gradients(image: Array) -> tuple[Array, Array, Array]:
    gx = np.stack([ndimage.sobel(image[..., c], axis=1, mode="nearest") for c in range(3)], -1)
    gy = np.stack([ndimage.sobel(image[..., c], axis=0, mode="nearest") for c in range(3)], -1)
    per_channel = np.abs(gx) + np.abs(gy)
    best = per_channel.argmax(axis=-1)[..., None]

    def pick(a: Array) -> Array:
        return np.take_along_axis(a, best, axis=-1)[..., 0]

    return pick(per_channel), pick(gx), pick(gy)


def _suppress_non_maxima(magnitude: Array, gx: Array, gy: Array) -> Array:
    """Keep a pixel only where it is the largest of its two neighbours along the gradient."""
    angle = (np.rad2deg(np.arctan2(gy, gx)) + 180.0) % 180.0
    sector = np.digitize(angle, [22.5, 67.5, 112.5, 157.5]) % 4  # 0: E-W, 1: 45, 2: N-S, 3: 135
    padded = np.pad(magnitude, 1)
    h, w = magnitude.shape
    offsets = {
        0: ((0, 1), (0, -1)),
        1: ((1, 1), (-1, -1)),
        2: ((1, 0), (-1, 0)),
        3: ((1, -1), (-1, 1)),
    }
    keep = np.zeros_like(magnitude, dtype=bool)
    for s, ((dy1, dx1), (dy2, dx2)) in offsets.items():
        first = padded[1 + dy1 : 1 + dy1 + h, 1 + dx1 : 1 + dx1 + w]
        second = padded[1 + dy2 : 1 + dy2 + h, 1 + dx2 : 1 + dx2 + w]
        keep |= (sector == s) & (magnitude > first) & (magnitude >= second)
    return np.where(keep, magnitude, 0.0)


def scribble_xdog(image: Array, threshold: float, b: float) -> Array:
    """Scribble lines from a photo by a difference of Gaussians, thresholded: white on black."""
    x = image.astype(np.float32)
    fine = ndimage.gaussian_filter(x, sigma=(0.5, 0.5, 0))
    coarse = ndimage.gaussian_filter(x, sigma=(5.0, 5.0, 0))
    dog = np.clip(coarse - fine, 0, 255).max(axis=-1)  # darker than surroundings: a line
    return _rgb(np.where(2 * dog > threshold, 255, 0).astype(np.uint8))


def threshold(image: Array, level: float, b: float) -> Array:
    """Binarise: pixels brighter than `level` white, the rest black."""
    gray = image.astype(np.float32).mean(axis=-1)
    return _rgb(np.where(gray > level, 255, 0).astype(np.uint8))


def lineart_standard(image: Array, a: float, b: float) -> Array:
    """Dark lines on a light background -> white lines on black, graded by how much darker
    than a wide blur of the surroundings each pixel is."""
    x = image.astype(np.float32)
    blurred = ndimage.gaussian_filter(x, sigma=(6.0, 6.0, 0))
    darker = np.clip(blurred - x, 0, 255).min(axis=-1)
    strong = darker[darker > 8]
    scale = max(16.0, float(np.median(strong))) if strong.size else 16.0
    return _rgb(np.clip(darker / scale * 127, 0, 255).astype(np.uint8))


def blur_gaussian(image: Array, sigma: float, b: float) -> Array:
    blurred: Array = ndimage.gaussian_filter(image.astype(np.float32), sigma=(sigma, sigma, 0))
    clipped: Array = np.clip(blurred, 0, 255)
    return clipped.astype(np.uint8)


def tile_resample(image: Array, rate: float, b: float) -> Array:
    """Down-sample by `rate` (the tile model then adds the detail back)."""
    if rate <= 1.0:
        return image
    h, w = image.shape[:2]
    small = Image.fromarray(image).resize(
        (max(int(w / rate), 1), max(int(h / rate), 1)), Image.Resampling.LANCZOS
    )
    return np.asarray(small)


def _rgb(gray: Array) -> Array:
    return np.repeat(gray[..., None], 3, axis=-1)


PREPROCESSORS: dict[str, Callable[[Array, float, float], Array]] = {
    "none": none,
    "canny": canny,
    "invert": invert,
    "scribble_xdog": scribble_xdog,
    "threshold": threshold,
    "lineart_standard": lineart_standard,
    "blur_gaussian": blur_gaussian,
    "tile_resample": tile_resample,
}


def detect(
    image: Image.Image, module: str, *, resolution: int | None, a: float, b: float
) -> Image.Image:
    """Run a preprocessor at `resolution` (the short side; None: the image's own size)."""
    rgb = image.convert("RGB")
    if resolution is not None and min(rgb.size) != resolution:
        scale = resolution / min(rgb.size)
        size = (max(round(rgb.width * scale), 1), max(round(rgb.height * scale), 1))
        resample = Image.Resampling.LANCZOS if scale > 1 else Image.Resampling.BOX
        rgb = rgb.resize(size, resample)
    return Image.fromarray(PREPROCESSORS[module](np.asarray(rgb), a, b))


def fit(detected: Image.Image, mode: int, width: int, height: int) -> Image.Image:
    """The map at the generation's size by the unit's resize mode (0 just resize, 1 crop and
    resize, 2 resize and fill with the border's median colour). Black-and-white maps stay so."""
    if detected.size == (width, height):
        return detected
    binary = _is_binary(detected)
    if mode == 1:
        scale = max(width / detected.width, height / detected.height)
    elif mode == 2:
        scale = min(width / detected.width, height / detected.height)
    else:
        scale = 0.0
    if scale:
        size = (max(round(detected.width * scale), 1), max(round(detected.height * scale), 1))
    else:
        size = (width, height)
    resized = detected.resize(size, Image.Resampling.LANCZOS)
    if binary:
        resized = resized.point(lambda v: 255 if v > 127 else 0)
    if mode == 2:
        canvas = Image.new("RGB", (width, height), _border_colour(resized))
        canvas.paste(resized, ((width - size[0]) // 2, (height - size[1]) // 2))
        return canvas
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    return resized.crop((left, top, left + width, top + height))


def pixel_perfect_resolution(image: Image.Image, mode: int, width: int, height: int) -> int:
    """The preprocessor resolution that makes the map exactly the generation's size."""
    k = (min if mode == 2 else max)(height / image.height, width / image.width)
    return round(k * min(image.width, image.height))


def _is_binary(image: Image.Image) -> bool:
    colours = image.convert("L").getcolors(3)
    return colours is not None and {c for _, c in colours} <= {0, 255}


def _border_colour(image: Image.Image) -> tuple[int, ...]:
    pixels = np.asarray(image.convert("RGB"))
    edges = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    return tuple(int(v) for v in np.median(edges, axis=0))
