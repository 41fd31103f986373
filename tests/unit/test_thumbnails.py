"""Thumbnails (a1111_proxy/thumbnails.py): scaled down, never up, in WebP; the cache keeps the
most recently used within its bytes."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from a1111_proxy.thumbnails import MAX_PIXELS, Thumbnail, ThumbnailCache, make_thumbnail


def encoded(image: Image.Image, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def opened(thumbnail: Thumbnail) -> Image.Image:
    return Image.open(io.BytesIO(thumbnail.data))


@pytest.mark.parametrize(
    ("size", "longest", "expected"),
    [((2048, 1024), 256, (256, 128)), ((300, 900), 128, (43, 128)), ((40, 30), 512, (40, 30))],
)
def test_the_longer_side_becomes_the_size_and_a_smaller_image_keeps_its_own(
    size: tuple[int, int], longest: int, expected: tuple[int, int]
) -> None:
    made = make_thumbnail(encoded(Image.new("RGB", size, "teal"), "PNG"), longest)
    assert made.media_type == "image/webp"
    assert opened(made).format == "WEBP" and opened(made).size == expected


def test_jpeg_palette_and_animated_images_are_scaled_from_their_first_frame() -> None:
    jpeg = encoded(Image.new("RGB", (1600, 1200), "orange"), "JPEG")
    assert opened(make_thumbnail(jpeg, 64)).size == (64, 48)
    frames = [Image.new("P", (200, 100), color) for color in (1, 2)]
    gif = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert opened(make_thumbnail(gif, 128)).size == (128, 64)


def test_what_is_not_an_image_or_too_large_to_decode_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="UnidentifiedImageError"):
        make_thumbnail(b"not an image", 64)
    side = int(MAX_PIXELS**0.5) + 1
    header_only = encoded(Image.new("1", (side, side)), "PNG")  # small, 67 million pixels
    with pytest.raises(ValueError, match="too large"):
        make_thumbnail(header_only, 64)


def test_the_cache_drops_the_least_recently_used_beyond_its_bytes() -> None:
    cache = ThumbnailCache(max_bytes=30)
    for n in range(3):
        cache.put(("job", n, 64), Thumbnail(b"x" * 10))
    assert cache.get(("job", 0, 64)) is not None  # now the most recently used
    cache.put(("job", 3, 64), Thumbnail(b"y" * 10))
    assert cache.get(("job", 1, 64)) is None
    assert [cache.get(("job", n, 64)) is not None for n in (0, 2, 3)] == [True] * 3
    assert cache.size == 30 and len(cache) == 3


def test_the_cache_keeps_nothing_larger_than_itself_and_replaces_a_key_in_place() -> None:
    cache = ThumbnailCache(max_bytes=10)
    cache.put(("job", 0, 64), Thumbnail(b"x" * 11))
    assert len(cache) == 0 and cache.size == 0
    cache.put(("job", 0, 64), Thumbnail(b"x" * 4))
    cache.put(("job", 0, 64), Thumbnail(b"x" * 6))
    assert len(cache) == 1 and cache.size == 6
