"""Thumbnails of result images, for lists and the web UI: `GET .../images/{n}?size=256`.

A thumbnail is the stored image scaled down (never up) so that its longer side is one of a few
allowed sizes, as WebP (JPEG where Pillow has no WebP). Making one decodes the image, so it
runs on the API's CpuPool, never on the event loop; the result is kept in a per-process LRU
cache bounded by bytes (`THUMBNAIL_CACHE_BYTES`). A job's stored images never change, so a
cached thumbnail is never stale: the cache is keyed by the job's id, image number and size.
"""

from __future__ import annotations

import io
from collections import OrderedDict
from dataclasses import dataclass

from PIL import Image, features

SIZES = (64, 128, 256, 512)
WEBP = features.check("webp")
MEDIA_TYPE = "image/webp" if WEBP else "image/jpeg"
QUALITY = 80
# The most pixels an image may have to be thumbnailed (8192 x 8192, 200 MB decoded as RGB, on
# each of the CpuPool's threads at worst); a larger result is refused, GET it whole instead.
MAX_PIXELS = 8192 * 8192


@dataclass(frozen=True)
class Thumbnail:
    data: bytes
    media_type: str = MEDIA_TYPE


def make_thumbnail(data: bytes, size: int) -> Thumbnail:
    """The image in `data`, its longer side at most `size`, aspect kept (a smaller image keeps
    its size). Raises ValueError for what Pillow cannot read or what is too large to decode."""
    try:
        picture = _scaled(data, size)
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:  # not a readable image
        raise ValueError(f"{type(exc).__name__}: {exc}") from None
    out = io.BytesIO()
    if WEBP:
        picture.save(out, format="WEBP", quality=QUALITY, method=4)
    else:
        picture.convert("RGB").save(out, format="JPEG", quality=QUALITY, optimize=True)
    return Thumbnail(out.getvalue())


def _scaled(data: bytes, size: int) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        if image.width * image.height > MAX_PIXELS:
            raise ValueError(f"the image is {image.width}x{image.height}, too large to scale")
        image.draft("RGB", (size, size))  # JPEG: decode at a reduced scale, cheaply
        picture = _flattened(image)
    picture.thumbnail((size, size), Image.Resampling.LANCZOS)
    return picture


def _flattened(image: Image.Image) -> Image.Image:
    """RGB, or RGBA when the image has transparency (WebP keeps it; JPEG drops it)."""
    image.seek(0)  # an animated image: its first frame
    has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
    return image.convert("RGBA" if has_alpha and WEBP else "RGB")


Key = tuple[str, int, int]  # job id, image number, size


class ThumbnailCache:
    """Least recently used thumbnails, at most `max_bytes` of image data in all (0: none kept).
    Used from the event loop only, so it needs no lock."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self._items: OrderedDict[Key, Thumbnail] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Key) -> Thumbnail | None:
        found = self._items.get(key)
        if found is not None:
            self._items.move_to_end(key)
        return found

    def put(self, key: Key, thumbnail: Thumbnail) -> None:
        if len(thumbnail.data) > self.max_bytes:
            return
        old = self._items.pop(key, None)
        if old is not None:
            self.size -= len(old.data)
        self._items[key] = thumbnail
        self.size += len(thumbnail.data)
        while self.size > self.max_bytes:
            _, dropped = self._items.popitem(last=False)
            self.size -= len(dropped.data)
