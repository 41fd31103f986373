"""Webhook delivery end to end: the worker, the outbox, the sender and a real receiver on loopback,
on SQLite and PostgreSQL. Receivers verify with the `standardwebhooks` library."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import pytest

from a1111_proxy.jobs import JobRepository, NewJob
from a1111_proxy.wakeup import NOTIFY_CHANNEL, OUTBOX_CHANNEL, make_wakeup
from a1111_proxy.webhooks import RetryPolicy
from tests.claims import claim_next
from tests.fakes.a1111 import FakeA1111
from tests.fakes.clock import Clock
from tests.fakes.webhook_sink import WebhookSink
from tests.integration.test_worker import a1111 as a1111_backend
from tests.integration.test_worker import make_worker
from tests.servers import serve
from worker.execute import Timing
from worker.sender import SenderConfig, WebhookSender

pytestmark = pytest.mark.anyio

JOB_SECRET = "whsec_" + base64.b64encode(b"job-secret-0123456789abcdef").decode()
DEFAULT_SECRET = "a plain default secret"
FAST_RETRIES = RetryPolicy(schedule=(0, 0.05, 0.05, 0.05), rng=lambda: 0.5)


@pytest.fixture
def repo_options() -> dict[str, Any]:
    return {"max_attempts": 3, "lease_seconds": 5}


@pytest.fixture
def a1111() -> Iterator[tuple[FakeA1111, str]]:
    fake = FakeA1111(service_time=0.05)
    with serve(fake.app) as url:
        yield fake, url


@pytest.fixture
def sender_for(database_url: str) -> Iterator[Callable[..., WebhookSender]]:
    def make(
        repo: JobRepository, *, clock: Callable[[], float] = time.time, **config: Any
    ) -> WebhookSender:
        settings = {
            "allow_private": True,
            "default_secret": DEFAULT_SECRET,
            "idle_seconds": 0.02,
            "timeout_seconds": 2.0,
            "stop_grace_seconds": 0.2,
            "policy": FAST_RETRIES,
            **config,
        }
        return WebhookSender(
            repo, make_wakeup(database_url, 0.005), SenderConfig(**settings), clock=clock
        )

    yield make


async def submit(
    repo: JobRepository,
    hook: str | None,
    *,
    events: list[str] | None = None,
    secret: str | None = JOB_SECRET,
    **body: object,
) -> str:
    text = json.dumps({"prompt": "a cat", **body})
    new = NewJob(
        "txt2img",
        request=text,
        payload=text,
        webhook_url=hook,
        webhook_secret=secret,
        webhook_events=json.dumps(events or ["completed"]) if hook else None,
    )
    return (await repo.submit(new)).job.id


async def deliveries(repo: JobRepository, job_id: str) -> list[tuple[Any, list[Any]]]:
    row = await repo.get(job_id)
    return await repo.deliveries.for_job(row.seq)


async def wait_until(check: Callable[[], Any], timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.01)


async def test_a_completed_job_is_announced_once_signed_so_standardwebhooks_verifies_it(
    repo: JobRepository,
    a1111: tuple[FakeA1111, str],
    sink: tuple[WebhookSink, str],
    database_url: str,
    sender_for: Callable[..., WebhookSender],
) -> None:
    receiver, url = sink
    job_id = await submit(repo, f"{url}/hook", seed=3)
    await make_worker(repo, [a1111_backend(a1111[1])], database_url).run_until_empty()
    sender = sender_for(repo)
    await sender.run_until_idle()
    await sender.aclose()

    [hook] = receiver.received
    payload = hook.verify(JOB_SECRET)
    assert payload["type"] == "job.completed" and payload["timestamp"].endswith("Z")
    job = payload["data"]
    assert job["id"] == job_id and job["status"] == "completed" and job["error"] is None
    [image] = job["result"]["images"]
    assert base64.b64decode(image).startswith(b"\x89PNG")
    assert json.loads(job["result"]["info"])["seed"] == 3
    assert job["webhook"] == {"url": f"{url}/hook", "events": ["completed"]}
    assert JOB_SECRET not in hook.body.decode() and JOB_SECRET[6:] not in hook.body.decode()
    [(delivery, [attempt])] = await deliveries(repo, job_id)
    assert hook.headers["webhook-id"] == delivery.id and delivery.id.startswith("msg_")
    assert delivery.status == "delivered" and attempt.status_code == 200
    assert attempt.address == "127.0.0.1" and attempt.response_body == "ok"
    assert hook.headers["content-type"] == "application/json"


async def test_without_a_job_secret_the_default_secret_signs_as_utf8_bytes(
    repo: JobRepository,
    a1111: tuple[FakeA1111, str],
    sink: tuple[WebhookSink, str],
    database_url: str,
    sender_for: Callable[..., WebhookSender],
) -> None:
    receiver, url = sink
    await submit(repo, f"{url}/hook", secret=None)
    await make_worker(repo, [a1111_backend(a1111[1])], database_url).run_until_empty()
    sender = sender_for(repo)
    await sender.run_until_idle()
    await sender.aclose()
    [hook] = receiver.received
    assert hook.verify(DEFAULT_SECRET.encode())["data"]["status"] == "completed"


async def test_failed_and_canceled_jobs_are_announced_with_their_terminal_status(
    repo: JobRepository,
    a1111: tuple[FakeA1111, str],
    sink: tuple[WebhookSink, str],
    database_url: str,
    sender_for: Callable[..., WebhookSender],
) -> None:
    receiver, url = sink
    fake, a1111_url = a1111
    fake.fail_next(1, status=422, body={"error": "HTTPException", "detail": "bad sampler"})
    failed = await submit(repo, f"{url}/failed")
    await make_worker(repo, [a1111_backend(a1111_url)], database_url).run_until_empty()
    canceled = await submit(repo, f"{url}/canceled")
    await repo.cancel(canceled)
    sender = sender_for(repo)
    await sender.run_until_idle()
    await sender.aclose()

    [error_hook] = receiver.at("/failed")
    data = error_hook.verify(JOB_SECRET)["data"]
    assert data["id"] == failed and data["status"] == "error"
    assert "bad sampler" in data["error"]["message"] and data["result"] is None
    [cancel_hook] = receiver.at("/canceled")
    data = cancel_hook.verify(JOB_SECRET)["data"]
    assert data["id"] == canceled and data["status"] == "canceled"


async def test_a_job_lost_by_its_worker_past_its_attempts_is_announced_as_an_error(
    repo: JobRepository,
    sink: tuple[WebhookSink, str],
    sender_for: Callable[..., WebhookSender],
) -> None:
    receiver, url = sink
    doomed = JobRepository(repo.db, max_attempts=1, lease_seconds=0.01)
    job_id = await submit(doomed, f"{url}/hook")
    assert await claim_next(doomed, "doomed", "b") is not None  # its worker dies holding it
    await asyncio.sleep(0.05)
    assert await repo.reap_expired() == [(job_id, "error")]
    sender = sender_for(repo)
    await sender.run_until_idle()
    await sender.aclose()
    [hook] = receiver.received
    data = hook.verify(JOB_SECRET)["data"]
    assert data["id"] == job_id and data["status"] == "error"
    assert data["error"]["code"] == "worker_lost"


async def test_started_and_progress_are_sent_only_when_asked_and_progress_at_most_twice_a_second(
    repo: JobRepository,
    a1111: tuple[FakeA1111, str],
    sink: tuple[WebhookSink, str],
    database_url: str,
    sender_for: Callable[..., WebhookSender],
) -> None:
    receiver, url = sink
    quiet = await submit(repo, f"{url}/quiet")
    chatty = await submit(
        repo, f"{url}/chatty", events=["started", "progress", "completed"], fake_seconds=2.5
    )
    sender = sender_for(repo)
    sending = asyncio.create_task(sender.run())
    worker = make_worker(repo, [a1111_backend(a1111[1])], database_url)
    worker.timing = Timing(progress_seconds=0.2, heartbeat_seconds=1, stall_seconds=5)
    await worker.run_until_empty()
    await wait_until(lambda: _delivered(repo, chatty, "completed"))
    sender.stop()
    await sending

    assert [r.verify(JOB_SECRET)["type"] for r in receiver.at("/quiet")] == ["job.completed"]
    types = [r.verify(JOB_SECRET)["type"] for r in receiver.at("/chatty")]
    assert types[0] == "job.started" and types[-1] == "job.completed"
    # A message still pending when a newer one is queued is superseded (each is a full
    # snapshot), so a sender held up for the whole job would send none: the job runs 2.5 s.
    made_all = [(d.event, d.status, d.attempts) for d, _ in await deliveries(repo, chatty)]
    assert set(types[1:-1]) == {"job.progress"} and len(types) >= 3, made_all
    progress = [r.verify(JOB_SECRET)["data"] for r in receiver.at("/chatty")][1:-1]
    assert all(p["status"] == "processing" for p in progress)
    assert [p["progress"] for p in progress] == sorted(p["progress"] for p in progress)
    made = [d for d, _ in await deliveries(repo, chatty) if d.event == "progress"]
    gaps = [b.occurred_at - a.occurred_at for a, b in itertools.pairwise(made)]
    assert all(gap >= 0.5 for gap in gaps)  # throttled to 2 a second
    assert not [d for d, _ in await deliveries(repo, quiet) if d.event != "completed"]


async def test_a_newer_message_supersedes_pending_started_and_progress_ones(
    repo: JobRepository,
    sink: tuple[WebhookSink, str],
) -> None:
    clock = Clock(1000.0)
    repo = JobRepository(repo.db, max_attempts=3, lease_seconds=5, clock=clock)
    job_id = await submit(repo, f"{sink[1]}/hook", events=["started", "progress", "completed"])
    claim = await claim_next(repo, "w", "b")
    assert claim is not None
    await repo.touch(claim, progress=0.2)
    clock.advance(0.1)
    await repo.touch(claim, progress=0.3)  # throttled: no message
    clock.advance(0.5)
    await repo.touch(claim, progress=0.6)
    assert [(d.event, d.status) for d, _ in await deliveries(repo, job_id)] == [
        ("started", "superseded"),
        ("progress", "superseded"),
        ("progress", "pending"),
    ]
    await repo.complete(claim, {"images": [], "parameters": {}, "info": "{}"}, [])
    assert [(d.event, d.status) for d, _ in await deliveries(repo, job_id)] == [
        ("started", "superseded"),
        ("progress", "superseded"),
        ("progress", "superseded"),
        ("completed", "pending"),
    ]


async def test_a_job_claimed_again_supersedes_the_unsent_started_message_of_its_attempt_before(
    repo: JobRepository,
) -> None:
    """The claim queues `started` in its own statement on PostgreSQL (in autocommit): it must
    do what the transaction's announce() does, message ids and superseding included."""
    job_id = await submit(repo, "http://127.0.0.1:9/hook", events=["started", "completed"])
    first = await claim_next(repo, "w", "b")
    assert first is not None
    assert await repo.release(first)  # back in the queue (a worker shutting down)
    second = await claim_next(repo, "w", "b")
    assert second is not None and second.token != first.token
    messages = [d for d, _ in await deliveries(repo, job_id)]
    assert [(d.event, d.status) for d in messages] == [
        ("started", "superseded"),
        ("started", "pending"),
    ]
    assert all(re.fullmatch("msg_[0-9a-f]{32}", d.id) for d in messages)
    assert len({d.id for d in messages}) == 2


async def test_a_claim_wakes_the_sender_only_when_it_queued_a_started_message(
    repo: JobRepository, database_url: str
) -> None:
    """PostgreSQL: the senders listen on OUTBOX_CHANNEL (and the API on NOTIFY_CHANNEL); a
    claim NOTIFYs them only when it queued a message."""
    if repo.db.is_sqlite:
        pytest.skip("SQLite has no channels: a waiter sees every commit (data_version)")
    heard: list[str] = []
    listener = await asyncpg.connect(database_url.replace("postgresql+asyncpg", "postgresql"))
    try:
        await submit(repo, None)
        await submit(repo, "http://127.0.0.1:9/hook", events=["started"])
        for channel in (NOTIFY_CHANNEL, OUTBOX_CHANNEL):
            await listener.add_listener(channel, lambda *args: heard.append(args[2]))
        assert await claim_next(repo, "w", "b") is not None  # the job without a webhook
        await listener.execute("SELECT 1")  # a round trip: what was sent before has arrived
        assert heard == []
        assert await claim_next(repo, "w", "c") is not None  # the job with one
        async with asyncio.timeout(30):
            while len(heard) < 2:
                await asyncio.sleep(0.01)
        assert sorted(heard) == sorted([NOTIFY_CHANNEL, OUTBOX_CHANNEL])
    finally:
        await listener.close()


async def test_a_job_that_ended_while_no_sender_ran_is_announced_when_one_starts(
    repo: JobRepository,
    a1111: tuple[FakeA1111, str],
    sink: tuple[WebhookSink, str],
    database_url: str,
    sender_for: Callable[..., WebhookSender],
) -> None:
    receiver, url = sink
    job_id = await submit(repo, f"{url}/hook")
    await make_worker(repo, [a1111_backend(a1111[1])], database_url).run_until_empty()
    [(pending, _)] = await deliveries(repo, job_id)
    assert pending.status == "pending" and receiver.received == []  # committed with the job
    # A sender takes it and dies mid-send: its lease runs out and the next sender sends it.
    [taken] = await repo.deliveries.claim(10, lease_seconds=0.05)
    await asyncio.sleep(0.1)
    sender = sender_for(repo)
    await sender.run_until_idle()
    await sender.aclose()
    [hook] = receiver.received
    assert hook.verify(JOB_SECRET)["data"]["id"] == job_id
    assert hook.headers["webhook-id"] == taken.id
    [(delivery, [attempt])] = await deliveries(repo, job_id)
    assert delivery.status == "delivered" and attempt.number == 2


async def test_a_dead_receiver_delays_neither_job_completion_nor_cancellation(
    repo: JobRepository,
    a1111: tuple[FakeA1111, str],
    sink: tuple[WebhookSink, str],
    database_url: str,
    sender_for: Callable[..., WebhookSender],
) -> None:
    receiver, url = sink
    receiver.always(hang=True)  # each request hangs until the sender's timeout, an hour
    sender = sender_for(repo, timeout_seconds=3600)
    sending = asyncio.create_task(sender.run())
    every = ["started", "progress", "completed"]
    ids = [await submit(repo, f"{url}/hook", events=every, fake_seconds=0.3) for _ in range(3)]
    # Three 0.3 s jobs, with hooks hanging all along: done well before any hook could end.
    await asyncio.wait_for(
        make_worker(repo, [a1111_backend(a1111[1])], database_url).run_until_empty(), 60
    )
    assert {(await repo.get(i)).status for i in ids} == {"completed"}
    await wait_until(lambda: _async(len(receiver.received) >= 3))
    queued = await submit(repo, f"{url}/hook", events=every)
    assert (await asyncio.wait_for(repo.cancel(queued), 30)).status == "canceled"
    hooks = [delivery for i in ids for delivery, _ in await deliveries(repo, i)]
    assert hooks and not any(d.status == "delivered" for d in hooks)  # all still hanging
    sender.stop()
    await asyncio.wait_for(sending, 10)


async def test_a_slow_host_gets_at_most_per_host_requests_at_once_while_others_go_on(
    repo: JobRepository,
    sink: tuple[WebhookSink, str],
    sender_for: Callable[..., WebhookSender],
) -> None:
    slow, url = sink
    slow.always(hang=True)
    fast = WebhookSink()
    with serve(fast.app) as fast_url:
        ids = [await submit(repo, hook) for hook in [f"{url}/slow"] * 5 + [f"{fast_url}/fast"] * 3]
        for job_id in ids:
            await repo.cancel(job_id)
        sender = sender_for(repo, per_host=2, timeout_seconds=30)
        sending = asyncio.create_task(sender.run())
        await wait_until(lambda: _async(len(fast.received) == 3))
        await asyncio.sleep(0.2)
        assert len(slow.received) == 2  # the other three wait for the slow host's turn
        sender.stop()
        await asyncio.wait_for(sending, 10)
    # Stopped mid-send or before sending, they go back to the outbox for the next sender.
    for job_id in ids[:5]:
        [(delivery, _)] = await deliveries(repo, job_id)
        assert delivery.status == "pending" and delivery.lease_token is None


async def test_a_500_answer_is_retried_with_a_fresh_signature_and_the_same_webhook_id(
    repo: JobRepository,
    a1111: tuple[FakeA1111, str],
    sink: tuple[WebhookSink, str],
    database_url: str,
    sender_for: Callable[..., WebhookSender],
) -> None:
    receiver, url = sink
    receiver.answer(500, body="down for maintenance")
    receiver.hang()
    job_id = await submit(repo, f"{url}/hook")
    await make_worker(repo, [a1111_backend(a1111[1])], database_url).run_until_empty()
    later = itertools.count()
    sender = sender_for(repo, timeout_seconds=0.3, clock=lambda: time.time() + 2 * next(later))
    sending = asyncio.create_task(sender.run())
    await wait_until(lambda: _delivered(repo, job_id, "completed"))
    sender.stop()
    await sending

    hooks = receiver.received
    assert len(hooks) == 3
    assert len({h.headers["webhook-id"] for h in hooks}) == 1
    assert len({h.headers["webhook-timestamp"] for h in hooks}) == 3
    assert len({h.headers["webhook-signature"] for h in hooks}) == 3
    assert len({h.body for h in hooks}) == 1  # the same message, byte for byte
    for hook in hooks:
        hook.verify(JOB_SECRET)
    [(delivery, attempts)] = await deliveries(repo, job_id)
    assert [a.status_code for a in attempts] == [500, None, 200]
    assert attempts[0].response_body == "down for maintenance"
    assert attempts[1].error.startswith("timeout")
    assert [a.number for a in attempts] == [1, 2, 3] and delivery.attempts == 3


async def test_a_failed_attempt_schedules_the_next_one_durably_on_the_schedule(
    repo: JobRepository,
    sink: tuple[WebhookSink, str],
    sender_for: Callable[..., WebhookSender],
) -> None:
    receiver, url = sink
    receiver.always(503)
    job_id = await submit(repo, f"{url}/hook")
    await repo.cancel(job_id)
    sender = sender_for(repo, policy=RetryPolicy(rng=lambda: 1.0))  # the real schedule, +20 %
    before = time.time()
    await sender.run_until_idle()
    await sender.aclose()
    [(delivery, [attempt])] = await deliveries(repo, job_id)
    assert delivery.status == "pending" and attempt.status_code == 503
    assert before + 6.0 <= delivery.next_attempt_at <= time.time() + 6.0  # 5 s + 20 %
    assert delivery.last_status_code == 503


async def test_retry_after_is_honoured(
    repo: JobRepository,
    sink: tuple[WebhookSink, str],
    sender_for: Callable[..., WebhookSender],
) -> None:
    receiver, url = sink
    receiver.answer(429, headers={"Retry-After": "120"})
    job_id = await submit(repo, f"{url}/hook")
    await repo.cancel(job_id)
    sender = sender_for(repo, policy=RetryPolicy())
    before = time.time()
    await sender.run_until_idle()
    await sender.aclose()
    [(delivery, _)] = await deliveries(repo, job_id)
    assert delivery.status == "pending" and delivery.next_attempt_at >= before + 120


async def test_a_redirect_is_a_failed_attempt_and_is_not_followed(
    repo: JobRepository,
    sink: tuple[WebhookSink, str],
    sender_for: Callable[..., WebhookSender],
) -> None:
    receiver, url = sink
    receiver.answer(302, headers={"Location": f"{url}/elsewhere"})
    receiver.always(500)
    job_id = await submit(repo, f"{url}/hook")
    await repo.cancel(job_id)
    sender = sender_for(repo, policy=RetryPolicy())
    await sender.run_until_idle()
    await sender.aclose()
    assert len(receiver.at("/hook")) == 1 and receiver.at("/elsewhere") == []
    [(delivery, [attempt])] = await deliveries(repo, job_id)
    assert delivery.status == "pending" and attempt.status_code == 302
    assert "redirects are not followed" in attempt.error


async def test_410_gone_stops_the_retries(
    repo: JobRepository,
    sink: tuple[WebhookSink, str],
    sender_for: Callable[..., WebhookSender],
) -> None:
    receiver, url = sink
    receiver.always(410)
    job_id = await submit(repo, f"{url}/hook")
    await repo.cancel(job_id)
    sender = sender_for(repo)
    await sender.run_until_idle()
    await asyncio.sleep(0.2)
    await sender.run_until_idle()
    await sender.aclose()
    [(delivery, [attempt])] = await deliveries(repo, job_id)
    assert delivery.status == "failed" and delivery.next_attempt_at is None
    assert attempt.status_code == 410 and len(receiver.received) == 1


async def test_the_retries_end_when_the_schedule_is_used_up(
    repo: JobRepository,
    sink: tuple[WebhookSink, str],
    sender_for: Callable[..., WebhookSender],
) -> None:
    receiver, url = sink
    receiver.always(500)
    job_id = await submit(repo, f"{url}/hook")
    await repo.cancel(job_id)
    sender = sender_for(repo)
    sending = asyncio.create_task(sender.run())
    await wait_until(lambda: _status_of(repo, job_id, "failed"))
    sender.stop()
    await sending
    [(_, attempts)] = await deliveries(repo, job_id)
    assert len(attempts) == len(FAST_RETRIES.schedule) == len(receiver.received)


async def test_the_sender_looks_often_only_while_a_message_is_outstanding(
    repo: JobRepository, sender_for: Callable[..., WebhookSender]
) -> None:
    """A message waiting for its retry becomes due by time alone; with none outstanding, only
    a wake-up (a message queued) brings work, so the sender does not read 4 times a second."""
    sender = sender_for(repo, idle_seconds=0.02, quiet_seconds=7.0)
    assert await sender._idle_seconds() == 7.0
    await repo.cancel(await submit(repo, "http://127.0.0.1:9/hook"))  # `completed` is queued
    assert await sender._idle_seconds() == 0.02


async def test_started_and_progress_messages_are_tried_once(
    repo: JobRepository,
    sink: tuple[WebhookSink, str],
    sender_for: Callable[..., WebhookSender],
) -> None:
    receiver, url = sink
    receiver.always(500)
    job_id = await submit(repo, f"{url}/hook", events=["started"])
    assert await claim_next(repo, "w", "b") is not None
    sender = sender_for(repo)
    await sender.run_until_idle()
    await asyncio.sleep(0.2)
    await sender.run_until_idle()
    await sender.aclose()
    [(delivery, [attempt])] = await deliveries(repo, job_id)
    assert delivery.event == "started" and delivery.status == "failed"
    assert attempt.status_code == 500 and len(receiver.received) == 1


async def test_the_ssrf_guard_refuses_a_loopback_receiver_unless_private_addresses_are_allowed(
    repo: JobRepository,
    sink: tuple[WebhookSink, str],
    sender_for: Callable[..., WebhookSender],
) -> None:
    receiver, url = sink
    by_ip = await submit(repo, f"{url}/hook")
    by_name = await submit(repo, url.replace("127.0.0.1", "localhost") + "/hook")
    for job_id in (by_ip, by_name):
        await repo.cancel(job_id)
    sender = sender_for(repo, allow_private=False)
    await sender.run_until_idle()
    await sender.aclose()
    assert receiver.received == []
    for job_id in (by_ip, by_name):
        [(delivery, [attempt])] = await deliveries(repo, job_id)
        assert delivery.status == "failed" and attempt.error.startswith("blocked:")
        assert "WEBHOOK_ALLOW_PRIVATE" in attempt.error


async def test_a_host_name_is_connected_to_at_the_address_that_was_checked(
    repo: JobRepository,
    sink: tuple[WebhookSink, str],
    sender_for: Callable[..., WebhookSender],
) -> None:
    receiver, url = sink
    job_id = await submit(repo, url.replace("127.0.0.1", "localhost") + "/hook")
    await repo.cancel(job_id)
    sender = sender_for(repo)
    await sender.run_until_idle()
    await sender.aclose()
    [hook] = receiver.received
    assert hook.headers["host"] == url.replace("http://127.0.0.1", "localhost")
    [(_, [attempt])] = await deliveries(repo, job_id)
    assert attempt.address in ("127.0.0.1", "::1")


async def test_images_can_be_sent_as_absolute_urls_or_left_out(
    repo: JobRepository,
    a1111: tuple[FakeA1111, str],
    sink: tuple[WebhookSink, str],
    database_url: str,
    sender_for: Callable[..., WebhookSender],
) -> None:
    receiver, url = sink
    job_id = await submit(repo, f"{url}/hook")
    await make_worker(repo, [a1111_backend(a1111[1])], database_url).run_until_empty()
    for mode in ("url", "none"):
        sender = sender_for(repo, images=mode, public_url="https://proxy.example/")
        await repo.deliveries.redeliver((await repo.get(job_id)).seq, None)
        await sender.run_until_idle()
        await sender.aclose()
    by_url, without = (r.verify(JOB_SECRET)["data"] for r in receiver.received)
    assert by_url["result"]["images"] == [] and by_url["image_urls"] == [
        f"https://proxy.example/sdapi/v1/jobs/{job_id}/images/0"
    ]
    assert without["result"]["images"] == []
    assert without["image_urls"] == [f"/sdapi/v1/jobs/{job_id}/images/0"]


async def _delivered(repo: JobRepository, job_id: str, event: str) -> bool:
    return any(
        d.event == event and d.status == "delivered" for d, _ in await deliveries(repo, job_id)
    )


async def _status_of(repo: JobRepository, job_id: str, status: str) -> bool:
    return any(d.status == status for d, _ in await deliveries(repo, job_id))


async def _async(value: object) -> object:
    return value


@pytest.mark.parametrize("bad", ["http://0177.0.0.1/hook", "http://256.0.0.1/hook"])
async def test_a_stored_url_the_client_cannot_parse_is_a_failed_attempt_not_a_stuck_delivery(
    repo: JobRepository, sender_for: Callable[..., WebhookSender], bad: str
) -> None:
    # Such URLs are refused at submit now; jobs stored before that must still end.
    job_id = await submit(repo, bad)
    claim = await claim_next(repo, "w", "slot")
    assert claim is not None
    await repo.finish(claim, "error", json.dumps({"code": "x", "message": "y"}))
    sender = sender_for(repo)
    await sender.run_until_idle()
    await sender.aclose()
    [(delivery, attempts)] = await deliveries(repo, job_id)
    assert delivery.status in ("pending", "failed") and attempts
    assert "cannot send to this URL" in (attempts[-1].error or "")


async def test_a_started_message_whose_sender_died_is_superseded_not_sent_after_completed(
    repo: JobRepository,
    sink: tuple[WebhookSink, str],
) -> None:
    clock = Clock(1000.0)
    repo = JobRepository(repo.db, max_attempts=3, lease_seconds=5, clock=clock)
    job_id = await submit(repo, f"{sink[1]}/hook", events=["started", "completed"])
    claim = await claim_next(repo, "w", "b")
    assert claim is not None
    [started] = await repo.deliveries.claim(10, lease_seconds=30)  # its sender dies sending it
    assert started.event == "started"
    await repo.complete(claim, {"images": [], "parameters": {}, "info": "{}"}, [])
    assert await repo.deliveries.claim(10, lease_seconds=30) == []  # completed waits its turn
    clock.advance(31)
    # Both were due: sent side by side, the old snapshot could reach the receiver last.
    [completed] = await repo.deliveries.claim(10, lease_seconds=30)
    assert completed.event == "completed"
    assert [(d.event, d.status) for d, _ in await deliveries(repo, job_id)] == [
        ("started", "superseded"),
        ("completed", "sending"),
    ]
