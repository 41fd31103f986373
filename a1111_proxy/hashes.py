"""Model-file hashes as A1111 and Civitai name them, read from disk in chunks.

- SHA256: the whole file. AutoV2: its first 10 hex digits (A1111's checkpoint short hash).
- AutoV3: for a `.safetensors` file, the SHA256 of the bytes after the 8-byte header length and the
  JSON header (kohya's "addnet" hash), first 12 hex digits (A1111's LoRA short hash).

One pass over the file gives both: the header is hashed into SHA256 only, the rest into both.
Everything here blocks; the worker calls it in a thread. `stop` aborts a long hash between chunks.
"""

from __future__ import annotations

import hashlib
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

CHUNK_BYTES = 1 << 20
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors refuses larger headers too


class HashingStopped(Exception):
    """Hashing was stopped before the file was read to its end."""


@dataclass(frozen=True)
class FileHashes:
    sha256: str
    autov3: str | None = None  # only for .safetensors files

    @property
    def autov2(self) -> str:
        return self.sha256[:10]


def hash_file(
    path: Path, stop: threading.Event | None = None, *, suffix: str | None = None
) -> FileHashes:
    """SHA256 of the file, and AutoV3 when it is a well-formed .safetensors file. `suffix`: its
    type when its name does not end with it (a download's `.part` file)."""
    whole = hashlib.sha256()
    with path.open("rb") as file:
        is_safetensors = (suffix or path.suffix) == ".safetensors"
        data_start = _safetensors_data_start(file) if is_safetensors else None
        if data_start is None:
            _feed(file, [whole], stop)
            return FileHashes(whole.hexdigest())
        whole.update(file.read(data_start))
        after_header = hashlib.sha256()
        _feed(file, [whole, after_header], stop)
    return FileHashes(whole.hexdigest(), after_header.hexdigest()[:12])


def _safetensors_data_start(file: BinaryIO) -> int | None:
    """Offset of the tensor data (8 + header length), or None if this is not safetensors."""
    head = file.read(9)
    size = file.seek(0, 2)
    file.seek(0)
    if len(head) < 9 or head[8:9] != b"{":
        return None
    length = int(struct.unpack("<Q", head[:8])[0])
    if length > min(MAX_HEADER_BYTES, size - 8):
        return None
    return 8 + length


def _feed(file: BinaryIO, hashers: list[hashlib._Hash], stop: threading.Event | None) -> None:
    while chunk := file.read(CHUNK_BYTES):
        if stop is not None and stop.is_set():
            raise HashingStopped()
        for hasher in hashers:
            hasher.update(chunk)
