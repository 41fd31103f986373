"""ModelHasher: keeps the hashes of the checkpoints and LoRAs under MODELS_DIR in the database.

Each tick lists `Stable-diffusion/` and `Lora/` (A1111's layout) and hashes the files the
database has no row for (by path, size and mtime), smallest first, one at a time, in a thread of
its own: the worker's event loop, and so its jobs, never wait on the disk. A restart hashes
nothing it has seen; a changed file is hashed anew. Rows of files that no worker has seen for
FORGET_SECONDS go (never sooner: workers on other machines may still have them).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from a1111_proxy.hashes import HashingStopped, hash_file
from a1111_proxy.model_info import FOLDERS, FileKey, ModelFile, ModelInfoStore

log = logging.getLogger("a1111_proxy.worker")

T = TypeVar("T")

# The file types A1111 lists, by kind.
EXTENSIONS = {"checkpoint": {".safetensors", ".ckpt"}, "lora": {".safetensors", ".ckpt", ".pt"}}
SEEN_SECONDS = 24 * 3600.0  # how often a row's seen_at is renewed
FORGET_SECONDS = 30 * 24 * 3600.0


@dataclass(frozen=True)
class SeenFile:
    path: str
    kind: str
    rel: str
    size: int
    mtime_ns: int

    @property
    def key(self) -> FileKey:
        return (self.path, self.size, self.mtime_ns)


class ModelHasher:
    def __init__(self, store: ModelInfoStore, models_dir: Path, *, interval: float = 60.0) -> None:
        self.store = store
        self.models_dir = models_dir
        self.interval = interval
        self.hashed = 0  # files this process hashed
        self._stop = threading.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-hash")
        self._said_missing = False

    async def tick(self) -> None:
        seen = await self._in_thread(scan, self.models_dir)
        if seen is None:
            if not self._said_missing:
                log.info("models: %s does not exist; no model files to hash", self.models_dir)
                self._said_missing = True
            return
        self._said_missing = False
        known = {file.key: file for file in await self.store.files()}
        renew = self.store.clock() - SEEN_SECONDS
        await self.store.mark_seen(
            [f.key for f in seen if f.key in known and known[f.key].seen_at < renew]
        )
        await self.store.forget_unseen(FORGET_SECONDS)
        for file in sorted(seen, key=lambda f: f.size):
            if file.key not in known:
                await self._hash(file)

    async def aclose(self) -> None:
        self._stop.set()  # a hash in progress stops at its next chunk
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _hash(self, file: SeenFile) -> None:
        started = time.monotonic()
        try:
            hashes = await self._in_thread(hash_file, Path(file.path), self._stop)
            after = await self._in_thread(os.stat, file.path)
        except HashingStopped:
            return
        except OSError as exc:
            log.warning("models: cannot hash %s: %s", file.path, exc)
            return
        if (after.st_size, after.st_mtime_ns) != (file.size, file.mtime_ns):
            return  # still being written: hash it on a later tick
        await self.store.save_file(
            ModelFile(
                path=file.path,
                size=file.size,
                mtime_ns=file.mtime_ns,
                kind=file.kind,
                rel=file.rel,
                sha256=hashes.sha256,
                autov3=hashes.autov3,
            )
        )
        self.hashed += 1
        log.info(
            "models: hashed %s/%s (%s) in %.1f s",
            FOLDERS[file.kind],
            file.rel,
            hashes.autov2,
            time.monotonic() - started,
        )

    async def _in_thread(self, function: Callable[..., T], *args: Any) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)
        except asyncio.CancelledError:
            self._stop.set()  # the worker is stopping: do not keep reading a large file
            raise


def scan(models_dir: Path) -> list[SeenFile] | None:
    """Every model file in the kinds' folders; None without `models_dir`."""
    if not models_dir.is_dir():
        return None
    seen: list[SeenFile] = []
    for kind, folder in FOLDERS.items():
        root = models_dir / folder
        for directory, _, names in os.walk(root, followlinks=True):
            for name in names:
                if Path(name).suffix.lower() in EXTENSIONS[kind]:
                    found = _seen(root, Path(directory) / name, kind)
                    if found is not None:
                        seen.append(found)
    return seen


def _seen(root: Path, path: Path, kind: str) -> SeenFile | None:
    try:
        stat = path.stat()
    except OSError:
        return None  # vanished or a broken link
    return SeenFile(
        path=str(path.absolute()),
        kind=kind,
        rel=path.relative_to(root).as_posix(),
        size=stat.st_size,
        mtime_ns=stat.st_mtime_ns,
    )
