"""The queue view of an API in this process, over a real database (SQLite, then PostgreSQL). The
queue with real API and worker processes is in tests/processes/test_queue.py."""

from __future__ import annotations

from typing import Any

import httpx

from tests.servers import serve


def test_workers_that_share_a1111_urls_count_each_backend_once_in_the_estimate(
    database_url: str, settings_for: Any
) -> None:
    import asyncio
    import time

    from a1111_proxy.app import create_app
    from a1111_proxy.db.engine import Database
    from a1111_proxy.jobs import JobRepository

    async def three_workers_on_two_a1111s() -> None:
        db = Database(database_url)
        repo = JobRepository(db)
        slots = [{"backend": url, "state": "idle"} for url in ("http://a:7860", "http://b:7860")]
        for worker in ("w1", "w2", "w3"):
            await repo.beat_worker(worker, time.time(), slots)
        await db.dispose()

    asyncio.run(three_workers_on_two_a1111s())
    with serve(create_app(settings_for(database_url=database_url))) as base:
        assert httpx.get(f"{base}/sdapi/v1/queue").json()["slots"] == 2
