"""Downloader: the worker's chore that fetches models into MODELS_DIR (POST
/sdapi/v1/models/downloads).

Each tick claims one due download (a lease: no other worker fetches it meanwhile), then:

1. resolves its source once (worker/download_plan.py; kept on the row, so a resumed download
   asks Civitai nothing), refusing a pickle unless DOWNLOAD_ALLOW_PICKLE or a file that is no
   model;
2. refuses a name already taken by another file, and a disk that would keep less than
   DOWNLOAD_RESERVE_BYTES free;
3. streams the file into `<name>.part` beside its place (worker/transfer.py: Range resumes),
   while a heartbeat renews the lease, shows the progress and hears a cancel;
4. checks Civitai's SHA256 (a mismatch removes the part file and fails the download), renames
   the part file into place, and adds what goes with it (worker/model_install.py): A1111's
   sidecars, the file's hashes and Civitai's answer, a catalogue refresh.

A failed or canceled download leaves no part file; one given back to the queue (Civitai down,
the connection kept dropping, the worker stopping) keeps it for the next claim to resume.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from a1111_proxy import egress
from a1111_proxy.catalogue import CatalogueStore
from a1111_proxy.civitai import CivitaiClient
from a1111_proxy.downloads import DownloadClaim, DownloadStore
from a1111_proxy.hashes import FileHashes, hash_file
from a1111_proxy.model_info import ModelInfoStore
from a1111_proxy.model_layout import part_path, place
from worker.download_plan import plan_for
from worker.model_install import Fetching, Installer
from worker.transfer import Refused, Remote, Transfer, TryLater

log = logging.getLogger("a1111_proxy.worker")

T = TypeVar("T")

BUSY_PATH_DELAY = 10.0  # another download writes the same file: look again after this
READ_TIMEOUT_SECONDS = 60.0  # a server silent this long drops the connection (then resumed)


@dataclass(frozen=True)
class DownloadConfig:
    models_dir: Path
    allow_pickle: bool = False
    reserve_bytes: int = 1 << 30
    allow_private: bool = False  # WEBHOOK_ALLOW_PRIVATE: the egress guard, as for webhooks
    ca_bundle: str = ""
    lease_seconds: float = 30.0
    heartbeat_seconds: float = 1.0
    civitai_ttl: float = 604800.0


class Downloader:
    def __init__(
        self,
        store: DownloadStore,
        civitai: CivitaiClient,
        catalogue: CatalogueStore,
        info: ModelInfoStore,
        config: DownloadConfig,
        *,
        worker_id: str,
        interval: float = 1.0,
        resolve: egress.Resolver = egress.system_resolve,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.store = store
        self.civitai = civitai
        self.config = config
        self.worker_id = worker_id
        self.interval = interval
        self.resolve = resolve
        self.sleep = sleep
        self.http = egress.make_client(config.ca_bundle, timeout=READ_TIMEOUT_SECONDS)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="download")
        self.installer = Installer(
            civitai,
            catalogue,
            info,
            Fetching(self.http, config.allow_private, resolve),
            self._pool,
            civitai_ttl=config.civitai_ttl,
        )
        self.transfer: Transfer | None = None  # the one running (tests look at its ranges)

    async def tick(self) -> None:
        """Fetch the next due download, if any, to its end."""
        if not await self.store.has_due():
            return
        claim = await self.store.claim(self.worker_id, self.config.lease_seconds)
        if claim is None:
            return
        try:
            await self.run(claim)
        except asyncio.CancelledError:  # the worker is stopping: the next claim resumes it
            with contextlib.suppress(Exception):
                await self.store.release(claim)
            raise

    async def aclose(self) -> None:
        await self.http.aclose()
        await self.civitai.aclose()
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def run(self, claim: DownloadClaim) -> None:
        label = f"download {claim.id}"
        try:
            resolved = await self._resolved(claim)
            if resolved is None:
                return
            claim = resolved  # what follows may fail knowing where the part file is
            await self._fetch(claim)
        except OSError as exc:  # the disk: full, read-only, no permission
            await self._fail(claim, Refused(f"{type(exc).__name__}: {exc}"))
        except Refused as exc:
            await self._fail(claim, exc)
        except TryLater as exc:
            status = await self.store.requeue(claim, exc.delay, str(exc))
            log.warning("%s: %s; %s", label, exc, f"now {status}" if status else "lease lost")
            if status == "failed":
                await self._remove_part(claim)

    async def _fail(self, claim: DownloadClaim, exc: Refused) -> None:
        await self._remove_part(claim)
        log.warning("download %s failed: %s", claim.id, exc)
        await self.store.finish(claim, "failed", str(exc))

    async def _resolved(self, claim: DownloadClaim) -> DownloadClaim | None:
        """The claim with its source resolved (once: a resumed download asks nothing); None
        when there is nothing more to do (canceled, or the lease is lost)."""
        if claim.record.cancel_requested_at is not None:
            await self._cancel(claim)
            return None
        if claim.record.attempts > self.store.max_attempts:
            raise Refused(f"its workers stopped or died {claim.record.attempts - 1} times")
        if claim.record.path is not None:
            return claim
        plan = await plan_for(claim.record, self.civitai, allow_pickle=self.config.allow_pickle)
        return await self.store.resolved(claim, plan)

    async def _fetch(self, claim: DownloadClaim) -> None:
        path = self._target(claim)
        if await self._already_there(claim, path):
            return
        outcome = await self._stream(claim, path)
        if outcome == "canceled":
            await self._cancel(claim)
        elif outcome == "done":
            await self._install(claim, path)

    # --- what to fetch, and where ---------------------------------------------------------

    def _target(self, claim: DownloadClaim) -> Path:
        """The file's path on this machine (its kind's folder made if missing)."""
        record = claim.record
        assert record.kind is not None and record.path is not None
        if not self.config.models_dir.is_dir():
            raise Refused(
                f"MODELS_DIR ({self.config.models_dir}) does not exist on worker {self.worker_id}"
            )
        name = record.path.split("/", 1)[1]
        try:
            path = place(self.config.models_dir, record.kind, name)
            place(self.config.models_dir, record.kind, part_path(path).name)
        except ValueError as exc:
            raise Refused(str(exc)) from None
        path.parent.mkdir(exist_ok=True)
        return path

    async def _already_there(self, claim: DownloadClaim, path: Path) -> bool:
        """True when the file is in place already (then the download is done); refuses to
        replace another file, and waits while another download writes this one."""
        assert claim.record.path is not None
        other = await self.store.writer_of(claim, claim.record.path)
        if other is not None:
            raise TryLater(f"download {other} is writing {claim.record.path}", BUSY_PATH_DELAY)
        if not path.exists():
            return False
        hashes = await self._in_pool(hash_file, path)
        if claim.record.sha256 is None or hashes.sha256 != claim.record.sha256:
            raise Refused(
                f"{claim.record.path} exists and is another file (SHA256 {hashes.sha256}); "
                "remove it, or give `file` to download another one"
            )
        await self._installed(claim, path, hashes)
        return True

    def _check_space(self, needed: int) -> None:
        """Refused when `needed` more bytes would leave less than DOWNLOAD_RESERVE_BYTES free."""
        folder = self.config.models_dir
        free = shutil.disk_usage(folder).free
        if free - needed < self.config.reserve_bytes:
            raise Refused(
                f"not enough free space on {folder}'s disk: the download needs {needed} more "
                f"bytes and must leave {self.config.reserve_bytes} free "
                f"(A1111_PROXY_DOWNLOAD_RESERVE_BYTES), and {free} are free"
            )

    # --- streaming, with a heartbeat ------------------------------------------------------

    async def _stream(self, claim: DownloadClaim, path: Path) -> str:
        """ "done", "canceled" or "lost" (another worker holds the lease now: leave the files)."""
        record = claim.record
        assert record.url is not None
        part = part_path(path)
        transfer = self.transfer = Transfer(
            self.http,
            Remote(
                record.url,
                allow_private=self.config.allow_private,
                trusted=self.civitai.is_civitai,
                credentials=self.civitai.credentials,
                resolve=self.resolve,
            ),
            part,
            self._pool,
            check_space=self._check_space,
            sleep=self.sleep,
        )
        transfer.total = record.bytes_total
        self._check_space((record.bytes_total or 0) - transfer.done)
        if transfer.done:
            log.info("download %s: resuming %s at byte %d", claim.id, part.name, transfer.done)
        return await self._with_heartbeat(claim, transfer)

    async def _with_heartbeat(self, claim: DownloadClaim, transfer: Transfer) -> str:
        running = asyncio.create_task(transfer.run(), name=f"download {claim.id}")
        speed = Speed()
        try:
            while True:
                await asyncio.wait({running}, timeout=self.config.heartbeat_seconds)
                touch = await self.store.touch(
                    claim,
                    self.config.lease_seconds,
                    bytes_done=transfer.done,
                    bytes_total=transfer.total,
                    speed=speed.update(transfer.done),
                )
                if running.done():
                    running.result()  # raises Refused or TryLater
                    return "done"
                if not touch.held:
                    log.warning("download %s: lease lost; leaving it to its new worker", claim.id)
                    return "lost"
                if touch.cancel:
                    return "canceled"
        finally:
            if not running.done():
                running.cancel()
                await asyncio.gather(running, return_exceptions=True)

    # --- the end --------------------------------------------------------------------------

    async def _install(self, claim: DownloadClaim, path: Path) -> None:
        part = part_path(path)
        hashes = await self._in_pool(hash_file, part, None, suffix=path.suffix)
        expected = claim.record.sha256
        if expected is not None and hashes.sha256 != expected.lower():
            raise Refused(
                f"the downloaded file's SHA256 is {hashes.sha256}, but it should be {expected}: "
                "it was corrupted or changed on the way, and was removed; download it again"
            )
        if path.exists():
            raise Refused(f"{claim.record.path} appeared meanwhile; it was left as it is")
        await self._in_pool(os.replace, part, path)
        await self._installed(claim, path, hashes)

    async def _installed(self, claim: DownloadClaim, path: Path, hashes: FileHashes) -> None:
        """The file is in place: its sidecars, records and refresh (worker/model_install.py), and
        the download's end."""
        record = claim.record
        assert record.kind is not None
        await self.installer.installed(record.kind, record.version, path, hashes)
        size = path.stat().st_size
        await self.store.finish(
            claim, "completed", bytes_done=size, bytes_total=size, sha256=hashes.sha256
        )
        log.info("download %s: %s is in place (%d bytes)", claim.id, record.path, size)

    async def _cancel(self, claim: DownloadClaim) -> None:
        await self._remove_part(claim)
        await self.store.finish(claim, "canceled", "canceled by an admin")
        log.info("download %s: canceled", claim.id)

    async def _remove_part(self, claim: DownloadClaim) -> None:
        record = claim.record
        if record.kind is None or record.path is None:
            return
        try:
            path = place(self.config.models_dir, record.kind, record.path.split("/", 1)[1])
        except ValueError:
            return
        with contextlib.suppress(FileNotFoundError):
            await self._in_pool(os.unlink, part_path(path))

    async def _in_pool(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        call = (lambda: function(*args, **kwargs)) if kwargs else (lambda: function(*args))
        return await asyncio.get_running_loop().run_in_executor(self._pool, call)


class Speed:
    """Bytes per second over the last few heartbeats."""

    def __init__(self, window: int = 8, clock: Callable[[], float] = time.monotonic) -> None:
        self.samples: deque[tuple[float, int]] = deque(maxlen=window)
        self.clock = clock

    def update(self, done: int) -> float | None:
        self.samples.append((self.clock(), done))
        (t0, d0), (t1, d1) = self.samples[0], self.samples[-1]
        return (d1 - d0) / (t1 - t0) if t1 > t0 else None
