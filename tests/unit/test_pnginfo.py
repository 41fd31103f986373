"""Reading a PNG's text chunks as A1111's /png-info does, within Pillow's limits."""

from __future__ import annotations

import struct
import zlib

from a1111_proxy.pnginfo import MAX_TEXT_CHUNK, PNG_SIGNATURE, text_chunks


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(*chunks: bytes) -> bytes:
    return PNG_SIGNATURE + b"".join(chunks) + chunk(b"IEND", b"")


def test_plain_and_compressed_text_chunks_are_read() -> None:
    image = png(
        chunk(b"tEXt", b"parameters\x00a cat\nSteps: 20"),
        chunk(b"zTXt", b"note\x00\x00" + zlib.compress(b"zipped")),
        chunk(b"iTXt", b"title\x00\x01\x00en\x00\x00" + zlib.compress("ünïcode".encode())),
    )
    assert text_chunks(image) == {
        "parameters": "a cat\nSteps: 20",
        "note": "zipped",
        "title": "ünïcode",
    }


def test_a_text_chunk_that_would_inflate_past_pillows_limit_is_skipped_and_the_rest_is_read() -> (
    None
):
    bomb = zlib.compress(b"\x00" * (64 * MAX_TEXT_CHUNK), 9)  # ~64 KB that inflate to 64 MiB
    image = png(
        chunk(b"zTXt", b"bomb\x00\x00" + bomb),
        chunk(b"iTXt", b"bomb2\x00\x01\x00\x00\x00" + bomb),
        chunk(b"tEXt", b"parameters\x00a cat"),
    )
    assert len(image) < 200_000
    assert text_chunks(image) == {"parameters": "a cat"}


def test_a_chunk_just_under_the_limit_is_read_whole() -> None:
    text = b"a" * (MAX_TEXT_CHUNK - 1)
    assert (
        text_chunks(png(chunk(b"zTXt", b"k\x00\x00" + zlib.compress(text))))["k"] == text.decode()
    )
