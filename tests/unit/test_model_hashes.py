"""How one model file is hashed: sha256, and A1111's AutoV3 of a safetensors file's data."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from a1111_proxy.hashes import hash_file
from tests.fakes.civitai import safetensors_bytes

LORA_DATA = os.urandom(40_000)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_hash_file_gives_sha256_and_for_safetensors_the_autov3_of_the_data_after_the_header(
    tmp_path: Path,
) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(safetensors_bytes(LORA_DATA, {"ss_output_name": "x"}))
    hashes = hash_file(path)
    assert hashes.sha256 == sha256(path.read_bytes())
    assert hashes.autov2 == hashes.sha256[:10]
    assert hashes.autov3 == sha256(LORA_DATA)[:12]


def test_a_file_that_only_looks_like_safetensors_gets_no_autov3(tmp_path: Path) -> None:
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\xff" * 8 + b"{}")  # header length past the end of the file
    assert hash_file(path).autov3 is None
    assert hash_file(path).sha256 == sha256(path.read_bytes())
