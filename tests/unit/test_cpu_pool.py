"""CpuPool: the API's bounded pool for heavy work on what requests carry."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest

from a1111_proxy.cpu_pool import CpuPool, default_size

pytestmark = pytest.mark.anyio


def test_the_pool_has_at_most_four_threads_and_no_more_than_the_cpus() -> None:
    assert default_size() == min(4, len(os.sched_getaffinity(0)))
    assert CpuPool().size == default_size()


async def test_work_runs_on_the_pools_own_threads_never_more_at_once_than_its_size() -> None:
    """Each task waits until `size` tasks run together: a smaller pool would never get there
    (the barrier breaks), a larger one would run the tasks on more threads."""
    pool = CpuPool(2)
    together = threading.Barrier(2, timeout=30)

    def task() -> str:
        together.wait()
        return threading.current_thread().name

    try:
        names = await asyncio.gather(*(pool.run(task) for _ in range(6)))
    finally:
        pool.close()
    assert len(set(names)) == 2 and all(name.startswith("cpu-pool") for name in names)
