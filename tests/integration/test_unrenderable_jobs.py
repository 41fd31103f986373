"""A stored job that cannot be shown whole (a damaged JSON column, a value JSON cannot carry) is
shown with `render_error` and the fields that did render, by every view (the list, the job, its
event stream, its webhooks, a held request's answer), logged once: never a 500."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from a1111_proxy.app import create_app
from a1111_proxy.db.engine import Database
from a1111_proxy.db.tables import jobs
from a1111_proxy.jobs import JobRepository, NewJob, error_json
from a1111_proxy.routes.jobs import a1111_answer
from a1111_proxy.wakeup import make_wakeup
from tests.claims import claim_next
from tests.fakes.webhook_sink import WebhookSink
from tests.servers import ASYNC, serve
from tests.sse import follow
from worker.sender import SenderConfig, WebhookSender

DAMAGE = {
    # A column cut short, or not the JSON object it should hold.
    "cut_request": {"request": '{"prompt": "a fo'},
    "bad_events": {"webhook_events": "not json"},
    # Values Python's JSON reader takes and no JSON answer can carry.
    "nan_result": {"result": '{"images": [], "info": NaN}'},
    "surrogate_error": {"error": '{"code": "backend_rejected", "message": "\\ud800"}'},
}


def _job(hook: str | None = None) -> NewJob:
    body = json.dumps({"prompt": "a fox", "steps": 4})
    return NewJob(
        "txt2img",
        request=body,
        payload=body,
        webhook_url=hook,
        webhook_events='["started"]' if hook else None,
    )


async def _damaged_jobs(url: str) -> dict[str, str]:
    """One job per kind of damage (finished, so their streams end), and a sound one."""
    db = Database(url)
    repo = JobRepository(db)
    ids = {}
    for name, columns in {**DAMAGE, "sound": {}}.items():
        ids[name] = (await repo.submit(_job())).job.id
        claim = await claim_next(repo, "w1", "http://a")
        assert claim is not None
        await repo.finish(claim, "error", error_json("backend_rejected", "no"))
        if columns:
            async with db.writing() as conn:
                await conn.execute(update(jobs).where(jobs.c.id == ids[name]).values(**columns))
    await db.dispose()
    return ids


@pytest.fixture
def damaged(database_url: str, settings_for) -> Iterator[tuple[httpx.Client, dict[str, str]]]:  # type: ignore[no-untyped-def]
    ids = asyncio.run(_damaged_jobs(database_url))
    with serve(create_app(settings_for(database_url=database_url))) as url:
        with httpx.Client(base_url=url, headers=ASYNC, timeout=30) as api:
            yield api, ids


def _assert_shown_without_its_json(view: dict[str, Any], job_id: str) -> None:
    assert view["id"] == job_id and view["status"] == "error" and view["attempts"] == 1
    assert view["created_at"].endswith("Z") and view["completed_at"].endswith("Z")
    assert view["render_error"].startswith("this job's stored data cannot be shown")
    assert view["request"] == {} and view["result"] is None and view["error"] is None


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_job_is_shown_with_a_render_error_by_its_view_and_its_stream(
    damaged: tuple[httpx.Client, dict[str, str]], damage: str
) -> None:
    api, ids = damaged
    response = api.get(f"/sdapi/v1/jobs/{ids[damage]}")
    assert response.status_code == 200, response.text
    _assert_shown_without_its_json(response.json(), ids[damage])
    [*_, final] = follow(api, ids[damage])
    assert final.event == "error"
    _assert_shown_without_its_json(final.data, ids[damage])


def test_the_list_shows_damaged_jobs_beside_the_sound_ones(
    damaged: tuple[httpx.Client, dict[str, str]], caplog: pytest.LogCaptureFixture
) -> None:
    api, ids = damaged
    with caplog.at_level(logging.ERROR, "a1111_proxy.jobs"):
        first, again = api.get("/sdapi/v1/jobs"), api.get("/sdapi/v1/jobs")
    assert first.status_code == again.status_code == 200, first.text
    listed = {job["id"]: job for job in first.json()["jobs"]}
    assert set(listed) == set(ids.values())
    for name in ("cut_request", "bad_events", "surrogate_error"):
        _assert_shown_without_its_json(listed[ids[name]], ids[name])
    # A listing never shows results: the one with a NaN in its result lists whole.
    assert (
        "render_error" not in listed[ids["nan_result"]]
        and "render_error" not in listed[ids["sound"]]
    )
    assert listed[ids["sound"]]["request"] == {"prompt": "a fox", "steps": 4}
    logged = [r for r in caplog.records if ids["cut_request"] in r.getMessage()]
    assert len(logged) == 1 and "cannot be shown" in logged[0].getMessage()


@pytest.mark.anyio
async def test_a_held_request_gets_an_error_answer_for_a_job_that_cannot_be_shown(
    repo: JobRepository, db: Database
) -> None:
    job = (await repo.submit(_job())).job
    claim = await claim_next(repo, "w1", "http://a")
    assert claim is not None and await repo.complete(claim, {"images": []}, [])
    async with db.writing() as conn:
        await conn.execute(update(jobs).values(result='{"images": [], "info": NaN}'))
    answer = a1111_answer(await repo.get(job.id), [], {})
    assert answer.status_code == 500
    body = json.loads(answer.body)
    assert body["code"] == "internal_error" and body["job_id"] == job.id
    assert "cannot be shown" in body["detail"]


@pytest.mark.anyio
async def test_a_webhook_for_a_job_that_cannot_be_shown_carries_the_render_error(
    repo: JobRepository,
    db: Database,
    database_url: str,
    sink: tuple[WebhookSink, str],
) -> None:
    receiver, url = sink
    job = (await repo.submit(_job(f"{url}/hook"))).job
    async with db.writing() as conn:
        await conn.execute(update(jobs).values(request="[1, 2"))
    assert await claim_next(repo, "w1", "http://a") is not None  # the `started` message
    config = SenderConfig(allow_private=True, idle_seconds=0.02, timeout_seconds=2.0)
    sender = WebhookSender(repo, make_wakeup(database_url, 0.005), config)
    await sender.run_until_idle()
    await sender.aclose()
    [hook] = receiver.received
    payload = json.loads(hook.body)
    assert payload["type"] == "job.started" and payload["data"]["id"] == job.id
    assert payload["data"]["status"] == "processing" and payload["data"]["render_error"]
