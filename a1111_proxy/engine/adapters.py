"""LoRA on a loaded model (torch, diffusers + peft): adapters cached by file, activated per job.

The adapter set is state of the shared UNet and text encoders, so every job sets it: the job's
LoRAs with their weights, or none at all (a job without LoRAs must not inherit the last one's).
Adapters stay loaded, least recently used dropped first, so a LoRA used again costs only
`set_adapters`. Our own prompt encoding (`text.py`) calls the same text encoder modules, so the
text-encoder weight applies to it.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Any
from weakref import WeakKeyDictionary

from a1111_proxy.engine.lora import LoraCatalog, LoraFile, LoraUse, metadata
from a1111_proxy.engine.params import InvalidParams
from a1111_proxy.hashes import hash_file

log = logging.getLogger("a1111_proxy.engine")
MAX_ADAPTERS = 8  # adapters kept loaded per model; each costs its LoRA's size in memory

_per_pipe: WeakKeyDictionary[Any, Adapters] = WeakKeyDictionary()
_catalogs: dict[str, LoraCatalog] = {}
_hashes: dict[tuple[str, int, float], str] = {}
_lock = threading.Lock()


def activate(pipe: Any, models_dir: Any, uses: tuple[LoraUse, ...], *, sdxl: bool) -> str | None:
    """Set the job's LoRAs on `pipe` (none: switch LoRA off). Returns the infotext's
    `Lora hashes` value, or None. Raises InvalidParams naming an unknown or unusable LoRA."""
    with _lock:
        adapters = _per_pipe.get(pipe)
        if adapters is None:
            adapters = _per_pipe[pipe] = Adapters(pipe, sdxl)
        catalog = _catalogs.setdefault(str(models_dir), LoraCatalog(models_dir))
    files = [(catalog.find(use.name), use) for use in uses]
    adapters.activate(files)
    return ", ".join(f"{_infotext_name(f)}: {lora_hash(f)}" for f, _ in files) or None


def catalog_for(models_dir: Any) -> LoraCatalog:
    with _lock:
        return _catalogs.setdefault(str(models_dir), LoraCatalog(models_dir))


class Adapters:
    """The adapters loaded into one pipeline's components."""

    def __init__(self, pipe: Any, sdxl: bool) -> None:
        self.pipe = pipe
        self.sdxl = sdxl
        self.loaded: OrderedDict[tuple[str, int, float], str] = OrderedDict()
        self.counter = 0

    def activate(self, files: list[tuple[LoraFile, LoraUse]]) -> None:
        if not files:
            if self.loaded:
                self.pipe.disable_lora()
            return
        names = [self._load(lora) for lora, _ in files]
        self.pipe.enable_lora()
        self.pipe.set_adapters(names, adapter_weights=[self._weights(use) for _, use in files])

    def _weights(self, use: LoraUse) -> dict[str, float]:
        weights = {"unet": use.unet, "text_encoder": use.te}
        if self.sdxl:
            weights["text_encoder_2"] = use.te
        return weights

    def _load(self, lora: LoraFile) -> str:
        key = _file_key(lora)
        if key in self.loaded:
            self.loaded.move_to_end(key)
            return self.loaded[key]
        while len(self.loaded) >= MAX_ADAPTERS:
            _, old = self.loaded.popitem(last=False)
            self.pipe.delete_adapters(old)
        self.counter += 1
        name = f"lora{self.counter}"
        log.info("loading LoRA %s as %s", lora.path, name)
        try:
            self.pipe.load_lora_weights(str(lora.path), adapter_name=name)
        except (ValueError, KeyError, RuntimeError, OSError) as exc:
            self._forget(name)
            raise InvalidParams(
                f"LoRA {lora.name!r} cannot be loaded by the diffusers engine "
                f"({type(exc).__name__}: {str(exc)[:300]}); it may be a format diffusers does not "
                "read (LoHa, LoKr, ...) or made for another model family; remove it from the prompt"
            ) from None
        self.loaded[key] = name
        return name

    def _forget(self, name: str) -> None:
        try:
            self.pipe.delete_adapters(name)
        except (ValueError, KeyError, AttributeError):
            pass


def lora_hash(lora: LoraFile) -> str:
    """A1111's LoRA short hash: kohya's `sshs_model_hash` from the metadata, else AutoV3."""
    key = _file_key(lora)
    if key not in _hashes:
        given = metadata(lora.path).get("sshs_model_hash")
        _hashes[key] = given[:12] if given else (hash_file(lora.path).autov3 or "")
    return _hashes[key]


def _infotext_name(lora: LoraFile) -> str:
    return lora.name.replace(":", "").replace(",", "")


def _file_key(lora: LoraFile) -> tuple[str, int, float]:
    stat = lora.path.stat()
    return str(lora.path), stat.st_size, stat.st_mtime
