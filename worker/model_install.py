"""What goes with a downloaded model once it is in place: A1111's sidecars, our records, and a
catalogue refresh.

- `<name>.civitai.info` (Civitai's model-version JSON) and `<name>.preview.png` (the version's
  first image, made a PNG), as A1111's Civitai helper extensions write them: A1111's extra
  networks and those extensions read them. A preview that cannot be had is skipped.
- The file's hashes (so the hasher does not read it again) and Civitai's answer by its SHA256
  (so `civitai` shows on /sd-models and /loras at once, without asking Civitai).
- A refresh request, as POST /sdapi/v1/refresh-checkpoints makes: every worker's catalogue
  keeper asks its backends to rescan, then refetches.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx

from a1111_proxy import egress
from a1111_proxy.catalogue import REFRESH_REQUESTED, CatalogueStore
from a1111_proxy.civitai import CivitaiClient, summarize
from a1111_proxy.hashes import FileHashes
from a1111_proxy.model_info import FOLDERS, ModelFile, ModelInfoStore
from a1111_proxy.model_layout import info_path, preview_path

log = logging.getLogger("a1111_proxy.worker")

T = TypeVar("T")

REFRESH_FOR_KIND = {
    "checkpoint": "checkpoints",
    "lora": "loras",
    "vae": "vae",
    "embedding": "embeddings",
}
REFRESH_MERGE_SECONDS = 60.0  # a refresh asked this recently is widened, not replaced
MAX_PREVIEW_BYTES = 32 << 20


@dataclass(frozen=True)
class Fetching:
    """How the preview image is fetched: through the egress guard, Civitai trusted."""

    http: httpx.AsyncClient
    allow_private: bool
    resolve: egress.Resolver


class Installer:
    def __init__(
        self,
        civitai: CivitaiClient,
        catalogue: CatalogueStore,
        info: ModelInfoStore,
        fetching: Fetching,
        pool: Executor,
        *,
        civitai_ttl: float,
    ) -> None:
        self.civitai = civitai
        self.catalogue = catalogue
        self.info = info
        self.fetching = fetching
        self.pool = pool
        self.civitai_ttl = civitai_ttl

    async def installed(
        self, kind: str, version: dict[str, Any] | None, path: Path, hashes: FileHashes
    ) -> None:
        """The model file is at `path`: add what goes with it."""
        if version is not None:
            await self.sidecars(version, path)
        await self.record(kind, version, path, hashes)
        await self.request_refresh(kind)

    async def sidecars(self, version: dict[str, Any], path: Path) -> None:
        info = json.dumps(version, indent=4, ensure_ascii=False).encode()
        await self._in_pool(write_atomically, info_path(path), info)
        url = first_image(version)
        if url is None:
            return
        try:
            png = await self._in_pool(as_png, await self._fetch_small(url))
        except Exception as exc:
            log.warning("download: no preview for %s (%s: %s)", path.name, type(exc).__name__, exc)
            return
        await self._in_pool(write_atomically, preview_path(path), png)

    async def _fetch_small(self, url: str) -> bytes:
        async with egress.stream(
            self.fetching.http,
            url,
            allow_private=self.fetching.allow_private,
            trusted=self.civitai.is_civitai,
            resolve=self.fetching.resolve,
        ) as response:
            if response.status_code != 200:
                raise ValueError(f"HTTP {response.status_code}")
            data = b""
            async for chunk in response.aiter_bytes():
                data += chunk
                if len(data) > MAX_PREVIEW_BYTES:
                    raise ValueError(f"larger than {MAX_PREVIEW_BYTES} bytes")
            return data

    async def record(
        self, kind: str, version: dict[str, Any] | None, path: Path, hashes: FileHashes
    ) -> None:
        """The file's hashes (checkpoints and LoRAs) and Civitai's answer by its SHA256."""
        if version is not None:
            summary = summarize(version, self.civitai.url)
            await self.info.save_lookup(hashes.sha256, summary, self.civitai_ttl)
        if kind not in FOLDERS:
            return
        stat = path.stat()
        await self.info.save_file(
            ModelFile(
                path=str(path.absolute()),
                size=stat.st_size,
                mtime_ns=stat.st_mtime_ns,
                kind=kind,
                rel=path.name,
                sha256=hashes.sha256,
                autov3=hashes.autov3,
            )
        )

    async def request_refresh(self, kind: str) -> None:
        """Ask the workers' catalogue keepers to rescan; a request made moments ago (another
        download) is widened rather than replaced."""
        now = time.time()
        previous = await self.catalogue.get_control(REFRESH_REQUESTED) or {}
        recent = now - previous.get("at", 0) < REFRESH_MERGE_SECONDS
        what = set(previous.get("what") or []) if recent else set()
        if kind in REFRESH_FOR_KIND:
            what.add(REFRESH_FOR_KIND[kind])
        await self.catalogue.set_control(REFRESH_REQUESTED, {"at": now, "what": sorted(what)})

    async def _in_pool(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.pool, function, *args)


def first_image(version: dict[str, Any]) -> str | None:
    for image in version.get("images") or []:
        if isinstance(image, dict) and image.get("url") and image.get("type", "image") == "image":
            return str(image["url"])
    return None


def as_png(data: bytes) -> bytes:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        out = io.BytesIO()
        image.save(out, "PNG")
    return out.getvalue()


def write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)
