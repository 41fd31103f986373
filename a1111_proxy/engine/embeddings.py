"""Textual-inversion embeddings in MODELS_DIR/embeddings, loaded and used as A1111 does (torch).

A file's stem is the embedding's name; a prompt that spells the name gets the embedding's k
vectors in k token positions (engine/prompts.py places them, engine/text.py puts the vectors in
after the token embedding). Formats, as A1111's `EmbeddingDatabase.load_from_file` reads them:
A1111's `.pt` (`string_to_param`), a single-tensor file (`emb_params`, diffusers' `.bin`), and
SDXL's `clip_l` + `clip_g` pair, each as `.pt`, `.bin` or `.safetensors`. Pickled files are read
with torch's weights-only loader, which builds tensors and plain containers and runs no code.

An embedding fits a model when its width is the text encoders' (SD1: 768, SDXL: 768 + 1280);
the others are "skipped", as A1111 lists them in /sdapi/v1/embeddings, and a prompt naming one
reads it as words (with a warning in the log).
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from a1111_proxy.engine import folders
from a1111_proxy.engine.catalog import Checkpoint, architecture, read_header
from a1111_proxy.engine.errors import InvalidParams
from a1111_proxy.engine.prompts import CHUNK, Found
from a1111_proxy.hashes import hash_file

log = logging.getLogger("a1111_proxy.engine")
EMBEDDINGS_DIR = "embeddings"
SUFFIXES = (".pt", ".bin", ".safetensors")
ANY = ""  # the key of a single-tensor embedding's vectors: one encoder, whichever it is
SDXL_KEYS = ("clip_l", "clip_g")  # SDXL's first and second text encoder

FileKey = tuple[str, int, float]


@dataclass(frozen=True)
class Embedding:
    name: str
    path: Path
    parts: dict[str, torch.Tensor]  # ANY, or "clip_l" and "clip_g"; each (vectors, width)
    sha256: str
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None

    @property
    def vectors(self) -> int:
        return int(self.parts.get("clip_g", self.parts.get(ANY, torch.empty(0))).shape[0])

    @property
    def shape(self) -> int:
        """A1111's `shape`: the width, both encoders' together for SDXL."""
        return sum(int(t.shape[-1]) for t in self.parts.values())

    @property
    def shorthash(self) -> str:
        """What A1111 writes in `TI hashes`: the first 12 hex digits of the file's sha256."""
        return self.sha256[:12]

    def fits(self, widths: dict[str, int]) -> bool:
        """Whether the model with these text-encoder widths (by ANY or SDXL_KEYS) can use it."""
        return set(self.parts) == set(widths) and all(
            int(self.parts[key].shape[-1]) == width for key, width in widths.items()
        )

    def entry(self) -> dict[str, Any]:
        """One embedding as A1111's /sdapi/v1/embeddings shows it."""
        return {
            "step": self.step,
            "sd_checkpoint": self.sd_checkpoint,
            "sd_checkpoint_name": self.sd_checkpoint_name,
            "shape": self.shape,
            "vectors": self.vectors,
        }


class UnreadableEmbedding(ValueError):
    """The file is not an embedding in a format A1111 reads."""


def read(path: Path) -> Embedding:
    """Load one embedding file (on the CPU, in float32). Raises UnreadableEmbedding."""
    try:
        data = _load(path)
    except Exception as exc:  # safetensors, pickle and zip errors have no common base
        raise UnreadableEmbedding(f"{type(exc).__name__}: {str(exc)[:200]}") from None
    if not isinstance(data, dict) or not data:
        raise UnreadableEmbedding("not a dictionary of tensors")
    parts = _parts(data)
    for key, tensor in parts.items():
        if tensor.ndim != 2 or tensor.shape[0] < 1:
            raise UnreadableEmbedding(f"vectors of shape {tuple(tensor.shape)} in {key or 'it'}")
    if len({int(t.shape[0]) for t in parts.values()}) != 1:
        raise UnreadableEmbedding("clip_l and clip_g have different numbers of vectors")
    if next(iter(parts.values())).shape[0] > CHUNK:
        raise UnreadableEmbedding(f"more than {CHUNK} vectors; a prompt chunk holds {CHUNK}")
    return Embedding(
        name=path.stem,
        path=path,
        parts={k: v.detach().to(torch.float32).contiguous() for k, v in parts.items()},
        sha256=hash_file(path).sha256,
        step=_plain(data.get("step"), int),
        sd_checkpoint=_plain(data.get("sd_checkpoint"), str),
        sd_checkpoint_name=_plain(data.get("sd_checkpoint_name"), str),
    )


def _load(path: Path) -> Any:
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def _parts(data: dict[Any, Any]) -> dict[str, torch.Tensor]:
    if "string_to_param" in data:  # A1111's own training output
        params = data["string_to_param"]
        params = getattr(params, "_parameters", params)
        if not isinstance(params, dict) or len(params) != 1:
            raise UnreadableEmbedding("string_to_param must hold exactly one term")
        return {ANY: _tensor(next(iter(params.values())))}
    if "clip_l" in data and "clip_g" in data:  # SDXL
        return {key: _tensor(data[key]) for key in SDXL_KEYS}
    if len(data) == 1 and isinstance(next(iter(data.values())), torch.Tensor):
        return {ANY: _tensor(next(iter(data.values())))}  # emb_params, diffusers' concepts
    raise UnreadableEmbedding(
        "neither a textual inversion embedding (string_to_param, one tensor, or clip_l and "
        "clip_g) nor a diffusers concept"
    )


def _tensor(value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise UnreadableEmbedding(f"a {type(value).__name__} where its vectors should be")
    return value.unsqueeze(0) if value.ndim == 1 else value


def _plain(value: Any, kind: type) -> Any:
    return value if isinstance(value, kind) and not isinstance(value, bool) else None


@dataclass
class Split:
    """The embeddings of a folder for one model: those it can use, and the skipped ones."""

    loaded: dict[str, Embedding] = field(default_factory=dict)  # by name, sorted as A1111's
    skipped: dict[str, Embedding] = field(default_factory=dict)

    def entries(self) -> dict[str, Any]:
        """/sdapi/v1/embeddings as A1111 answers it."""
        return {
            "loaded": {name: e.entry() for name, e in self.loaded.items()},
            "skipped": {name: e.entry() for name, e in self.skipped.items()},
        }


class EmbeddingFolder:
    """MODELS_DIR/embeddings (subfolders and links included), each file read once per version
    (path, size, mtime) and looked at again for each job, so a file added is used at once."""

    def __init__(self, models_dir: str | Path) -> None:
        self.root = Path(models_dir) / EMBEDDINGS_DIR
        self._read: dict[FileKey, Embedding | None] = {}
        self._warned: set[tuple[FileKey, tuple[tuple[str, int], ...]]] = set()
        self._lock = threading.Lock()

    def split(self, widths: dict[str, int] | None) -> Split:
        """The embeddings that fit text encoders of `widths` (None: any, A1111's "no model")."""
        found = Split()
        for embedding in self._scan():
            fits = widths is None or embedding.fits(widths)
            (found.loaded if fits else found.skipped)[embedding.name] = embedding  # last wins
            if not fits and widths is not None:
                self._warn_skipped(embedding, widths)
        found.loaded = dict(sorted(found.loaded.items(), key=lambda item: item[0].lower()))
        return found

    def _scan(self) -> list[Embedding]:
        if not self.root.is_dir():
            return []
        made: list[Embedding] = []
        for here, _, filenames in folders.walk(self.root):
            for filename in filenames:
                path = here / filename
                if path.suffix.lower() in SUFFIXES and path.stat().st_size > 0:
                    embedding = self._embedding(path)
                    if embedding is not None:
                        made.append(embedding)
        return made

    def _embedding(self, path: Path) -> Embedding | None:
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime)
        with self._lock:
            if key not in self._read:
                for old in [k for k in self._read if k[0] == key[0]]:  # an older version
                    del self._read[old]
                try:
                    self._read[key] = read(path)
                except UnreadableEmbedding as exc:
                    log.warning("embedding %s not loaded: %s", path, exc)
                    self._read[key] = None
            return self._read[key]

    def _warn_skipped(self, embedding: Embedding, widths: dict[str, int]) -> None:
        stat = embedding.path.stat()
        key = ((str(embedding.path), stat.st_size, stat.st_mtime), tuple(sorted(widths.items())))
        if key in self._warned:
            return
        self._warned.add(key)
        log.warning(
            "embedding %s skipped: made for text encoders of width %s, this model's are %s",
            embedding.name,
            _widths_text({k: int(v.shape[-1]) for k, v in embedding.parts.items()}),
            _widths_text(widths),
        )


def _widths_text(widths: dict[str, int]) -> str:
    return " + ".join(f"{w} ({k})" if k else str(w) for k, w in widths.items())


_folders: dict[str, EmbeddingFolder] = {}
_folders_lock = threading.Lock()


def folder(models_dir: str | Path) -> EmbeddingFolder:
    """The one EmbeddingFolder of a MODELS_DIR (its files are read once for all jobs)."""
    with _folders_lock:
        return _folders.setdefault(str(models_dir), EmbeddingFolder(models_dir))


def pipe_widths(pipe: Any, sdxl: bool) -> dict[str, int]:
    """The widths embeddings must have for a loaded pipeline, by the key of their vectors."""
    first = int(pipe.text_encoder.config.hidden_size)
    if not sdxl:
        return {ANY: first}
    return {"clip_l": first, "clip_g": int(pipe.text_encoder_2.config.hidden_size)}


# The token embedding of each text encoder in a single-file checkpoint (LDM names).
_TOKEN_EMBEDDINGS = {
    ANY: (
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
        "cond_stage_model.transformer.embeddings.token_embedding.weight",
    ),
    "clip_l": ("conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",),
    "clip_g": ("conditioner.embedders.1.model.token_embedding.weight",),
}


_ENCODER_FOLDERS = {ANY: "text_encoder", "clip_l": "text_encoder", "clip_g": "text_encoder_2"}


def checkpoint_widths(checkpoint: Checkpoint) -> dict[str, int] | None:
    """pipe_widths() of a checkpoint not loaded, read from its files; None when unknown."""
    try:
        keys = SDXL_KEYS if architecture(checkpoint).startswith("sdxl") else (ANY,)
        return {key: _width(checkpoint, key) for key in keys}
    except (InvalidParams, OSError, ValueError, KeyError, IndexError, StopIteration):
        return None


def _width(checkpoint: Checkpoint, key: str) -> int:
    if checkpoint.folder:
        config = checkpoint.path / _ENCODER_FOLDERS[key] / "config.json"
        return int(json.loads(config.read_text())["hidden_size"])
    header = read_header(checkpoint.path)
    name = next(n for n in _TOKEN_EMBEDDINGS[key] if n in header)
    return int(header[name]["shape"][1])


class Vocabulary:
    """The embeddings one job's model can use, found by their names' token ids, and which ones
    each prompt used (for `TI hashes`)."""

    def __init__(self, split: Split, tokenizer: Any) -> None:
        self.split = split
        self._by_first: dict[int, list[tuple[list[int], Embedding]]] = {}
        for embedding in split.loaded.values():
            ids = tokenizer([embedding.name], add_special_tokens=False).input_ids[0]
            if ids:
                self._by_first.setdefault(ids[0], []).append((ids, embedding))
        for matches in self._by_first.values():
            matches.sort(key=lambda match: len(match[0]), reverse=True)  # the longest first
        self._used: dict[tuple[str, str], list[str]] = {}
        self._hashes: str | None = None

    def find(self, tokens: Sequence[int], position: int) -> Found | None:
        """A1111's find_embedding_at_position."""
        for ids, embedding in self._by_first.get(tokens[position], ()):
            if list(tokens[position : position + len(ids)]) == ids:
                return Found(embedding.name, len(ids), embedding.vectors)
        return None

    def vectors(self, name: str, key: str) -> torch.Tensor:
        """The vectors of `name` for the text encoder `key` (ANY or one of SDXL_KEYS)."""
        parts = self.split.loaded[name].parts
        return parts[key] if key in parts else parts[ANY]

    def note(self, key: str, text: str, names: list[str]) -> None:
        """engine/text.py: encoding `text` with encoder `key` used these embeddings."""
        self._used[(key, text)] = names

    def record(self, texts: Sequence[str], keys: Sequence[str]) -> None:
        """One side (prompt or negative) of a pass was encoded: add its embeddings to TI hashes
        as A1111's encoder call does, for each text encoder in turn: the names of this call
        first, then what was there (so the negative, encoded first, ends up last)."""
        for key in keys:
            names = [n for text in texts for n in self._used.get((key, text), [])]
            if not names:
                continue
            parts = [f"{_clean(n)}: {self.split.loaded[n].shorthash}" for n in dict.fromkeys(names)]
            self._hashes = ", ".join([*parts, self._hashes] if self._hashes else parts)

    @property
    def ti_hashes(self) -> str | None:
        """The infotext's `TI hashes` value, or None when no embedding was used."""
        return self._hashes

    def warn_skipped(self, prompts: Sequence[str]) -> None:
        """Say in the log when a prompt names an embedding this model cannot use."""
        words = " ".join(prompts)
        for name, embedding in self.split.skipped.items():
            if re.search(rf"(?<!\w){re.escape(name)}(?!\w)", words, re.IGNORECASE):
                log.warning(
                    "the prompt names embedding %s, which does not fit this model (width %d); "
                    "it is read as words",
                    name,
                    embedding.shape,
                )


def _clean(name: str) -> str:
    return name.replace(":", "").replace(",", "")


def vocabulary(models_dir: str | Path, pipe: Any, sdxl: bool) -> Vocabulary:
    """The embeddings of MODELS_DIR that this loaded pipeline can use, for one job."""
    return Vocabulary(folder(models_dir).split(pipe_widths(pipe, sdxl)), pipe.tokenizer)
