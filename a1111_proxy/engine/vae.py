"""A1111's `sd_vae` option: which VAE decodes (and encodes) a job's images (torch, diffusers).

The VAE files are A1111's list (sd_vae.refresh_vae_list): MODELS_DIR/VAE (subfolders included)
and `*.vae.safetensors` beside the checkpoints, named by file name. Only `.safetensors` files
are listed and loaded (the engine never unpickles files). A file holds a VAE state dict in the
original LDM layout (`encoder.down.0.block.0...`, as A1111 users have them; a diffusers-layout
file works too); it is built into a VAE of the loaded model's own VAE configuration, so nothing
is fetched and no config is guessed.

The values, as A1111 resolves them (sd_vae.resolve_vae, with its default "VAE from settings
overrides the model's preferences"):
- "Automatic" (the default): a listed VAE whose file name starts with the checkpoint's file stem
  ("found near the checkpoint"), else the checkpoint's own VAE;
- "None": the checkpoint's own VAE;
- a file name ("vae-ft-mse-840000-ema-pruned.safetensors"; its stem is accepted too): that VAE.
  A name that is not there falls back to the checkpoint's own VAE, as A1111 falls back, with a
  warning in the log; the infotext then has no `VAE` field, as A1111 writes none.

The chosen VAE replaces the loaded pipeline's `vae` component until a job chooses another; the
checkpoint's own is kept aside and put back for "None".
"""

from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from weakref import WeakKeyDictionary

import torch

from a1111_proxy.engine import folders
from a1111_proxy.engine.catalog import CHECKPOINT_DIR
from a1111_proxy.engine.errors import InvalidParams
from a1111_proxy.engine.infotext import VaeInfo
from a1111_proxy.hashes import hash_file

log = logging.getLogger("a1111_proxy.engine")
VAE_DIR = "VAE"
AUTOMATIC = ("Automatic", "auto")
NONE = "None"
_IGNORED_KEYS = {"model_ema.decay", "model_ema.num_updates"}  # A1111's vae_ignore_keys

FileKey = tuple[str, int, float]


@dataclass(frozen=True)
class VaeFile:
    name: str  # the file name, A1111's `model_name` and the value of `sd_vae`
    path: Path

    @property
    def key(self) -> FileKey:
        stat = self.path.stat()
        return str(self.path), stat.st_size, stat.st_mtime


def scan(models_dir: str | os.PathLike[str]) -> list[VaeFile]:
    """The VAE files A1111 would list, in its (natural) order; a name found twice: the last."""
    root = Path(models_dir)
    found: dict[str, VaeFile] = {}
    for folder, pattern in ((CHECKPOINT_DIR, ".vae.safetensors"), (VAE_DIR, ".safetensors")):
        if not (root / folder).is_dir():
            continue
        for here, _, filenames in folders.walk(root / folder):
            for filename in filenames:
                if filename.lower().endswith(pattern):
                    found[filename] = VaeFile(filename, here / filename)
    return sorted(found.values(), key=lambda f: _natural(f.name))


def _natural(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def entries(models_dir: str | os.PathLike[str]) -> list[dict[str, str]]:
    """/sdapi/v1/sd-vae as A1111 answers it."""
    return [{"model_name": f.name, "filename": str(f.path)} for f in scan(models_dir)]


def resolve(
    models_dir: str | os.PathLike[str], choice: str, checkpoint_path: Path
) -> VaeFile | None:
    """The VAE file `choice` names for this checkpoint; None: the checkpoint's own VAE."""
    if choice == NONE:
        return None
    files = scan(models_dir)
    if choice in AUTOMATIC:
        stem = checkpoint_path.name.rsplit(".", 1)[0]
        return next((f for f in files if f.name.startswith(stem)), None)
    found = next((f for f in files if choice in (f.name, f.name.rsplit(".", 1)[0])), None)
    if found is None:
        log.warning(
            "VAE %r not found in %s (known: %s); using the checkpoint's own VAE, as A1111 does. "
            "Send sd_vae as one of /sdapi/v1/sd-vae's model_name values, 'Automatic' or 'None'",
            choice,
            Path(models_dir) / VAE_DIR,
            ", ".join(f.name for f in files) or "none",
        )
    return found


@dataclass
class _Swapped:
    baked: Any  # the checkpoint's own VAE
    key: FileKey | None = None  # the file of the VAE in use; None: the baked one


_per_pipe: WeakKeyDictionary[Any, _Swapped] = WeakKeyDictionary()
_hashes: dict[FileKey, str] = {}
_lock = threading.Lock()


def apply(
    pipe: Any, models_dir: str | os.PathLike[str], choice: str | None, checkpoint_path: Path
) -> VaeInfo | None:
    """Put the VAE `choice` names (None: "Automatic") into `pipe`. Returns what the infotext
    names (None for the checkpoint's own). Raises InvalidParams for a VAE that does not fit."""
    file = resolve(models_dir, choice or AUTOMATIC[0], checkpoint_path)
    with _lock:
        swapped = _per_pipe.get(pipe)
        if swapped is None:
            swapped = _per_pipe[pipe] = _Swapped(pipe.vae)
    if file is None:
        if swapped.key is not None:
            pipe.vae, swapped.key = swapped.baked, None
        return None
    key = file.key
    if swapped.key != key:
        pipe.vae = load(file, swapped.baked)
        swapped.key = key
    return VaeInfo(file.name, vae_hash(file))


def load(file: VaeFile, like: Any) -> Any:
    """A VAE with `like`'s configuration, device and dtype, holding the file's weights."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from safetensors.torch import load_file

    log.info("loading VAE %s", file.path)
    state = {
        k: v
        for k, v in load_file(str(file.path)).items()
        if not k.startswith("loss") and k not in _IGNORED_KEYS
    }
    if not any(".down_blocks." in k or ".up_blocks." in k for k in state):
        state = convert_ldm_vae_checkpoint(state, like.config)
    vae = AutoencoderKL.from_config(like.config)
    try:
        vae.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise InvalidParams(
            f"VAE {file.name} does not fit this checkpoint's VAE ({str(exc)[:300]}); pick a VAE "
            "made for this model family in sd_vae, or 'Automatic' / 'None'"
        ) from None
    vae.to(device=like.device, dtype=like.dtype)
    if like.device.type == "cuda":
        vae.to(memory_format=torch.channels_last)
    return vae.eval().requires_grad_(False)


def vae_hash(file: VaeFile) -> str:
    """A1111's `VAE hash`: the first 10 hex digits of the file's sha256, computed once."""
    key = file.key
    if key not in _hashes:
        _hashes[key] = hash_file(file.path).sha256[:10]
    return _hashes[key]
