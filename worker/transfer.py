"""Transfer: streams one file into its `.part` file, resuming with `Range` from what is there.

Every request goes through the egress guard (`egress.stream`: each redirect hop checked, the
Civitai site trusted and the only host given the token). A part file left by a dropped
connection, a restart or a dead worker is resumed: `Range: bytes=<its size>-`. A server that
answers 200 instead of 206 sends the whole file, so the part file starts over; one that answers
416 for a part file as long as the file has nothing more to send.

A dropped connection or a 429/5xx is retried at once when the last try brought bytes, else after
a growing wait; RETRIES tries in a row without a byte give the download back to the queue
(`TryLater`). What cannot get better by trying (401, 404, a refused address) is `Refused`.
Disk writes run in the caller's thread pool, never on the event loop.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

import httpx

from a1111_proxy import egress

T = TypeVar("T")

RETRIES = 4
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_UNSATISFIED = re.compile(r"^bytes \*/(\d+)$")


class Refused(Exception):
    """The download cannot succeed by trying again: it fails with this message."""


class TryLater(Exception):
    """The download may succeed later: it goes back to the queue for `delay` seconds."""

    def __init__(self, message: str, delay: float) -> None:
        super().__init__(message)
        self.delay = delay


class _Retry(Exception):
    """This request failed in a way worth trying again at once."""


@dataclass(frozen=True)
class Remote:
    """Where the file comes from, and how to ask for it."""

    url: str
    allow_private: bool  # WEBHOOK_ALLOW_PRIVATE: internal hosts allowed for every URL
    trusted: Callable[[str], bool]  # the Civitai site: may be internal, gets `credentials`
    credentials: dict[str, str]
    resolve: egress.Resolver = egress.system_resolve


class Transfer:
    def __init__(
        self,
        client: httpx.AsyncClient,
        remote: Remote,
        part: Path,
        pool: Executor,
        *,
        check_space: Callable[[int], None] = lambda needed: None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.client = client
        self.remote = remote
        self.part = part
        self.pool = pool
        self.check_space = check_space  # raises Refused when `needed` more bytes do not fit
        self.sleep = sleep
        self.done = part.stat().st_size if part.exists() else 0
        self.total: int | None = None
        self.ranges: list[int] = []  # the offset each request asked from (0: no Range)

    async def run(self) -> None:
        """Until the whole file is in the part file; raises Refused or TryLater."""
        failures = 0
        while True:
            before = self.done
            try:
                await self._once()
                return
            except _Retry as exc:
                failures = 0 if self.done > before else failures + 1
                if failures >= RETRIES:
                    raise TryLater(f"the download keeps failing: {exc}", 60.0) from None
                await self.sleep(0 if failures == 0 else min(30.0, 2.0**failures))

    async def _once(self) -> None:
        offset = self.done
        self.ranges.append(offset)
        headers = {"Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            async with egress.stream(
                self.client,
                self.remote.url,
                allow_private=self.remote.allow_private,
                headers=headers,
                trusted=self.remote.trusted,
                trusted_headers=self.remote.credentials,
                resolve=self.remote.resolve,
            ) as response:
                await self._receive(response, offset)
        except egress.Blocked as exc:
            raise Refused(f"blocked: {exc}") from None
        except egress.Unresolvable as exc:
            raise _Retry(str(exc)) from None
        except (httpx.TooManyRedirects, httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
            raise Refused(f"{type(exc).__name__}: {exc}") from None
        except httpx.TransportError as exc:
            raise _Retry(f"{type(exc).__name__}: {exc or 'the connection failed'}") from None

    async def _receive(self, response: httpx.Response, offset: int) -> None:
        start = self._start(response, offset)
        if start is None:
            return  # 416 for a complete part file
        self.check_space(self.total - start if self.total is not None else 0)
        file = await self._in_pool(_open, self.part, start)
        self.done = start
        try:
            async for chunk in response.aiter_raw():
                await self._in_pool(_append, file, chunk)
                self.done += len(chunk)
                if self.total is not None and self.done > self.total:
                    raise Refused(f"the server sent more than the {self.total} bytes it announced")
        finally:
            await self._in_pool(_close, file)
        if self.total is not None and self.done < self.total:
            raise _Retry(f"the answer ended at {self.done} of {self.total} bytes")

    def _start(self, response: httpx.Response, offset: int) -> int | None:
        """Where this answer's body starts in the file (and `total`); None: nothing to get."""
        status = response.status_code
        if status == 200:
            self.total = _int(response.headers.get("content-length"))
            return 0  # the whole file, whatever was asked
        if status == 206:
            return self._partial(response.headers.get("content-range", ""), offset)
        if status == 416:
            found = _UNSATISFIED.match(response.headers.get("content-range", ""))
            if found and int(found[1]) == offset:
                self.total = offset
                return None
            self.done = 0  # the part file is not a start of this file: start over
            os.truncate(self.part, 0)
            raise _Retry("the part file does not fit the file; starting over")
        raise self._refusal(response)

    def _partial(self, content_range: str, offset: int) -> int:
        found = _CONTENT_RANGE.match(content_range)
        if found is None or int(found[1]) != offset:
            self.done = 0
            os.truncate(self.part, 0)
            raise _Retry(f"the server answered another range ({content_range!r}); starting over")
        self.total = None if found[3] == "*" else int(found[3])
        return offset

    def _refusal(self, response: httpx.Response) -> Exception:
        status, host = response.status_code, httpx.URL(self.remote.url).host
        if status == 429 or status >= 500:
            return _Retry(f"{host} answered HTTP {status}")
        if status in (401, 403):
            hint = ""
            if self.remote.trusted(self.remote.url):
                hint = (
                    ": the model may need a Civitai login or early access; set "
                    "A1111_PROXY_CIVITAI_TOKEN to a Civitai API key that may download it"
                )
            return Refused(f"{host} refused the download (HTTP {status}){hint}")
        if status in (404, 410):
            return Refused(f"{host} has no such file (HTTP {status})")
        return Refused(f"{host} answered HTTP {status} to the download")

    async def _in_pool(self, function: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.pool, function, *args)


def _open(part: Path, start: int) -> BinaryIO:
    """The part file, cut at `start` (0: emptied), ready to append."""
    file = part.open("r+b" if part.exists() else "wb")
    file.truncate(start)
    file.seek(start)
    return file


def _append(file: BinaryIO, chunk: bytes) -> None:
    """Into the OS at once: a worker killed now leaves a part file as long as `done` says."""
    file.write(chunk)
    file.flush()


def _close(file: BinaryIO) -> None:
    """Everything written is on the disk before the file is checked and renamed."""
    try:
        file.flush()
        os.fsync(file.fileno())
    finally:
        file.close()


def _int(value: str | None) -> int | None:
    return int(value) if value and value.isdigit() else None
