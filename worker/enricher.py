"""CivitaiEnricher: asks Civitai about every checkpoint and LoRA the catalogue lists, by file hash,
and keeps the answers in the database for the API to show as `civitai`.

Only hashes with no answer yet, or one older than the TTL, are asked (a 404 is an answer too: "not
on Civitai"). When Civitai is down, rate-limits past its retries, or cannot be reached, the round
ends, the enricher says so once, rests, and asks again later; stale answers stay shown meanwhile.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable

from a1111_proxy.catalogue import CatalogueStore
from a1111_proxy.civitai import CivitaiClient, CivitaiError, CivitaiUnavailable
from a1111_proxy.model_info import CATALOGUE_KINDS, FileIndex, ModelInfoStore, wanted_hashes

log = logging.getLogger("a1111_proxy.worker")

ASK_AGAIN_SECONDS = 3600.0  # after an answer we could not use (a 400, not JSON)


class CivitaiEnricher:
    def __init__(
        self,
        catalogue: CatalogueStore,
        info: ModelInfoStore,
        client: CivitaiClient,
        *,
        ttl: float,
        interval: float = 10.0,
        rest_seconds: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.catalogue = catalogue
        self.info = info
        self.client = client
        self.ttl = ttl
        self.interval = interval
        self.rest_seconds = rest_seconds
        self.clock = clock
        self.resume_at = 0.0
        self.unavailable = False
        self._refused: dict[str, float] = {}  # hash -> when to ask again (answers we cannot use)

    async def tick(self) -> None:
        """Ask Civitai about each hash that is due, one after another, until one fails."""
        if self.clock() < self.resume_at:
            return
        for hash_ in await self.due():
            if await self._answered_meanwhile(hash_):
                continue
            if not await self._look_up(hash_):
                return

    async def due(self) -> list[str]:
        """Hashes in the catalogue with no answer, or an expired one. Shuffled: workers that
        share a database then rarely ask about the same hash at once."""
        catalogue = {name: await self.catalogue.get(name) for name in CATALOGUE_KINDS}
        wanted = wanted_hashes(catalogue, FileIndex(await self.info.files()))
        known = await self.info.lookups(wanted)
        now = self.clock()
        due = [
            h
            for h in wanted
            if (h not in known or known[h].expires_at <= now) and self._refused.get(h, 0) <= now
        ]
        random.shuffle(due)
        return due

    async def aclose(self) -> None:
        await self.client.aclose()

    async def _answered_meanwhile(self, hash_: str) -> bool:
        """Another worker may have asked since this round began."""
        answer = (await self.info.lookups([hash_])).get(hash_)
        return answer is not None and answer.expires_at > self.clock()

    async def _look_up(self, hash_: str) -> bool:
        try:
            summary = await self.client.version(hash_)
        except CivitaiUnavailable as exc:
            self._rest(exc)
            return False
        except CivitaiError as exc:
            log.warning("civitai: no usable answer for %s (%s); asking again later", hash_, exc)
            self._refused[hash_] = self.clock() + ASK_AGAIN_SECONDS
            return True
        await self.info.save_lookup(hash_, summary, self.ttl)
        if self.unavailable:
            log.info("civitai: answering again")
            self.unavailable = False
        log.debug("civitai: %s is %s", hash_, summary["model_name"] if summary else "unknown there")
        return True

    def _rest(self, exc: CivitaiUnavailable) -> None:
        rest = max(self.rest_seconds, exc.retry_after or 0.0)
        self.resume_at = self.clock() + rest
        if not self.unavailable:  # say it once, not every round
            log.warning(
                "civitai: unavailable (%s); model metadata waits; asking again in %.0f s", exc, rest
            )
            self.unavailable = True
