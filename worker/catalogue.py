"""CatalogueKeeper: keeps what the API tells clients about the backends (models, LoRAs, samplers,
options, ...) fresh in the database, so the API never waits on a busy or dead backend."""

from __future__ import annotations

import logging
import time
from typing import Any

from a1111_proxy.backends import REFRESHES, Backend, Refresh
from a1111_proxy.catalogue import (
    CHECKPOINT_REQUEST,
    ENGINE_FACTS,
    ENTRIES,
    PENDING_OPTIONS,
    REFRESH_REQUESTED,
    CatalogueStore,
)

log = logging.getLogger("a1111_proxy.worker")

SECRET_WORDS = ("auth", "token", "password", "secret", "key", "ngrok")
CHECKPOINT_READ_SECONDS = 0.1  # unload/reload requests are looked for at most this often


class CatalogueKeeper:
    def __init__(self, store: CatalogueStore, *, interval: float = 300.0) -> None:
        self.store = store
        self.interval = interval
        self.last_full = float("-inf")
        self.refresh_seen: float | None = None
        self.options_version = 0
        self.options: dict[str, Any] = {}
        # The latest unload/reload request, and its version when this worker first looked: a
        # request older than the worker is not applied again.
        self.checkpoint_request: dict[str, Any] | None = None
        self.checkpoint_baseline: int | None = None
        self._checkpoint_read_at = float("-inf")

    async def tick(self, usable: list[Backend]) -> list[Backend]:
        """Refresh when asked or when stale; pick up options waiting to be applied. Returns the
        backends that answered nothing (the worker rests them as down)."""
        await self._read_pending_options()
        request = await self.store.get_control(REFRESH_REQUESTED)
        if self.refresh_seen is None:  # do not redo a request older than this worker
            self.refresh_seen = request["at"] if request else 0.0
        elif request and request["at"] != self.refresh_seen:
            self.refresh_seen = request["at"]
            await self._refresh_backends(usable, request.get("what") or list(REFRESHES))
            return await self.fetch_all(usable)
        if time.monotonic() - self.last_full >= self.interval:
            return await self.fetch_all(usable)
        return []

    async def fetch_all(self, usable: list[Backend]) -> list[Backend]:
        """Fetch every entry from the first backend that answers. A backend that answers none is
        returned as silent and the next is tried; with none answering, the next check tries
        again (a catalogue is never left unfetched for CATALOGUE_SECONDS)."""
        silent: list[Backend] = []
        for backend in usable:
            if await self._fetch_from(backend):
                self.last_full = time.monotonic()
                break
            silent.append(backend)
        return silent

    async def _fetch_from(self, backend: Backend) -> bool:
        fetched, failure = 0, None
        for name in (*ENTRIES, *ENGINE_FACTS):
            try:
                body = await backend.catalogue_entry(name)
            except Exception as exc:
                log.debug("catalogue %s from %s failed: %s", name, backend.name, exc)
                failure = exc
                if fetched == 0:
                    break  # the first entry failed: the backend is not answering at all
                continue
            if body is not None:
                await self.store.put(
                    name, redact(body) if name == "cmd-flags" else body, backend.name
                )
                fetched += 1
        if fetched == 0 and failure is not None:
            log.warning(
                "catalogue: %s did not answer (%s); the API keeps serving the last "
                "catalogue it had; is A1111 running with --api?",
                backend.name,
                failure,
            )
            return False
        log.info("catalogue: fetched %d entries from %s", fetched, backend.name)
        return True

    async def read_checkpoint_request(self) -> None:
        """Look for a new unload/reload request (cheap; at most every CHECKPOINT_READ_SECONDS)."""
        now = time.monotonic()
        if now - self._checkpoint_read_at < CHECKPOINT_READ_SECONDS:
            return
        self._checkpoint_read_at = now
        request = await self.store.get_control(CHECKPOINT_REQUEST)
        if self.checkpoint_baseline is None:
            self.checkpoint_baseline = request["version"] if request else 0
        self.checkpoint_request = request

    async def refresh_memory(self, backend: Backend) -> None:
        """Refetch /memory (and the engine's device facts) after an unload or reload, so they
        show the memory freed or used and the models loaded."""
        for name in ("memory", *ENGINE_FACTS):
            try:
                body = await backend.catalogue_entry(name)
            except Exception as exc:
                log.debug("%s from %s failed: %s", name, backend.name, exc)
                continue
            if body is not None:
                await self.store.put(name, body, backend.name)

    async def _refresh_backends(self, usable: list[Backend], what: list[Refresh]) -> None:
        for backend in usable:
            for item in what:
                try:
                    await backend.refresh(item)
                except Exception as exc:
                    log.warning("refresh %s on %s failed: %s", item, backend.name, exc)

    async def _read_pending_options(self) -> None:
        pending = await self.store.get_control(PENDING_OPTIONS)
        if pending and pending["version"] != self.options_version:
            self.options_version, self.options = pending["version"], pending["options"]


def redact(value: Any) -> Any:
    """cmd-flags without credentials (A1111 leaks --api-auth, --gradio-auth, --ngrok and
    ngrok_options' basic_auth there), at any depth."""
    if isinstance(value, list):
        return [redact(item) for item in value]
    if not isinstance(value, dict):
        return value
    return {
        key: "<redacted>" if item and _secret(key) and not isinstance(item, dict) else redact(item)
        for key, item in value.items()
    }


def _secret(key: str) -> bool:
    return any(word in key.lower() for word in SECRET_WORDS)
