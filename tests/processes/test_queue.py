"""The queue view, deadlines and retention with real processes (`serve`, `worker`), a fake A1111
and a webhook receiver on loopback; the queue on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from tests.fakes.a1111 import FakeA1111
from tests.fakes.webhook_sink import WebhookSink
from tests.servers import serve, wait_for
from tests.stack import Stack

pytestmark = pytest.mark.slow


def submit(api: httpx.Client, headers: dict[str, str] | None = None, **body: object) -> str:
    response = api.post(
        "/sdapi/v1/txt2img", json={"prompt": "cat", "steps": 10, **body}, headers=headers or {}
    )
    assert response.status_code == 202, response.text
    return response.json()["id"]


def test_the_queue_shows_positions_in_claim_order_running_jobs_by_slot_and_an_estimate(
    tmp_path: Path, database_url: str, fake_a1111: tuple[FakeA1111, str]
) -> None:
    made = Stack(tmp_path, [fake_a1111[1]], database_url)
    try:
        api = made.start_api()
        made.start_worker()
        quick = submit(api, fake_seconds=0.3)  # something to learn run times from
        learned = made.wait_status(quick, "completed")
        running = submit(api, fake_seconds=30)
        made.wait_status(running, "processing")
        low, high, mid, high2 = (submit(api, priority=p) for p in (-5, 10, 0, 10))
        queue = api.get("/sdapi/v1/queue").json()
        assert [(q["position"], q["id"]) for q in queue["queued"]] == [
            (1, high),
            (2, high2),
            (3, mid),
            (4, low),
        ]
        assert queue["queued_total"] == 4
        assert [(r["backend"], r["id"]) for r in queue["running"]] == [(fake_a1111[1], running)]
        assert queue["counts"]["queued"] == 4 and queue["counts"]["processing"] == 1
        assert queue["counts"]["completed"] == 1 and queue["slots"] == 1
        ran = _seconds(learned["completed_at"]) - _seconds(learned["started_at"])  # >= 0.3 s
        assert queue["sample_size"] == 1
        assert queue["mean_run_seconds"] == pytest.approx(ran, abs=0.01)  # learned from that run
        starts = [q["estimated_start_seconds"] for q in queue["queued"]]
        assert starts == sorted(starts) and queue["estimated_wait_seconds"] > starts[-1]
        assert api.get(f"/sdapi/v1/jobs/{mid}").json()["queue_position"] == 3
        assert api.get(f"/sdapi/v1/jobs/{running}").json()["queue_position"] is None
        assert api.get("/sdapi/v1/queue?limit=2").json()["queued_total"] == 4
        assert api.get("/sdapi/v1/queue?limit=0").status_code == 422
        for job_id in (low, high, mid, high2, running):
            api.post(f"/sdapi/v1/jobs/{job_id}/cancel")
    finally:
        made.close()


def test_deadlines_cancel_a_job_that_waited_too_long_and_interrupt_one_that_ran_too_long(
    tmp_path: Path, fake_a1111: tuple[FakeA1111, str]
) -> None:
    receiver = WebhookSink()
    with serve(receiver.app) as hooks:
        made = Stack(
            tmp_path,
            [fake_a1111[1]],
            A1111_PROXY_WEBHOOK_ALLOW_PRIVATE="true",
            A1111_PROXY_DEADLINE_CHECK_SECONDS="0.1",
        )
        try:
            api = made.start_api()
            made.start_worker()
            # Runs, but not for long; long enough that the slot is still busy below.
            long = submit(api, fake_seconds=60, timeout=12)
            made.wait_status(long, "processing")
            waiting = submit(api, {"Cancel-After": "0.5"}, webhook_url=f"{hooks}/done")
            job = made.wait_status(waiting, "canceled", timeout=10)
            assert job["error"]["code"] == "deadline" and job["started_at"] is None
            assert job["deadline_at"] is not None
            [hook] = wait_for(lambda: receiver.at("/done"), what="the completed webhook")
            message = json.loads(hook.body)
            assert message["type"] == "job.completed"
            assert message["data"]["error"]["code"] == "deadline"
            # Wait mode hears of it as a gateway timeout, in A1111's error shape.
            waited = api.post(
                "/sdapi/v1/txt2img",
                json={"prompt": "cat"},
                headers={"Prefer": "wait", "Cancel-After": "0.5"},
            )
            assert waited.status_code == 504 and waited.json()["code"] == "deadline"
            job = made.wait_status(long, "canceled", timeout=30)
            assert job["error"]["code"] == "deadline" and job["started_at"] is not None
            assert fake_a1111[0].interrupts >= 1  # its A1111 was told to stop
        finally:
            made.close()


def test_the_worker_deletes_finished_jobs_after_the_retention_period(
    tmp_path: Path, fake_a1111: tuple[FakeA1111, str]
) -> None:
    made = Stack(
        tmp_path,
        [fake_a1111[1]],
        A1111_PROXY_RETENTION_SECONDS="1",
        A1111_PROXY_RETENTION_CHECK_SECONDS="0.2",
    )
    try:
        api = made.start_api()
        made.start_worker()
        job_id = submit(api)
        job = made.wait_status(job_id, "completed")
        assert api.get(job["image_urls"][0]).status_code == 200
        wait_for(
            lambda: api.get(f"/sdapi/v1/jobs/{job_id}").status_code == 404,
            timeout=10,
            what="the job to be deleted",
        )
        assert api.get(job["image_urls"][0]).status_code == 404
        # The worker logs the round once it has also given the space back (after the delete
        # the API already sees): wait for the line rather than race it.
        wait_for(
            lambda: "retention: deleted 1 finished job(s)" in made.procs[-1].output(),
            timeout=10,
            what="the worker to log the retention round",
        )
    finally:
        made.close()


def _seconds(stamp: str) -> float:
    return datetime.fromisoformat(stamp).timestamp()
