"""End to end with real processes: `a1111-proxy serve` and `worker`, a fake A1111 on loopback,
one SQLite file. Crashes are real signals: SIGKILL, SIGSTOP/SIGCONT, SIGTERM."""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from tests.fakes.a1111 import FakeA1111
from tests.servers import ASYNC, ROOT, serve, wait_for
from tests.stack import Stack

pytestmark = pytest.mark.slow


@pytest.fixture
def stack(tmp_path: Path, fake_a1111: tuple[FakeA1111, str]) -> Iterator[Stack]:
    made = Stack(tmp_path, [fake_a1111[1]])
    try:
        yield made
    finally:
        made.close()


def test_a_submitted_job_runs_on_a1111_and_returns_its_exact_response(
    stack: Stack, fake_a1111: tuple[FakeA1111, str]
) -> None:
    api = stack.start_api()
    stack.start_worker()
    job_id = stack.submit(seed=5, batch_size=2)
    job = stack.wait_status(job_id, "completed")
    assert job["attempts"] == 1 and job["progress"] == 1.0 and job["error"] is None
    assert job["started_at"] <= job["completed_at"]
    [generation] = fake_a1111[0].completed
    result = job["result"]
    assert (
        result["parameters"]
        == generation["body"]
        == {"prompt": "cat", "steps": 10, "seed": 5, "batch_size": 2}
    )
    assert json.loads(result["info"])["all_seeds"] == [5, 6]
    assert len(result["images"]) == 2 == len(job["image_urls"])
    png = api.get(job["image_urls"][1])
    assert png.headers["content-type"] == "image/png"
    assert png.content == base64.b64decode(result["images"][1]) and b"Seed: 6" in png.content
    listed = api.get("/sdapi/v1/jobs").json()["jobs"][0]
    assert listed["id"] == job_id and listed["result"] is None  # never image data in a list


def test_what_the_api_and_the_worker_commit_reaches_the_database_file_within_seconds(
    stack: Stack, tmp_path: Path
) -> None:
    """Not only the WAL (db/checkpoints.py): the database file is what a power cut leaves."""
    stack.start_api()
    job_id = stack.submit()
    wait_for(
        lambda: _status_in_database_file(tmp_path, job_id) == "queued",
        timeout=10,
        what="the API's checkpoint",
    )
    assert stack.api_proc is not None
    stack.api_proc.stop(timeout=5)  # from here on the worker writes alone
    stack.start_worker()
    wait_for(
        lambda: _status_in_database_file(tmp_path, job_id) == "completed",
        timeout=20,
        what="the worker's checkpoint",
    )


def _status_in_database_file(tmp_path: Path, job_id: str) -> str | None:
    alone = tmp_path / "alone.db"
    shutil.copyfile(tmp_path / "jobs.db", alone)  # without its -wal
    try:
        with contextlib.closing(sqlite3.connect(alone)) as conn:
            row = conn.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
    except sqlite3.DatabaseError:  # copied in the middle of a checkpoint: look again
        return None
    return row[0] if row else None


def test_health_reports_the_worker_and_its_backend_slots(
    stack: Stack, fake_a1111: tuple[FakeA1111, str]
) -> None:
    api = stack.start_api()
    stack.start_worker()
    health = wait_for(
        lambda: (r := api.get("/health")).status_code == 200 and r.json(), what="a healthy /health"
    )
    assert health["backends"][0]["backend"] == fake_a1111[1]
    assert health["backends"][0]["state"] == "idle"
    assert health["workers"][0]["heartbeat_age_seconds"] < 10
    assert health["queue"]["queued"] == 0


def test_cancel_ends_a_queued_job_at_once_and_interrupts_a_running_one(
    stack: Stack, fake_a1111: tuple[FakeA1111, str]
) -> None:
    api = stack.start_api()
    stack.start_worker()
    running = stack.submit(fake_seconds=30)
    stack.wait_status(running, "processing")
    queued = stack.submit()
    assert api.post(f"/sdapi/v1/jobs/{queued}/cancel").json()["status"] == "canceled"
    wait_for(lambda: fake_a1111[0].current is not None, what="the generation to start")
    api.post(f"/sdapi/v1/jobs/{running}/cancel")
    job = stack.wait_status(running, "canceled", timeout=10)
    assert fake_a1111[0].interrupts == 1
    assert len(job["result"]["images"]) == 1  # what A1111 had made when interrupted
    assert len(fake_a1111[0].generation_requests()) == 1  # the canceled queued job never ran


def test_jobs_run_by_priority_then_age(stack: Stack, fake_a1111: tuple[FakeA1111, str]) -> None:
    stack.start_api()
    order = [
        stack.submit(prompt="low", priority=-5),
        stack.submit(prompt="first"),
        stack.submit(prompt="urgent", priority=50),
        stack.submit(prompt="second"),
    ]
    stack.start_worker()
    for job_id in order:
        stack.wait_status(job_id, "completed")
    assert [g["body"]["prompt"] for g in fake_a1111[0].completed] == [
        "urgent",
        "first",
        "second",
        "low",
    ]


def test_several_backend_slots_run_jobs_in_parallel(tmp_path: Path) -> None:
    fakes = [FakeA1111(service_time=1.0, name=f"f{i}") for i in range(2)]
    with serve(fakes[0].app) as one, serve(fakes[1].app) as two:
        stack = Stack(tmp_path, [one, two])
        try:
            stack.start_api()
            stack.start_worker()
            wait_for(lambda: stack.api.get("/health").status_code == 200, what="the worker")
            ids = [stack.submit(), stack.submit()]
            jobs = [stack.wait_status(job_id, "completed") for job_id in ids]
        finally:
            stack.close()
    assert {job["backend"] for job in jobs} == {one, two}
    assert [len(f.completed) for f in fakes] == [1, 1]
    # Side by side: each of the two 1 s jobs started before the other one ended.
    first, second = (
        [_seconds(job[f"{when}_at"]) for when in ("started", "completed")] for job in jobs
    )
    assert first[0] < second[1] and second[0] < first[1], jobs


def test_a_worker_killed_mid_job_loses_its_lease_and_the_job_runs_again(
    stack: Stack, fake_a1111: tuple[FakeA1111, str]
) -> None:
    stack.start_api()
    first = stack.start_worker()
    job_id = stack.submit(fake_seconds=1.0)
    stack.wait_status(job_id, "processing")
    wait_for(lambda: fake_a1111[0].current is not None, what="the generation to start")
    first.kill()  # SIGKILL: no cleanup, the lease just stops being renewed
    stack.start_worker()
    job = stack.wait_status(job_id, "completed", timeout=30)
    assert job["attempts"] == 2
    assert len(fake_a1111[0].generation_requests()) == 2
    assert len(job["result"]["images"]) == 1
    assert json.loads(job["result"]["info"])["fake_generation"] == 2


def test_a_paused_worker_past_its_lease_cannot_overwrite_the_rerun(
    stack: Stack, fake_a1111: tuple[FakeA1111, str]
) -> None:
    api = stack.start_api()
    paused = stack.start_worker()
    # SQLite has one writer: pause it between its (short) transactions, not while it writes
    # the catalogue at start-up, or nobody could write until it resumes.
    wait_for(lambda: api.get("/controlnet/model_list").status_code == 200, what="the catalogue")
    job_id = stack.submit(fake_seconds=1.5)
    stack.wait_status(job_id, "processing")
    wait_for(lambda: fake_a1111[0].current is not None, what="the generation to start")
    paused.signal(signal.SIGSTOP)
    stack.start_worker()
    job = stack.wait_status(job_id, "completed", timeout=30)
    assert json.loads(job["result"]["info"])["fake_generation"] == 2
    paused.signal(signal.SIGCONT)  # it now holds generation 1's answer and a dead lease
    wait_for(lambda: "lease lost" in paused.output(), timeout=10, what="the stale worker to notice")
    after = stack.job(job_id)
    assert after["result"] == job["result"] and after["completed_at"] == job["completed_at"]
    assert after["attempts"] == 2


def test_an_api_killed_right_after_answering_202_keeps_the_job(
    stack: Stack, fake_a1111: tuple[FakeA1111, str]
) -> None:
    stack.start_api()
    job_id = stack.submit(prompt="survivor")
    assert stack.api_proc is not None
    stack.api_proc.kill()
    stack.start_api()
    stack.start_worker()
    job = stack.wait_status(job_id, "completed")
    assert job["request"]["prompt"] == "survivor"


def test_sigterm_lets_a_running_job_finish_within_the_grace_period(
    stack: Stack, fake_a1111: tuple[FakeA1111, str]
) -> None:
    stack.start_api()
    worker = stack.start_worker(A1111_PROXY_SHUTDOWN_GRACE_SECONDS="10")
    job_id = stack.submit(fake_seconds=1.0)
    stack.wait_status(job_id, "processing")
    worker.signal(signal.SIGTERM)
    assert worker.popen.wait(timeout=15) == 0
    assert stack.job(job_id)["status"] == "completed"


def test_sigterm_past_the_grace_period_releases_the_job_to_run_again_at_once(
    stack: Stack, fake_a1111: tuple[FakeA1111, str]
) -> None:
    stack.start_api()
    worker = stack.start_worker(A1111_PROXY_SHUTDOWN_GRACE_SECONDS="0.5")
    job_id = stack.submit(fake_seconds=2.0)
    stack.wait_status(job_id, "processing")
    worker.signal(signal.SIGTERM)
    assert worker.popen.wait(timeout=15) == 0
    released = stack.job(job_id)
    assert released["status"] == "queued" and released["attempts"] == 0
    assert fake_a1111[0].interrupts == 1
    stack.start_worker()
    assert stack.wait_status(job_id, "completed")["attempts"] == 1


def test_serve_refuses_a_public_host_without_tokens_and_says_how_to_fix_it(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "a1111_proxy", "serve"],
        env={"A1111_PROXY_HOST": "0.0.0.0", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "A1111_PROXY_API_TOKENS" in result.stderr and "127.0.0.1" in result.stderr


@pytest.mark.postgres
def test_on_postgresql_two_apis_and_two_workers_share_the_queue_and_wait_mode_works(
    tmp_path: Path, fake_a1111: tuple[FakeA1111, str], database_url: str
) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("a PostgreSQL-only test")
    stack = Stack(tmp_path, [fake_a1111[1]], database_url=database_url)
    try:
        stack.start_api()
        first = httpx.Client(base_url=stack.base, timeout=30, headers=ASYNC)
        stack.start_worker()
        stack.start_worker()
        second = stack.start_api()  # the Stack now talks to the second API
        assert stack.base != str(first.base_url)
        waited = first.post(
            "/sdapi/v1/txt2img", json={"prompt": "via the first API"}, headers={"Prefer": "wait=20"}
        )
        assert waited.status_code == 200 and waited.json()["images"]
        job_id = waited.headers["x-job-id"]
        assert second.get(f"/sdapi/v1/jobs/{job_id}").json()["status"] == "completed"
        queued = [
            second.post("/sdapi/v1/txt2img", json={"prompt": f"p{i}"}).json()["id"]
            for i in range(6)
        ]
        for job_id in queued:
            stack.wait_status(job_id, "completed")
        assert len(fake_a1111[0].generation_requests()) == 7  # each job ran exactly once
    finally:
        first.close()
        stack.close()


def _seconds(stamp: str) -> float:
    return datetime.fromisoformat(stamp).timestamp()
