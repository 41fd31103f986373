"""Where each kind of model lives in A1111's models layout, and file names that are safe there.

A1111 (and the bundled engine) read `Stable-diffusion/`, `Lora/`, `ControlNet/`, `VAE/` and
`embeddings/` under one models folder (MODELS_DIR). A model downloaded into it is named as its
source names it, made safe: one name (no folder), no control characters, nothing Windows or
A1111 cannot open, at most MAX_NAME_BYTES, never hidden and never `..`. `place` checks that the
resolved path is still inside the kind's folder (symlinks included) before anything is written.
Everything here is pure, or reads the file system only (no writes).
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path, PurePosixPath

KIND_FOLDERS = {
    "checkpoint": "Stable-diffusion",
    "lora": "Lora",
    "controlnet": "ControlNet",
    "vae": "VAE",
    "embedding": "embeddings",
}
KINDS = tuple(KIND_FOLDERS)

# Files that `torch.load` unpickles: loading one can run any code its author put in it.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SAFE_SUFFIXES = (".safetensors", ".sft", ".gguf")
PART_SUFFIX = ".part"  # the file being downloaded, beside where it will be
INFO_SUFFIX = ".civitai.info"  # Civitai's model-version JSON (A1111's Civitai helpers read it)
PREVIEW_SUFFIX = ".preview.png"  # the first image (A1111's extra networks show it)
MAX_NAME_BYTES = 200  # leaves room for ".civitai.info" and ".part" within 255

_UNSAFE = re.compile(r'[\x00-\x1f\x7f<>:"/\\|?*]')


def model_suffix(name: str) -> str:
    """The file type as A1111 sees it: the last suffix, lower case."""
    return PurePosixPath(name).suffix.lower()


def is_pickle(name: str) -> bool:
    return model_suffix(name) in PICKLE_SUFFIXES


def is_model_file(name: str) -> bool:
    return model_suffix(name) in SAFE_SUFFIXES + PICKLE_SUFFIXES


def safe_file_name(name: str) -> str:
    """`name` as one safe file name in a folder; "" when nothing usable is left."""
    base = re.split(r"[/\\]", unicodedata.normalize("NFC", name))[-1]
    base = _UNSAFE.sub("_", base).strip().lstrip(".").rstrip(". ")
    return _shortened(base)


def _shortened(name: str) -> str:
    """At most MAX_NAME_BYTES of UTF-8, keeping the suffix."""
    if len(name.encode()) <= MAX_NAME_BYTES:
        return name
    suffix = model_suffix(name)[:20]
    stem = name[: len(name) - len(suffix)] if suffix else name
    room = MAX_NAME_BYTES - len(suffix.encode())
    return stem.encode()[:room].decode("utf-8", "ignore").rstrip(". ") + suffix


def place(models_dir: Path, kind: str, name: str) -> Path:
    """The path of file `name` (already safe) in the folder of `kind`. Raises ValueError when it
    would not be a plain name directly inside that folder."""
    folder = models_dir / KIND_FOLDERS[kind]
    path = folder / name
    if not name or name in (".", "..") or safe_file_name(name) != name:
        raise ValueError(f"{name!r} is not a plain file name")
    if path.resolve().parent != folder.resolve():
        raise ValueError(f"{name!r} would be written outside {folder}")
    return path


def relative(kind: str, name: str) -> str:
    """Where the file is inside MODELS_DIR, as the API shows it: `Lora/name.safetensors`."""
    return f"{KIND_FOLDERS[kind]}/{name}"


def part_path(path: Path) -> Path:
    return path.with_name(path.name + PART_SUFFIX)


def stem(path: Path) -> str:
    """The name without its model suffix (`x.safetensors` -> `x`), as sidecars are named."""
    return path.name[: -len(path.suffix)] if path.suffix else path.name


def info_path(path: Path) -> Path:
    return path.with_name(stem(path) + INFO_SUFFIX)


def preview_path(path: Path) -> Path:
    return path.with_name(stem(path) + PREVIEW_SUFFIX)
