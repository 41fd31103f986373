"""The webhook side of the HTTP API on a real server: submitting with webhook fields, the delivery
log, redelivery, and the signing secret never showing anywhere."""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from a1111_proxy.app import create_app
from a1111_proxy.cli import PARAMETER_LOGGERS
from a1111_proxy.db.tables import webhook_attempts, webhook_deliveries
from a1111_proxy.jobs import JobRepository
from a1111_proxy.wakeup import make_wakeup
from a1111_proxy.webhooks import RetryPolicy
from tests.fakes.a1111 import FakeA1111
from tests.fakes.webhook_sink import WebhookSink
from tests.integration.test_worker import a1111 as a1111_backend
from tests.integration.test_worker import make_worker
from tests.servers import ASYNC, serve
from worker.sender import SenderConfig, WebhookSender

pytestmark = pytest.mark.anyio

SECRET = "whsec_" + base64.b64encode(b"never-show-me-0123456789").decode()
DEFAULT_SECRET = "default-secret-never-shown"


@pytest.fixture
def a1111() -> Iterator[str]:
    with serve(FakeA1111(service_time=0.02).app) as url:
        yield url


@pytest.fixture
async def api(sqlite_url: str, settings_for: Any) -> AsyncIterator[httpx.AsyncClient]:
    settings = settings_for(database_url=sqlite_url, webhook_secret=DEFAULT_SECRET)
    with serve(create_app(settings)) as url:
        async with httpx.AsyncClient(base_url=url, headers=ASYNC) as client:
            yield client


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    """These tests run on the SQLite file only (`repo` and the API share it)."""
    return sqlite_url


async def run_worker_and_sender(repo: JobRepository, a1111: str, sqlite_url: str) -> None:
    await make_worker(repo, [a1111_backend(a1111)], sqlite_url).run_until_empty()
    await send_due(repo, sqlite_url)


async def send_due(repo: JobRepository, sqlite_url: str) -> None:
    config = SenderConfig(
        allow_private=True,
        default_secret=DEFAULT_SECRET,
        timeout_seconds=2,
        policy=RetryPolicy(schedule=(0, 0.01, 0.01), rng=lambda: 0.5),
    )
    sender = WebhookSender(repo, make_wakeup(sqlite_url, 0.005), config)
    await sender.run_until_idle()
    await asyncio.sleep(0.05)  # the scheduled retries come due
    await sender.run_until_idle()
    await sender.aclose()


async def submit(api: httpx.AsyncClient, hook: str, **fields: Any) -> str:
    response = await api.post(
        "/sdapi/v1/txt2img",
        json={"prompt": "cat", "webhook_url": hook, "webhook_secret": SECRET, **fields},
    )
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


async def test_the_delivery_log_shows_each_attempt_with_its_answer_and_timing(
    api: httpx.AsyncClient,
    repo: JobRepository,
    sink: tuple[WebhookSink, str],
    a1111: str,
    sqlite_url: str,
) -> None:
    receiver, url = sink
    receiver.answer(500, body="busy, try later")
    job_id = await submit(api, f"{url}/hook")
    await run_worker_and_sender(repo, a1111, sqlite_url)

    log = (await api.get(f"/sdapi/v1/jobs/{job_id}/webhooks")).json()
    assert log["job_id"] == job_id
    [delivery] = log["deliveries"]
    assert delivery["type"] == "job.completed" and delivery["status"] == "delivered"
    assert delivery["id"] == receiver.received[0].headers["webhook-id"]
    assert delivery["url"] == f"{url}/hook" and delivery["delivered_at"].endswith("Z")
    first, second = delivery["attempts"]
    assert (first["status_code"], first["response_body"]) == (500, "busy, try later")
    assert "not a 2xx" in first["error"] and second["status_code"] == 200
    assert second["error"] is None and second["address"] == "127.0.0.1"
    assert all(
        isinstance(a["duration_ms"], int) and a["started_at"].endswith("Z")
        for a in delivery["attempts"]
    )
    assert [a["trigger"] for a in delivery["attempts"]] == ["scheduled", "scheduled"]


async def test_redeliver_sends_the_same_message_signed_anew_as_one_manual_attempt(
    api: httpx.AsyncClient,
    repo: JobRepository,
    sink: tuple[WebhookSink, str],
    a1111: str,
    sqlite_url: str,
) -> None:
    receiver, url = sink
    job_id = await submit(api, f"{url}/hook")
    await run_worker_and_sender(repo, a1111, sqlite_url)
    receiver.always(500)

    again = await api.post(f"/sdapi/v1/jobs/{job_id}/webhooks/redeliver")
    assert again.status_code == 202
    assert again.json()["trigger"] == "manual" and again.json()["status"] == "pending"
    await send_due(repo, sqlite_url)
    first, second = receiver.received
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    assert first.body == second.body
    second.verify(SECRET)
    [delivery] = (await api.get(f"/sdapi/v1/jobs/{job_id}/webhooks")).json()["deliveries"]
    assert delivery["status"] == "failed" and delivery["next_attempt_at"] is None  # no retries
    assert [a["trigger"] for a in delivery["attempts"]] == ["scheduled", "manual"]

    receiver.always(200)
    chosen = await api.post(
        f"/sdapi/v1/jobs/{job_id}/webhooks/redeliver", json={"delivery_id": delivery["id"]}
    )
    assert chosen.status_code == 202
    await send_due(repo, sqlite_url)
    assert len(receiver.received) == 3
    [delivery] = (await api.get(f"/sdapi/v1/jobs/{job_id}/webhooks")).json()["deliveries"]
    assert delivery["status"] == "delivered"


async def test_redeliver_says_404_when_there_is_nothing_to_send_and_422_for_a_bad_body(
    api: httpx.AsyncClient,
) -> None:
    plain = (await api.post("/sdapi/v1/txt2img", json={"prompt": "cat"})).json()["id"]
    nothing = await api.post(f"/sdapi/v1/jobs/{plain}/webhooks/redeliver")
    assert nothing.status_code == 404 and nothing.json()["code"] == "delivery_not_found"
    unknown = await api.post("/sdapi/v1/jobs/nope/webhooks/redeliver")
    assert unknown.status_code == 404 and unknown.json()["code"] == "job_not_found"
    assert (await api.get("/sdapi/v1/jobs/nope/webhooks")).status_code == 404
    assert (await api.get(f"/sdapi/v1/jobs/{plain}/webhooks")).json()["deliveries"] == []
    bad = await api.post(f"/sdapi/v1/jobs/{plain}/webhooks/redeliver", json={"delivery_id": 5})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "delivery_id"]


async def test_the_signing_secrets_never_appear_in_answers_payloads_stored_rows_or_logs(
    api: httpx.AsyncClient,
    repo: JobRepository,
    sink: tuple[WebhookSink, str],
    a1111: str,
    sqlite_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    for name in PARAMETER_LOGGERS:  # as the CLI sets them: they log SQL parameters
        caplog.set_level(logging.WARNING, logger=name)
    receiver, url = sink
    receiver.answer(500)
    created = await api.post(
        "/sdapi/v1/txt2img",
        json={
            "prompt": "cat",
            "webhook_url": f"{url}/hook",
            "webhook_secret": SECRET,
            "webhook_events": ["started", "progress", "completed"],
        },
    )
    job_id = created.json()["id"]
    without = await submit(api, f"{url}/default", webhook_secret=None)
    await run_worker_and_sender(repo, a1111, sqlite_url)
    answers = [
        created.text,
        (await api.get(f"/sdapi/v1/jobs/{job_id}")).text,
        (await api.get("/sdapi/v1/jobs")).text,
        (await api.get(f"/sdapi/v1/jobs/{job_id}/webhooks")).text,
        (await api.post(f"/sdapi/v1/jobs/{job_id}/webhooks/redeliver")).text,
        (await api.get(f"/sdapi/v1/jobs/{without}/webhooks")).text,
    ]
    async with repo.db.reading() as conn:
        rows = [
            str(r)
            for table in (webhook_deliveries, webhook_attempts)
            for r in (await conn.execute(select(table))).all()
        ]
    assert receiver.at("/hook") and receiver.at("/default")
    received = [r.body.decode() + str(r.headers) for r in receiver.received]
    key = base64.b64decode(SECRET[6:]).decode()
    for text in [*answers, *rows, *received, caplog.text]:
        for secret in (SECRET, SECRET[6:], key, DEFAULT_SECRET):
            assert secret not in text


@pytest.mark.parametrize(
    ("fields", "loc"),
    [
        ({"webhook_url": "https://user:pw@hooks.example/in"}, "webhook_url"),
        ({"webhook_url": "ftp://hooks.example/in"}, "webhook_url"),
        ({"webhook_url": "https://hooks.example/" + "a" * 2100}, "webhook_url"),
        ({"webhook_url": "https://hooks.example:99999/in"}, "webhook_url"),
        ({"webhook_url": "https:///in"}, "webhook_url"),
        ({"webhook_url": "https://hooks.example/a b"}, "webhook_url"),
        (
            {"webhook_url": "https://hooks.example/in", "webhook_secret": "whsec_%%%"},
            "webhook_secret",
        ),
        ({"webhook_url": "https://hooks.example/in", "webhook_secret": ""}, "webhook_secret"),
        (
            {"webhook_url": "https://hooks.example/in", "webhook_events": ["finished"]},
            "webhook_events",
        ),
    ],
)
async def test_webhook_fields_are_checked_at_submit_with_a_422_naming_the_field(
    api: httpx.AsyncClient, fields: dict[str, Any], loc: str
) -> None:
    response = await api.post("/sdapi/v1/txt2img", json={"prompt": "cat", **fields})
    assert response.status_code == 422
    assert [e["loc"][1] for e in response.json()["detail"]] == [loc]
    assert "whsec_%%%" not in response.text
