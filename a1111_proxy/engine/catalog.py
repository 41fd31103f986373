"""The checkpoints in MODELS_DIR/Stable-diffusion, in A1111's layout, and what each one is.

No torch: the architecture is read from the safetensors header (tensor names and shapes), and
`.ckpt` files are listed but never opened (they are pickles; loading one can run code).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from a1111_proxy.engine import folders
from a1111_proxy.engine.errors import InvalidParams

CHECKPOINT_DIR = "Stable-diffusion"
SINGLE_FILE = (".safetensors",)
PICKLED = (".ckpt", ".pt", ".pth", ".bin")
ARCHITECTURES = ("sd15", "sd15_inpaint", "sdxl", "sdxl_inpaint")

_UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
_KEYS = {
    "sdxl": "conditioner.embedders.1.model.positional_embedding",
    "sdxl_refiner": "conditioner.embedders.0.model.text_projection",
    "sd2": "cond_stage_model.model.token_embedding.weight",
    "sd1": "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
    "sd1_flat": "cond_stage_model.transformer.embeddings.position_embedding.weight",
}


@dataclass(frozen=True)
class Checkpoint:
    name: str  # path under Stable-diffusion/, with "/" (A1111's "name")
    path: Path
    folder: bool  # a diffusers folder rather than a single file

    @property
    def model_name(self) -> str:
        """A1111's model_name: the name without extension, "/" replaced by "_"."""
        stem = self.name if self.folder else self.name.rsplit(".", 1)[0]
        return stem.replace("/", "_").replace("\\", "_")

    @property
    def stem(self) -> str:
        """What A1111 writes as "Model" in the infotext: the file name without extension."""
        return Path(self.name).name if self.folder else Path(self.name).stem

    @property
    def pickled(self) -> bool:
        return not self.folder and self.path.suffix.lower() in PICKLED


class Catalog:
    """The checkpoints under one MODELS_DIR; rescanned when a name is not found."""

    def __init__(self, models_dir: str | os.PathLike[str]) -> None:
        self.root = Path(models_dir) / CHECKPOINT_DIR
        self._hashes: dict[tuple[str, int, float], str] = {}
        self.checkpoints = self.scan()

    def scan(self) -> list[Checkpoint]:
        found: list[Checkpoint] = []
        if not self.root.is_dir():
            return found
        for here, dirnames, filenames in folders.walk(self.root):
            if (here / "model_index.json").is_file() and here != self.root:
                found.append(Checkpoint(here.relative_to(self.root).as_posix(), here, True))
                dirnames.clear()
                continue
            for filename in sorted(filenames):
                if filename.lower().endswith(SINGLE_FILE + PICKLED):
                    path = here / filename
                    found.append(Checkpoint(path.relative_to(self.root).as_posix(), path, False))
        return sorted(found, key=lambda c: c.name.lower())

    def find(self, wanted: str | None) -> Checkpoint:
        """A checkpoint by any of A1111's aliases: title "name [hash]", name, model_name, file
        stem, short hash or sha256. None: the first one. Raises InvalidParams."""
        for attempt in range(2):
            if attempt:
                self.checkpoints = self.scan()
            if not self.checkpoints:
                continue
            if not wanted:
                return self.checkpoints[0]
            found = self._match(wanted.strip())
            if found is not None:
                return found
        if not self.checkpoints:
            raise InvalidParams(
                f"no checkpoints in {self.root}: put .safetensors files (or diffusers folders) "
                "there"
            )
        raise InvalidParams(
            f"no checkpoint named {wanted!r} in {self.root}; available: "
            + ", ".join(c.name for c in self.checkpoints)
        )

    def _match(self, wanted: str) -> Checkpoint | None:
        bare = wanted.split(" [", 1)[0] if wanted.endswith("]") else wanted
        for checkpoint in self.checkpoints:
            aliases = {checkpoint.name, checkpoint.model_name, checkpoint.stem}
            if bare in aliases:
                return checkpoint
        for checkpoint in self.checkpoints:
            known = self.known_hash(checkpoint)
            if known and (wanted == known or (len(wanted) >= 8 and known.startswith(wanted))):
                return checkpoint
        return None

    def known_hash(self, checkpoint: Checkpoint) -> str | None:
        if checkpoint.folder:
            return None
        return self._hashes.get(_file_key(checkpoint.path))

    def sha256(self, checkpoint: Checkpoint) -> str | None:
        """The file's sha256 (A1111's "Model hash" is its first 10), computed once per file."""
        if checkpoint.folder:
            return None
        key = _file_key(checkpoint.path)
        if key not in self._hashes:
            digest = hashlib.sha256()
            with open(checkpoint.path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            self._hashes[key] = digest.hexdigest()
        return self._hashes[key]


def _file_key(path: Path) -> tuple[str, int, float]:
    stat = path.stat()
    return str(path), stat.st_size, stat.st_mtime


def read_header(path: Path) -> dict[str, Any]:
    """The JSON header of a .safetensors file: tensor name -> {dtype, shape, data_offsets}."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise InvalidParams(f"{path.name} is not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", raw)
        if length > 100 * 1024 * 1024:
            raise InvalidParams(f"{path.name} is not a safetensors file (header too large)")
        try:
            header: dict[str, Any] = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise InvalidParams(f"{path.name} is not a safetensors file (bad header)") from None
    header.pop("__metadata__", None)
    return header


def architecture(checkpoint: Checkpoint) -> str:
    """One of ARCHITECTURES, from the weights themselves. Raises InvalidParams otherwise."""
    if checkpoint.pickled:
        raise InvalidParams(
            f"{checkpoint.name} is a pickled checkpoint ({checkpoint.path.suffix}); the diffusers "
            "engine never unpickles files, since loading one can run arbitrary code. Convert it "
            "to .safetensors (or download the .safetensors version) and put that in "
            f"{CHECKPOINT_DIR}/"
        )
    if checkpoint.folder:
        return _folder_architecture(checkpoint.path)
    header = read_header(checkpoint.path)
    in_channels = header.get(_UNET_IN, {}).get("shape", [0, 4])[1]
    inpaint = "_inpaint" if in_channels == 9 else ""
    if _KEYS["sdxl"] in header:
        return "sdxl" + inpaint
    if _KEYS["sdxl_refiner"] in header:
        raise InvalidParams(f"{checkpoint.name} is an SDXL refiner; it cannot run on its own")
    if _KEYS["sd2"] in header:
        raise InvalidParams(
            f"{checkpoint.name} is a Stable Diffusion 2.x checkpoint, which the "
            "diffusers engine does not support yet (SD 1.x and SDXL only)"
        )
    if _KEYS["sd1"] in header or _KEYS["sd1_flat"] in header:
        return "sd15" + inpaint
    raise InvalidParams(
        f"{checkpoint.name} is not a Stable Diffusion 1.x or SDXL checkpoint the diffusers engine "
        "knows (no SD1/SDXL text encoder weights in it)"
    )


def _folder_architecture(path: Path) -> str:
    index = json.loads((path / "model_index.json").read_text())
    kind = "sdxl" if "text_encoder_2" in index else "sd15"
    unet = path / "unet" / "config.json"
    in_channels = json.loads(unet.read_text()).get("in_channels", 4) if unet.is_file() else 4
    return kind + ("_inpaint" if in_channels == 9 else "")
