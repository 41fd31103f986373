"""Webhooks with real processes: `a1111-proxy serve` and `worker`, a receiver on loopback."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes.a1111 import FakeA1111
from tests.fakes.webhook_sink import WebhookSink
from tests.servers import serve, wait_for
from tests.stack import Stack

pytestmark = pytest.mark.slow

SECRET = "whsec_" + base64.b64encode(b"process-test-secret-0123").decode()
JOB_SECRET = "a job's own secret, never logged"


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[Stack, WebhookSink, str]]:
    fake, receiver = FakeA1111(service_time=0.05), WebhookSink()
    with serve(fake.app) as a1111, serve(receiver.app) as hooks:
        made = Stack(tmp_path, [a1111])
        made.env.update(
            {
                "A1111_PROXY_WEBHOOK_ALLOW_PRIVATE": "true",
                "A1111_PROXY_WEBHOOK_SECRET": SECRET,
                "A1111_PROXY_LOG_LEVEL": "debug",
            }
        )
        try:
            yield made, receiver, hooks
        finally:
            made.close()


def test_the_worker_process_delivers_signed_webhooks_and_never_logs_the_secret(
    stack: tuple[Stack, WebhookSink, str],
) -> None:
    made, receiver, hooks = stack
    api = made.start_api()
    worker = made.start_worker()
    # A second-long job: a `started` still unsent when the job ends is superseded by `completed`.
    job_id = made.submit(
        webhook_url=f"{hooks}/done",
        webhook_events=["started", "completed"],
        webhook_secret=JOB_SECRET,
        fake_seconds=1.0,
    )
    made.wait_status(job_id, "completed")
    wait_for(lambda: len(receiver.at("/done")) == 2, what="two webhooks")
    started, completed = (r.verify(JOB_SECRET.encode()) for r in receiver.at("/done"))
    assert (started["type"], completed["type"]) == ("job.started", "job.completed")
    assert len(completed["data"]["result"]["images"]) == 1
    log = wait_for(
        lambda: (
            (d := api.get(f"/sdapi/v1/jobs/{job_id}/webhooks").json()["deliveries"])
            and all(x["status"] == "delivered" for x in d)
            and d
        ),
        what="the log",
    )
    assert [d["type"] for d in log] == ["job.started", "job.completed"]
    assert worker.stop() == 0
    logs = "".join(proc.log_path.read_text() for proc in made.procs)
    assert "job.completed of job" in logs  # the debug log was written
    for secret in (SECRET, SECRET[6:], JOB_SECRET):
        assert secret not in logs


def test_a_message_written_while_no_worker_ran_is_sent_when_one_starts(
    stack: tuple[Stack, WebhookSink, str],
) -> None:
    made, receiver, hooks = stack
    api = made.start_api()
    job_id = made.submit(webhook_url=f"{hooks}/canceled")
    assert api.post(f"/sdapi/v1/jobs/{job_id}/cancel").json()["status"] == "canceled"
    [pending] = api.get(f"/sdapi/v1/jobs/{job_id}/webhooks").json()["deliveries"]
    assert pending["status"] == "pending" and receiver.received == []
    made.start_worker()
    [hook] = wait_for(lambda: receiver.at("/canceled"), what="the webhook")
    assert hook.verify(SECRET)["data"]["status"] == "canceled"
    assert hook.headers["webhook-id"] == pending["id"]
