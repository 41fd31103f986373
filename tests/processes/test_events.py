"""Live job events (SSE) with real processes: two API processes and a worker over one database
(a SQLite file, then PostgreSQL), a fake A1111 on loopback. The API that streams is never the
one that took the job: it learns everything from the database."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from datetime import datetime

import httpx
import pytest

from tests.fakes.a1111 import FakeA1111
from tests.servers import ASYNC, serve, wait_for
from tests.sse import FINAL, follow, named, parse
from tests.stack import Stack

pytestmark = pytest.mark.slow


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Stack, httpx.Client]]:
    """Two API processes and a worker, for the whole module (processes are slow to start):
    (the stack, whose `api` is the second API process; a client of the first one)."""
    tmp = tmp_path_factory.mktemp(f"events-{request.param}")
    url = request.getfixturevalue("postgres_url") if request.param == "postgres" else None
    fake = FakeA1111(service_time=0.05)
    with serve(fake.app) as a1111:
        made = Stack(tmp, [a1111], url, A1111_PROXY_SSE_PING_SECONDS="0.3")
        try:
            first = made.start_api()
            made.api = None  # keep the first client open; start_api would close it
            made.start_api()
            made.start_worker()
            yield made, first
        finally:
            first.close()
            made.close()


def submit(client: httpx.Client, **body: object) -> str:
    response = client.post("/sdapi/v1/txt2img", json={"prompt": "cat", "steps": 10, **body})
    assert response.status_code == 202, response.text
    return response.json()["id"]


@contextlib.contextmanager
def slot_taken(client: httpx.Client) -> Iterator[None]:
    """The worker's only slot runs a long job meanwhile, so jobs submitted now wait."""
    blocker = submit(client, fake_seconds=60, priority=100)
    wait_for(
        lambda: client.get(f"/sdapi/v1/jobs/{blocker}").json()["status"] == "processing",
        what="the blocker to start",
    )
    try:
        yield
    finally:
        client.post(f"/sdapi/v1/jobs/{blocker}/cancel")


def test_a_stream_shows_status_progress_with_previews_and_ends_with_the_finished_job(
    stack: tuple[Stack, httpx.Client],
) -> None:
    made, first = stack
    job_id = submit(first, fake_seconds=2.5)
    events = follow(made.api, job_id)  # the other API process
    assert events[0].event == "status" and events[0].data["id"] == job_id
    statuses = [e.data["status"] for e in named(events, "status")]
    assert statuses[-1] == "completed" and "processing" in statuses
    progress = named(events, "progress")
    assert len(progress) >= 3
    assert all(e.data["steps"] == 10 and 0 <= e.data["step"] <= 10 for e in progress)
    assert [e.data["progress"] for e in progress] == sorted(e.data["progress"] for e in progress)
    previews = [e.data["preview"] for e in progress if e.data["preview"]]
    assert previews and all(p.startswith("data:image/png;base64,iVBOR") for p in previews)
    final = events[-1]
    assert final.event == "completed" and final.id == "1-completed"
    job = made.job(job_id)
    # At most one progress event every 250 ms of the job's run, as the server timed it (the
    # worker stores progress every 100 ms; a slower machine only sends fewer).
    ran = _seconds(job["completed_at"]) - _seconds(job["started_at"])
    assert len(progress) <= ran / 0.25 + 3, (len(progress), ran)
    assert final.data == job | {"queue_position": None}  # exactly the job, images included
    assert len(final.data["result"]["images"]) == 1
    assert all(e.id for e in events if e.event != "ping")


def test_a_canceled_job_ends_its_stream_with_a_canceled_event(
    stack: tuple[Stack, httpx.Client],
) -> None:
    made, first = stack
    with slot_taken(first):
        job_id = submit(first)
        assert first.post(f"/sdapi/v1/jobs/{job_id}/cancel").json()["status"] == "canceled"
    events = follow(made.api, job_id)
    assert [e.event for e in events if e.event != "ping"] == ["status", "canceled"]
    assert events[-1].data["error"]["code"] == "canceled"


def test_last_event_id_resumes_without_old_events_and_sends_a_final_event_it_missed(
    stack: tuple[Stack, httpx.Client],
) -> None:
    made, first = stack
    job_id = submit(first, fake_seconds=1.5)
    seen = follow(made.api, job_id, stop=("progress",))
    last = seen[-1].id
    assert last is not None and last.startswith("1-processing-")
    # Reconnecting: no status again for the state it knows, no old progress; the rest comes.
    resumed = follow(made.api, job_id, last_event_id=last)
    assert next(e.event for e in resumed if e.event != "ping") == "progress"
    assert resumed[-1].event == "completed"
    # A client that saw it running but missed the end gets the end.
    missed = follow(made.api, job_id, last_event_id=last)
    assert [e.event for e in missed if e.event != "ping"] == ["status", "completed"]
    assert [e.id for e in missed if e.event != "ping"] == ["1-completed-0", "1-completed"]
    # One that saw the final status but not the final event gets just that event.
    final = follow(made.api, job_id, last_event_id="1-completed-0")
    assert [e.event for e in final if e.event != "ping"] == ["completed"]
    # One that has the final event is told there is nothing more (EventSource stops on 204).
    done = made.api.get(f"/sdapi/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "1-completed"})
    assert done.status_code == 204


def test_an_idle_stream_gets_heartbeat_comments(stack: tuple[Stack, httpx.Client]) -> None:
    made, first = stack
    with slot_taken(first):
        job_id = submit(first)  # it waits: nothing happens
        with made.api.stream("GET", f"/sdapi/v1/jobs/{job_id}/events") as response:
            events = []
            for event in parse(response.iter_lines()):
                events.append(event)
                if len(named(events, "ping")) == 2:
                    break
        first.post(f"/sdapi/v1/jobs/{job_id}/cancel")
    # Two pings within the client's 10 s read timeout: the configured 0.3 s, not the default 15 s.
    pings = named(events, "ping")
    assert pings[0].data == "ping" and named(events, "status", "progress") == events[:1]


def test_events_of_an_unknown_job_are_404(stack: tuple[Stack, httpx.Client]) -> None:
    made, _ = stack
    response = made.api.get("/sdapi/v1/jobs/no-such-job/events")
    assert response.status_code == 404 and response.json()["code"] == "job_not_found"


def test_many_streams_share_the_database_and_leave_the_api_responsive(
    stack: tuple[Stack, httpx.Client],
) -> None:
    """More streams than the connection pool has connections (20 on PostgreSQL, 4 readers on
    SQLite), open at once, some dropped by their clients; the API answers meanwhile and every
    stream that stays gets the end."""
    made, first = stack
    taken = slot_taken(first)
    taken.__enter__()
    job_id = submit(first, fake_seconds=0.5)

    async def scenario() -> list[list[str]]:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(
            base_url=made.base, timeout=30, limits=limits, headers=ASYNC
        ) as client:

            async def one(keep: bool) -> list[str]:
                names = []
                async with client.stream("GET", f"/sdapi/v1/jobs/{job_id}/events") as response:
                    async for event in _aparse(response):
                        names.append(event.event)
                        if not keep and event.event == "status":
                            return names  # the client goes away mid-stream
                        if event.event in FINAL:
                            break
                return names

            streams = [asyncio.create_task(one(keep=i % 4 != 0)) for i in range(40)]
            await asyncio.sleep(1.0)
            # Answered while every kept stream is still open (they end only once the job runs).
            listing = await client.get("/sdapi/v1/jobs", timeout=10)
            assert listing.status_code == 200
            assert not any(s.done() for i, s in enumerate(streams) if i % 4 != 0)
            taken.__exit__(None, None, None)  # the job runs now
            return await asyncio.wait_for(asyncio.gather(*streams), 40)

    results = asyncio.run(scenario())
    kept = [names for i, names in enumerate(results) if i % 4 != 0]
    assert all(names[-1] == "completed" for names in kept)
    assert made.api.get("/health").json()["database"] == "ok"


async def _aparse(response: httpx.Response):  # type: ignore[no-untyped-def]
    lines: list[str] = []
    async for line in response.aiter_lines():
        lines.append(line)
        if line == "":
            for event in parse(lines):
                yield event
            lines = []


def _seconds(stamp: str) -> float:
    return datetime.fromisoformat(stamp).timestamp()
