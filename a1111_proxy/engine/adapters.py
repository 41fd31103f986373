"""LoRA on a loaded model (torch, diffusers + peft): adapters cached by file, activated per job.

The adapter set is state of the shared UNet and text encoders, so every job sets it: the job's
LoRAs with their weights, or none at all (a job without LoRAs must not inherit the last one's).
Adapters stay loaded, least recently used dropped first, so a LoRA used again costs only
`set_adapters`. Our own prompt encoding (`text.py`) calls the same text encoder modules, so the
text-encoder weight applies to it.

While a job runs (`fused`), its LoRAs are merged into the weights they touch, as A1111 does: the
layers then run as plain layers (no extra low-rank matmuls each step, and nothing per-adapter
for torch.compile to guard on). Afterwards each touched weight gets its original back from a
copy made the first time the layer was fused (kept in host memory, as A1111's backup is), so the
next job sees exactly the weights it would on a fresh engine: subtracting the delta again, as
peft's unmerge does, leaves rounding behind.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from weakref import WeakKeyDictionary

import torch

from a1111_proxy.engine.errors import InvalidParams
from a1111_proxy.engine.lora import LoraCatalog, LoraFile, LoraUse, metadata
from a1111_proxy.hashes import hash_file

log = logging.getLogger("a1111_proxy.engine")
MAX_ADAPTERS = 8  # adapters kept loaded per model; each costs its LoRA's size in memory

_per_pipe: WeakKeyDictionary[Any, Adapters] = WeakKeyDictionary()
_merged: WeakKeyDictionary[Any, list[Any]] = WeakKeyDictionary()  # pipe -> its merged layers
_originals: WeakKeyDictionary[Any, dict[str, torch.Tensor]] = WeakKeyDictionary()  # base layer
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


@contextmanager
def fused(pipe: Any, models_dir: Any, uses: tuple[LoraUse, ...]) -> Iterator[str | None]:
    """`activate` the job's LoRAs and merge them into the weights while the block runs; the
    original weights come back after, exactly. Yields the `Lora hashes` value, or None. A job
    run inside another's block (a batch's fallback to one job at a time) first gives the
    weights back, so LoRAs are never merged twice."""
    restore(pipe)
    try:
        hashes = activate(pipe, models_dir, uses)
        if uses:
            _merge(pipe)
        yield hashes
    finally:
        restore(pipe)


def _merge(pipe: Any) -> None:
    layers = _merged.setdefault(pipe, [])
    for part in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, part, None)
        for module in model.modules() if model is not None else ():
            if hasattr(module, "merged_adapters") and _active(module):
                _keep_original(module.get_base_layer())
                layers.append(module)  # before merging: restore() covers a half-done merge
                module.merge()


def _active(layer: Any) -> bool:
    """Whether one of the layer's active adapters has weights here (a te-only LoRA has none in
    the UNet's layers)."""
    weights = getattr(layer, "lora_A", {})
    return not layer.disable_adapters and any(a in weights for a in layer.active_adapters)


def _keep_original(base: Any) -> None:
    if base not in _originals:
        pin = torch.cuda.is_available()
        _originals[base] = {
            name: p.detach().to("cpu", copy=True).pin_memory()
            if pin
            else p.detach().to("cpu", copy=True)
            for name, p in base.named_parameters(recurse=False)
        }


def restore(pipe: Any) -> None:
    """Give every layer merged by `fused` its original weights back, exactly."""
    for module in _merged.pop(pipe, []):
        base = module.get_base_layer()
        with torch.no_grad():
            for name, p in base.named_parameters(recurse=False):
                p.copy_(_originals[base][name], non_blocking=False)
        module.merged_adapters.clear()


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
