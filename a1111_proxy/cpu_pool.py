"""CpuPool: the API process's one bounded pool for heavy work on what requests carry.

Decoding base64 images, reading their headers, resizing them (opt-in) and inflating PNG text
take CPU time that must not be spent on the event loop (every other request, /ready included,
would wait), nor on an unbounded number of threads (a burst of image requests would take every
core). The lifespan makes one pool of `default_size()` threads and passes it to the routes;
work beyond that queues, in order.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

MAX_THREADS = 4


def default_size() -> int:
    """min(4, the CPUs this process may use): image work never takes every core of a big host,
    and never more threads than a small one has."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_THREADS, cores))


class CpuPool:
    def __init__(self, size: int | None = None) -> None:
        self.size = size or default_size()
        self._executor = ThreadPoolExecutor(self.size, thread_name_prefix="cpu-pool")

    async def run(self, function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """`function(*args, **kwargs)` on one of the pool's threads; the caller's task waits
        without holding the event loop."""
        call = functools.partial(function, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    def close(self) -> None:
        """Stop taking work; what runs finishes on its thread, what waits is dropped."""
        self._executor.shutdown(wait=False, cancel_futures=True)
