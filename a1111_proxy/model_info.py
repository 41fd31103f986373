"""What a1111-proxy knows about checkpoints and LoRAs beyond what A1111 lists: the hashes of files
under MODELS_DIR, and Civitai's answers by hash. `ModelInfoStore` is the only SQL for the
`model_files` and `civitai_lookups` tables; the functions below tie catalogue entries (A1111's
sd-models and loras) to a hash, and a hash to Civitai's summary.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import Table, bindparam, delete, select, update

from a1111_proxy.catalogue import find_checkpoint
from a1111_proxy.db.engine import Database
from a1111_proxy.db.tables import civitai_lookups, model_files
from a1111_proxy.db.upsert import upsert
from a1111_proxy.model_layout import KIND_FOLDERS

# Catalogue entry -> kind of model, and each kind's folder in A1111's models layout.
CATALOGUE_KINDS = {"sd-models": "checkpoint", "loras": "lora"}
FOLDERS = {kind: KIND_FOLDERS[kind] for kind in CATALOGUE_KINDS.values()}


FileKey = tuple[str, int, int]  # path, size, mtime_ns


@dataclass(frozen=True)
class ModelFile:
    path: str  # absolute, on the machine of the worker that hashed it
    size: int
    mtime_ns: int
    kind: str  # checkpoint | lora
    rel: str  # inside its kind's folder, with "/"
    sha256: str
    autov3: str | None
    hashed_at: float = 0.0
    seen_at: float = 0.0

    @property
    def key(self) -> FileKey:
        return (self.path, self.size, self.mtime_ns)


@dataclass(frozen=True)
class Lookup:
    found: bool
    summary: dict[str, Any] | None
    expires_at: float


class ModelInfoStore:
    def __init__(self, db: Database, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.clock = clock

    async def files(self) -> list[ModelFile]:
        async with self.db.reading() as conn:
            rows = (await conn.execute(select(model_files))).mappings().all()
        return [ModelFile(**row) for row in rows]

    async def save_file(self, file: ModelFile) -> None:
        now = self.clock()
        await self._upsert(model_files, {**asdict(file), "hashed_at": now, "seen_at": now})

    async def mark_seen(self, keys: Collection[FileKey]) -> None:
        """These files are still there (so keep their rows)."""
        if not keys:
            return
        statement = (
            update(model_files)
            .where(
                model_files.c.path == bindparam("p"),
                model_files.c.size == bindparam("s"),
                model_files.c.mtime_ns == bindparam("m"),
            )
            .values(seen_at=self.clock())
        )
        async with self.db.writing() as conn:
            await conn.execute(statement, [{"p": p, "s": s, "m": m} for p, s, m in keys])

    async def forget_unseen(self, seconds: float) -> None:
        """Drop rows of files no worker has seen for `seconds`."""
        async with self.db.writing() as conn:
            await conn.execute(
                delete(model_files).where(model_files.c.seen_at < self.clock() - seconds)
            )

    async def lookups(self, hashes: Iterable[str]) -> dict[str, Lookup]:
        wanted = sorted(set(hashes))
        if not wanted:
            return {}
        async with self.db.reading() as conn:
            rows = (
                await conn.execute(
                    select(civitai_lookups).where(civitai_lookups.c.hash.in_(wanted))
                )
            ).all()
        return {
            row.hash: Lookup(row.found, json.loads(row.body) if row.body else None, row.expires_at)
            for row in rows
        }

    async def save_lookup(self, hash_: str, summary: dict[str, Any] | None, ttl: float) -> None:
        """Civitai's answer for `hash_`: its summary, or None for "not on Civitai"."""
        now = self.clock()
        await self._upsert(
            civitai_lookups,
            {
                "hash": hash_,
                "found": summary is not None,
                "body": None if summary is None else json.dumps(summary),
                "fetched_at": now,
                "expires_at": now + ttl,
            },
        )

    async def with_civitai(self, kind: str, entries: Any, index: FileIndex) -> list[Any]:
        """The entries with what Civitai said about each (stale answers too: better than none)."""
        keys = {key for entry in _entries(entries) if (key := lookup_hash(kind, entry, index))}
        summaries = {
            h: found.summary
            for h, found in (await self.lookups(keys)).items()
            if found.summary is not None
        }
        return with_civitai(kind, entries, index, summaries)

    async def _upsert(self, table: Table, values: dict[str, Any]) -> None:
        """Insert or replace by primary key, atomically: two workers may save the same row."""
        async with self.db.writing() as conn:
            await conn.execute(upsert(self.db, table, values))


class FileIndex:
    """Finds the file on disk behind a catalogue entry: by its path inside the kind's folder, else
    by its file name when only one file has it (A1111 may run with another models folder)."""

    def __init__(self, files: Iterable[ModelFile]) -> None:
        self.by_rel: dict[tuple[str, str], ModelFile] = {}
        self.rels_by_name: dict[tuple[str, str], set[str]] = {}
        for file in sorted(files, key=lambda f: f.hashed_at):  # the latest hash of a file wins
            self.by_rel[(file.kind, file.rel)] = file
            self.rels_by_name.setdefault((file.kind, file.rel.rsplit("/", 1)[-1]), set()).add(
                file.rel
            )

    def find(self, kind: str, filename: str) -> ModelFile | None:
        path = filename.replace("\\", "/")
        parts = path.split(f"/{FOLDERS[kind]}/")
        for n in range(1, len(parts)):  # the folder's name may recur in the path
            if found := self.by_rel.get((kind, f"/{FOLDERS[kind]}/".join(parts[n:]))):
                return found
        rels = self.rels_by_name.get((kind, path.rsplit("/", 1)[-1]), set())
        return self.by_rel[(kind, next(iter(rels)))] if len(rels) == 1 else None


def entry_filename(kind: str, entry: dict[str, Any]) -> str:
    return str(entry.get("filename" if kind == "checkpoint" else "path") or "")


def lookup_hash(kind: str, entry: dict[str, Any], index: FileIndex) -> str | None:
    """The hash to ask Civitai about for this entry (lower case), or None while none is known.

    Checkpoints: A1111's sha256, else ours from disk, else A1111's short hash (AutoV2). LoRAs (A1111
    lists no hash): our SHA256, else our AutoV3, else the AutoV3 in the file's kohya metadata.
    """
    file = index.find(kind, entry_filename(kind, entry))
    if kind == "checkpoint":
        candidates = [entry.get("sha256"), file and file.sha256, entry.get("hash")]
    else:
        metadata = entry.get("metadata")
        kohya = metadata.get("sshs_model_hash") if isinstance(metadata, dict) else None
        kohya = str(kohya or "")[:12]
        candidates = [file and file.sha256, file and file.autov3, kohya]
    return next((c.lower() for c in candidates if isinstance(c, str) and c), None)


def entry_hashes(kind: str, entry: dict[str, Any], index: FileIndex) -> set[str]:
    """Every hash this entry answers to (lower case), for finding it by hash."""
    file = index.find(kind, entry_filename(kind, entry))
    known = [entry.get("sha256"), entry.get("hash")]
    if file is not None:
        known += [file.sha256, file.sha256[:10], file.autov3]
    return {h.lower() for h in known if isinstance(h, str) and h}


def wanted_hashes(catalogue: dict[str, Any], index: FileIndex) -> set[str]:
    """The hashes to ask Civitai about for every checkpoint and LoRA in the catalogue."""
    wanted = set()
    for name, kind in CATALOGUE_KINDS.items():
        for entry in _entries(catalogue.get(name)):
            if key := lookup_hash(kind, entry, index):
                wanted.add(key)
    return wanted


def with_civitai(
    kind: str, entries: Any, index: FileIndex, summaries: dict[str, dict[str, Any]]
) -> list[Any]:
    """The entries as A1111 gave them, plus `civitai` (last) where Civitai knows the file."""
    enriched = []
    for entry in entries or []:
        key = lookup_hash(kind, entry, index) if isinstance(entry, dict) else None
        summary = summaries.get(key) if key else None
        enriched.append({**entry, "civitai": summary} if summary else entry)
    return enriched


def find_entry(kind: str, entries: Any, wanted: str, index: FileIndex) -> dict[str, Any] | None:
    """A checkpoint by title, name, model name, file name or hash; a LoRA by name, alias or hash."""
    if kind == "checkpoint" and (found := find_checkpoint(entries, wanted)):
        return found
    for entry in _entries(entries):
        if wanted in entry_names(kind, entry) or wanted.lower() in entry_hashes(kind, entry, index):
            return entry
    return None


def entry_names(kind: str, entry: dict[str, Any]) -> set[str]:
    if kind == "lora":
        return {str(entry[key]) for key in ("name", "alias") if entry.get(key)}
    title = str(entry.get("title") or "")
    hash_ = entry.get("hash")
    name = title.removesuffix(f" [{hash_}]") if hash_ else title  # A1111's `name`: the rel path
    return {n for n in (title, name, str(entry.get("model_name") or "")) if n}


def known_names(kind: str, entries: Any) -> list[str]:
    key = "title" if kind == "checkpoint" else "name"
    return [str(entry[key]) for entry in _entries(entries) if entry.get(key)]


def _entries(value: Any) -> list[dict[str, Any]]:
    return [entry for entry in value or [] if isinstance(entry, dict)]
