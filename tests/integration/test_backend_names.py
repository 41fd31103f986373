"""Backends are stored and shown by their names without credentials (redaction.backend_name):
what the store writes at a claim and a heartbeat, and rows an older version wrote with the
URL's `user:password@` in them, read back through every view of the API."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from sqlalchemy import select, update

from a1111_proxy.app import create_app
from a1111_proxy.db.engine import Database
from a1111_proxy.db.tables import jobs, workers
from a1111_proxy.jobs import JobRepository, NewJob
from tests.claims import claim_next
from tests.servers import ASYNC, serve

SECRET = "pw-secret-0042"
RAW = f"http://sd-user:{SECRET}@10.0.0.5:7860"
SHOWN = "http://10.0.0.5:7860"


def _job() -> NewJob:
    body = json.dumps({"prompt": "a fox"})
    return NewJob("txt2img", request=body, payload=body)


@pytest.mark.anyio
async def test_a_claim_and_a_heartbeat_store_the_backend_without_its_credentials(
    repo: JobRepository, db: Database
) -> None:
    job = (await repo.submit(_job())).job
    claim = await claim_next(repo, "w1", RAW + "/")
    assert claim is not None and claim.backend == SHOWN
    await repo.beat_worker("w1", 0.0, [{"backend": RAW, "state": "down", "last_error": RAW}])
    async with db.reading() as conn:
        stored = (await conn.execute(select(jobs.c.backend).where(jobs.c.id == job.id))).scalar()
        slots = (await conn.execute(select(workers.c.slots))).scalar()
    assert stored == SHOWN
    assert SECRET not in slots and json.loads(slots)[0]["backend"] == SHOWN
    assert await repo.busy_elsewhere("w2", [RAW]) == {SHOWN}  # compared by the shown name


async def _written_by_an_older_version(url: str) -> str:
    """A running job and a worker's heartbeat that name the backend with its credentials."""
    db = Database(url)
    repo = JobRepository(db)
    job = (await repo.submit(_job())).job
    assert await claim_next(repo, "w1", "http://elsewhere") is not None
    slot = {"backend": RAW, "state": "busy", "last_error": f"{RAW} refused"}
    await repo.beat_worker("w1", 0.0, [slot])
    async with db.writing() as conn:
        await conn.execute(update(jobs).values(backend=RAW))
        await conn.execute(update(workers).values(slots=json.dumps([slot])))
    await db.dispose()
    return job.id


def test_rows_stored_with_credentials_are_shown_without_them(
    database_url: str,
    settings_for,  # type: ignore[no-untyped-def]
) -> None:
    job_id = asyncio.run(_written_by_an_older_version(database_url))
    settings = settings_for(database_url=database_url)
    with serve(create_app(settings)) as url, httpx.Client(base_url=url, headers=ASYNC) as api:
        views = {
            path: api.get(path)
            for path in (
                "/health",
                f"/sdapi/v1/jobs/{job_id}",
                "/sdapi/v1/jobs",
                "/sdapi/v1/queue",
                "/metrics",
            )
        }
    for path, response in views.items():
        assert response.status_code in (200, 503), (path, response.text)
        assert SECRET not in response.text, path
        assert SHOWN in response.text, path
    assert views[f"/sdapi/v1/jobs/{job_id}"].json()["backend"] == SHOWN
