"""LoRA as A1111 writes it in prompts, and the LoRA files in MODELS_DIR/Lora (plain Python, no
torch).

`<lora:name>`, `<lora:name:w>` (text encoder and UNet both w), `<lora:name:te:unet>` and the named
forms `te=`/`unet=`. The tags are taken out of the prompt before it is encoded, as A1111 does; the
prompt written in the infotext keeps them. `<lyco:...>` is read as `<lora:...>` (A1111 >= 1.5).
"""

from __future__ import annotations

import difflib
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from a1111_proxy.engine import folders
from a1111_proxy.engine.catalog import read_header
from a1111_proxy.engine.errors import InvalidParams

LORA_DIR = "Lora"
TAG = re.compile(r"<(\w+):([^>]+)>")
LORA_KINDS = ("lora", "lyco")
# Key fragments of LyCORIS formats diffusers cannot load (ENGINE.md §4).
UNSUPPORTED_KEYS = {"hada_w1": "LoHa", "lokr_w1": "LoKr", "oft_blocks": "OFT", ".glora_": "GLoRA"}


@dataclass(frozen=True)
class LoraUse:
    """One `<lora:...>` tag: which file, and its text-encoder and UNet multipliers."""

    name: str
    te: float = 1.0
    unet: float = 1.0


def parse_uses(prompt: str) -> tuple[LoraUse, ...]:
    """The LoRA tags of a prompt, in order; the same name twice keeps the last."""
    uses: dict[str, LoraUse] = {}
    for kind, body in TAG.findall(prompt):
        if kind.lower() in LORA_KINDS:
            use = _parse_tag(body)
            uses.pop(use.name, None)
            uses[use.name] = use
    return tuple(uses.values())


def other_networks(prompt: str) -> list[str]:
    """Extra-network tags the engine has no support for (hypernet, ...)."""
    return [
        f"<{kind}:{body}>" for kind, body in TAG.findall(prompt) if kind.lower() not in LORA_KINDS
    ]


def strip_tags(prompt: str) -> str:
    """The prompt as the text encoder sees it: every extra-network tag removed."""
    return TAG.sub("", prompt)


def _parse_tag(body: str) -> LoraUse:
    parts = body.split(":")
    name, positional, named = parts[0].strip(), [], {}
    for part in parts[1:]:
        key, eq, value = part.partition("=")
        if eq:
            named[key.strip()] = value
        else:
            positional.append(part)
    te = _number(named.get("te", positional[0] if positional else "1"), body)
    unet = _number(named.get("unet", positional[1] if len(positional) > 1 else te), body)
    if not name:
        raise InvalidParams(f"<lora:{body}> has no name; write <lora:NAME:WEIGHT>")
    return LoraUse(name, te, unet)


def _number(value: Any, body: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InvalidParams(
            f"<lora:{body}>: {value!r} is not a number; write <lora:NAME:WEIGHT> or "
            "<lora:NAME:TE_WEIGHT:UNET_WEIGHT>"
        ) from None


@dataclass(frozen=True)
class LoraFile:
    name: str  # the file stem, what prompts use (A1111's name)
    path: Path


class LoraCatalog:
    """The LoRA files under MODELS_DIR/Lora (subfolders included); rescanned on a miss."""

    def __init__(self, models_dir: str | os.PathLike[str]) -> None:
        self.root = Path(models_dir) / LORA_DIR
        self.files = self.scan()

    def scan(self) -> list[LoraFile]:
        found: list[LoraFile] = []
        if not self.root.is_dir():
            return found
        for here, _, filenames in folders.walk(self.root):
            for filename in sorted(filenames):
                if filename.lower().endswith((".safetensors", ".pt", ".ckpt")):
                    path = here / filename
                    found.append(LoraFile(path.stem, path))
        return sorted(found, key=lambda f: f.name.lower())

    def find(self, name: str) -> LoraFile:
        """By file stem (or path under Lora/ without extension). Raises InvalidParams naming
        the closest names when there is none."""
        for attempt in range(2):
            if attempt:
                self.files = self.scan()
            found = self._match(name)
            if found is not None:
                return _checked(found)
        names = [f.name for f in self.files]
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        known = ", ".join(names[:20]) if names else f"none (put .safetensors files in {self.root})"
        raise InvalidParams(f"LoRA {name!r} not found in {self.root}{hint} Known LoRAs: {known}")

    def _match(self, name: str) -> LoraFile | None:
        for lora in (f for f in self.files if f.path.is_file()):  # a deleted file: rescan
            relative = lora.path.relative_to(self.root).with_suffix("").as_posix()
            if name in (lora.name, relative):
                return lora
        lowered = name.lower()
        return next((f for f in self.files if f.name.lower() == lowered and f.path.is_file()), None)

    def entries(self) -> list[dict[str, Any]]:
        """/sdapi/v1/loras as A1111 answers it (metadata from the file's header)."""
        return [
            {"name": f.name, "alias": f.name, "path": str(f.path), "metadata": metadata(f.path)}
            for f in self.files
        ]


def _checked(lora: LoraFile) -> LoraFile:
    if lora.path.suffix.lower() != ".safetensors":
        raise InvalidParams(
            f"LoRA {lora.name!r} is a pickled file ({lora.path.suffix}); the diffusers engine "
            "never unpickles files. Use the .safetensors version of it"
        )
    header = read_header(lora.path)
    for fragment, kind in UNSUPPORTED_KEYS.items():
        if any(fragment in key for key in header):
            raise InvalidParams(
                f"LoRA {lora.name!r} is a LyCORIS {kind}, which the diffusers engine cannot "
                "load (plain LoRA, LoCon and DoRA work); remove it from the prompt"
            )
    return lora


def metadata(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100 * 1024 * 1024:
                return {}
            meta = json.loads(f.read(length)).get("__metadata__") or {}
    except (OSError, ValueError, struct.error):
        return {}
    return {k: v for k, v in meta.items() if isinstance(v, str) and len(v) < 10_000}
