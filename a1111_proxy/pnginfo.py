"""PNG text chunks and A1111's infotext, read locally (what `/sdapi/v1/png-info` answers)."""

from __future__ import annotations

import base64
import binascii
import re
import struct
import zlib
from typing import Any

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# "Key: value" pairs of an infotext's last line; values may be quoted.
PAIR = re.compile(r'\s*([\w][\w \-/]*):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def decode_image(data: str) -> bytes:
    """Raw base64 or a data: URI, as A1111 accepts them."""
    if data.startswith("data:"):
        data = data.split(",", 1)[-1]
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("the image is not valid base64 (raw or a data: URI)") from exc


# Pillow's own limits for PNG text (PngImagePlugin.MAX_TEXT_CHUNK, MAX_TEXT_MEMORY): a chunk that
# would inflate past 1 MiB is skipped, and no more than 64 MiB of text is read from one image.
# Without them a few hundred kB of zTXt inflate to gigabytes.
MAX_TEXT_CHUNK = 1024 * 1024
MAX_TEXT_MEMORY = 64 * MAX_TEXT_CHUNK


def text_chunks(png: bytes) -> dict[str, str]:
    """tEXt, zTXt and iTXt chunks of a PNG file. Empty for anything that is not a PNG."""
    if not png.startswith(PNG_SIGNATURE):
        return {}
    found: dict[str, str] = {}
    pos, budget = len(PNG_SIGNATURE), MAX_TEXT_MEMORY
    while pos + 8 <= len(png):
        length, kind = struct.unpack(">I4s", png[pos : pos + 8])
        data = png[pos + 8 : pos + 8 + length]
        pos += 12 + length
        try:
            item = _text(kind, data)
        except (ValueError, zlib.error, UnicodeDecodeError):
            continue
        if item is not None:
            budget -= len(item[1])
            if budget < 0:
                break
            found[item[0]] = item[1]
        if kind == b"IEND":
            break
    return found


def _text(kind: bytes, data: bytes) -> tuple[str, str] | None:
    if kind == b"tEXt":
        key, _, value = data.partition(b"\x00")
        return key.decode("latin-1"), value.decode("latin-1")
    if kind == b"zTXt":
        key, _, rest = data.partition(b"\x00")
        return key.decode("latin-1"), _inflate(rest[1:]).decode("latin-1")
    if kind == b"iTXt":
        key, _, rest = data.partition(b"\x00")
        compressed, rest = rest[0], rest[2:]
        _lang, _, rest = rest.partition(b"\x00")
        _translated, _, text = rest.partition(b"\x00")
        return key.decode("latin-1"), (_inflate(text) if compressed else text).decode()
    return None


def _inflate(data: bytes) -> bytes:
    """zlib data, refused (ValueError) past MAX_TEXT_CHUNK without inflating the rest."""
    inflater = zlib.decompressobj()
    text = inflater.decompress(data, MAX_TEXT_CHUNK)
    if inflater.unconsumed_tail:
        raise ValueError(f"a text chunk inflates past {MAX_TEXT_CHUNK} bytes")
    return text


def parse_infotext(text: str) -> dict[str, Any]:
    """A1111's infotext ("prompt\\nNegative prompt: ...\\nSteps: 20, Sampler: ...") as a dict."""
    lines = text.strip().split("\n")
    params: dict[str, Any] = {}
    last = lines[-1] if lines else ""
    pairs = PAIR.findall(last)
    if len(pairs) >= 3:
        lines = lines[:-1]
    else:
        pairs = []
    prompt: list[str] = []
    negative: list[str] = []
    for line in lines:
        if line.startswith("Negative prompt:"):
            negative.append(line[len("Negative prompt:") :].strip())
        elif negative:
            negative.append(line)
        else:
            prompt.append(line)
    params["Prompt"] = "\n".join(prompt)
    params["Negative prompt"] = "\n".join(negative)
    for key, value in pairs:
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1].replace('\\"', '"')
        params[key.strip()] = value
        size = re.fullmatch(r"(\d+)x(\d+)", value)
        if size:
            params[f"{key.strip()}-1"], params[f"{key.strip()}-2"] = size.groups()
    return params
