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

from a1111_proxy.engine.errors import InvalidParams
from a1111_proxy.engine.lora import LoraCatalog, LoraFile, LoraUse, metadata
from a1111_proxy.hashes import hash_file

log = logging.getLogger("a1111_proxy.engine")
MAX_ADAPTERS = 8  # adapters kept loaded per model; each costs its LoRA's size in memory

_per_pipe: WeakKeyDictionary[Any, Adapters] = WeakKeyDictionary()
_catalogs: dict[str, LoraCatalog] = {}
_hashes: dict[tuple[str, int, float], str] = {}
_lock = threading.Lock()


def activate(pipe: Any, models_dir: Any, uses: tuple[LoraUse, ...]) -> str | None:
    """Set the job's LoRAs on `pipe` (none: switch LoRA off). Returns the infotext's
    `Lora hashes` value, or None. Raises InvalidParams naming an unknown or unusable LoRA."""
    with _lock:
        adapters = _per_pipe.get(pipe)
        if adapters is None:
            adapters = _per_pipe[pipe] = Adapters()
        catalog = _catalogs.setdefault(str(models_dir), LoraCatalog(models_dir))
    files = [(catalog.find(use.name), use) for use in uses]
    adapters.activate(pipe, files)
    return ", ".join(f"{_infotext_name(f)}: {lora_hash(f)}" for f, _ in files) or None


class Adapters:
    """The adapters loaded into one pipeline's components. Holds no reference to the pipeline
    (it is the key of a weak mapping, so an unloaded model takes its adapters with it)."""

    def __init__(self) -> None:
        self.loaded: OrderedDict[tuple[str, int, float], str] = OrderedDict()
        self.counter = 0

    def activate(self, pipe: Any, files: list[tuple[LoraFile, LoraUse]]) -> None:
        if not files:
            if self.loaded:
                pipe.disable_lora()
            return
        names = [self._load(pipe, lora) for lora, _ in files]
        self._trim(pipe, keep=set(names))
        parts = pipe.get_list_adapters()  # e.g. {"unet": [...], "text_encoder": [...]}
        weights = [
            self._weights(name, use, parts) for name, (_, use) in zip(names, files, strict=True)
        ]
        pipe.enable_lora()
        pipe.set_adapters(names, adapter_weights=weights)

    def _trim(self, pipe: Any, keep: set[str]) -> None:
        """Down to MAX_ADAPTERS, least recently used first; never the job's own."""
        for key in [k for k, name in self.loaded.items() if name not in keep]:
            if len(self.loaded) <= MAX_ADAPTERS:
                break
            pipe.delete_adapters(self.loaded.pop(key))

    def _weights(self, name: str, use: LoraUse, parts: dict[str, list[str]]) -> dict[str, float]:
        """Per component, for the components this LoRA has (A1111's te and unet multipliers)."""
        weights = {"unet": use.unet, "text_encoder": use.te, "text_encoder_2": use.te}
        return {part: w for part, w in weights.items() if name in parts.get(part, ())}

    def _load(self, pipe: Any, lora: LoraFile) -> str:
        key = _file_key(lora)
        if key in self.loaded:
            self.loaded.move_to_end(key)
            return self.loaded[key]
        self.counter += 1
        name = f"lora{self.counter}"
        log.info("loading LoRA %s as %s", lora.path, name)
        try:
            pipe.load_lora_weights(str(lora.path), adapter_name=name)
        except (ValueError, KeyError, RuntimeError, OSError) as exc:
            _forget(pipe, name)
            raise InvalidParams(
                f"LoRA {lora.name!r} cannot be loaded by the diffusers engine "
                f"({type(exc).__name__}: {str(exc)[:300]}); it may be a format diffusers does not "
                "read (LoHa, LoKr, ...) or made for another model family; remove it from the prompt"
            ) from None
        self.loaded[key] = name
        return name


def _forget(pipe: Any, name: str) -> None:
    try:
        pipe.delete_adapters(name)
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
