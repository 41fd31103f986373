"""A1111 started with --api-auth (the fake A1111 with `api_auth`, a real HTTP server): the worker
built from settings authenticates with A1111_PROXY_A1111_AUTH; without the right pair, its jobs
wait in the queue, and the job and the backend say to set it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

from a1111_proxy.backends import BackendUnavailable
from a1111_proxy.backends.a1111 import A1111Backend
from a1111_proxy.db.engine import Database
from a1111_proxy.jobs import JobRepository, NewJob
from tests.fakes.a1111 import FakeA1111
from tests.servers import serve
from worker.main import build_worker

pytestmark = pytest.mark.anyio

PAIRS = "alice:hunter2,bob:s3cret"  # as --api-auth takes them


@pytest.fixture
def guarded() -> Iterator[tuple[FakeA1111, str]]:
    fake = FakeA1111(service_time=0.02, api_auth=PAIRS)
    with serve(fake.app) as url:
        yield fake, url


def worker_settings(settings_for: Any, database_url: str, url: str, auth: str) -> Any:
    return settings_for(
        database_url=database_url, a1111_urls=url, a1111_auth=auth, civitai_enabled=False
    )


async def submit(db: Database) -> str:
    body = '{"prompt": "a cat", "steps": 5}'
    return (await JobRepository(db).submit(NewJob("txt2img", request=body, payload=body))).job.id


async def test_a_worker_with_the_right_a1111_auth_fetches_the_catalogue_and_runs_jobs(
    db: Database, guarded: tuple[FakeA1111, str], database_url: str, settings_for: Any
) -> None:
    fake, url = guarded
    worker = build_worker(worker_settings(settings_for, database_url, url, "bob:s3cret"), db)
    assert worker.keeper is not None
    assert await worker.keeper.fetch_all(worker.backends) == []  # every backend answered
    job_id = await submit(db)
    await worker.run_until_empty()

    row = await JobRepository(db).get(job_id)
    assert row is not None and row.status == "completed" and row.image_count == 1
    assert fake.refused == [] and len(fake.completed) == 1


@pytest.mark.parametrize(
    ("auth", "says"),
    [
        ("", "requires a user and password (it runs with --api-auth) and none is set"),
        ("alice:wrong", "refused the user and password in A1111_PROXY_A1111_AUTH"),
    ],
)
async def test_without_the_right_a1111_auth_the_job_waits_and_says_to_set_it(
    db: Database,
    guarded: tuple[FakeA1111, str],
    database_url: str,
    settings_for: Any,
    auth: str,
    says: str,
) -> None:
    fake, url = guarded
    worker = build_worker(worker_settings(settings_for, database_url, url, auth), db)
    job_id = await submit(db)
    await worker.run_until_empty()  # it tried once; the job waits out its backoff

    row = await JobRepository(db).get(job_id)
    assert row is not None and row.status == "queued" and row.attempts == 1
    assert row.error is not None and row.error["code"] == "backend_unavailable"
    assert row.error["backend_status"] == 401 and row.error["backend"] == url
    message = row.error["message"]
    assert says in message and f"A1111 at {url}" in message
    assert "Set A1111_PROXY_A1111_AUTH=user:password to one of the pairs of its --api-auth" in (
        message
    )
    # The slot rests: no other job goes to that A1111 until a probe finds it answering.
    assert worker.slots[0].state == "down" and fake.completed == []
    assert fake.refused == ["/sdapi/v1/txt2img"]


@pytest.mark.parametrize("auth", [None, ("alice", "wrong")])
async def test_every_call_an_a1111_refuses_for_its_credentials_says_to_set_a1111_auth(
    guarded: tuple[FakeA1111, str], auth: tuple[str, str] | None
) -> None:
    """The progress read is the probe of a resting slot: it fails too, so the slot stays down
    with this message as its last error (/health), instead of looking healthy on a 401."""
    fake, url = guarded
    backend = A1111Backend(url, auth=auth, connect_retries=1)
    try:
        calls: dict[str, Callable[[], Awaitable[object]]] = {
            "generate": lambda: backend.generate("txt2img", {"prompt": "a cat"}),
            "progress": backend.progress,
            "catalogue": lambda: backend.catalogue_entry("sd-models"),
            "refresh": lambda: backend.refresh("checkpoints"),
        }
        for name, call in calls.items():
            with pytest.raises(BackendUnavailable, match="A1111_PROXY_A1111_AUTH") as refused:
                await call()
            assert refused.value.status == 401, name
        # What --api-auth leaves open still answers (the Lora extension's routes).
        assert (await backend.catalogue_entry("loras"))[0]["name"] == "add_detail"
    finally:
        await backend.aclose()
    assert len(fake.refused) == 4 and fake.received == []
