"""A1111's global /progress, /interrupt and /skip act on the caller's own running jobs: real API
and worker processes drive two fake A1111s (one job each)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.a1111 import FakeA1111
from tests.integration.test_callers import ALICE, BOB, bearer, progress, stored, submit
from tests.servers import serve, wait_for
from tests.stack import Stack
from tests.unit.test_callers import TOKENS

OPS = "Bearer ops-token"

# --- running jobs: API and worker processes, two fake A1111s --------------------------------


@pytest.fixture
def running(tmp_path: Path, database_url: str) -> Iterator[tuple[Stack, dict[str, FakeA1111]]]:
    fakes = [FakeA1111(name="one"), FakeA1111(name="two")]
    with serve(fakes[0].app) as one, serve(fakes[1].app) as two:
        # A long lease: nothing here may be requeued while a busy machine runs the test.
        made = Stack(
            tmp_path,
            [one, two],
            database_url,
            A1111_PROXY_API_TOKENS=TOKENS,
            A1111_PROXY_ADMIN_TOKENS="ops:ops-token",
            A1111_PROXY_LEASE_SECONDS="30",
        )
        try:
            made.start_api().headers["Authorization"] = OPS  # Stack's own reads see every job
            made.start_worker()
            yield made, {one: fakes[0], two: fakes[1]}
        finally:
            made.close()


def run_job(made: Stack, who: str, steps: int) -> str:
    assert made.api is not None
    return str(submit(made.api, headers=bearer(who), steps=steps, fake_seconds=120)["id"])


def shown(answer: dict[str, Any]) -> tuple[int, int]:
    """Which job a /progress answer shows (by its steps), and how many jobs it counts."""
    return answer["state"]["sampling_steps"], answer["state"]["job_count"]


def wait_running(made: Stack, *job_ids: str) -> list[dict[str, Any]]:
    return [made.wait_status(job_id, "processing") for job_id in job_ids]


@pytest.mark.slow
def test_bobs_progress_interrupt_and_skip_never_touch_alices_running_job(
    running: tuple[Stack, dict[str, FakeA1111]],
    database_url: str,
) -> None:
    made, fakes = running
    api = made.api
    assert api is not None
    alice_job = run_job(made, ALICE, steps=30)
    bob_job = run_job(made, BOB, steps=7)
    alice_run, bob_run = wait_running(made, alice_job, bob_job)
    alice_fake, bob_fake = fakes[alice_run["backend"]], fakes[bob_run["backend"]]
    assert alice_fake is not bob_fake

    # Each sees their own running job: its steps, and only their own jobs counted.
    assert shown(progress(api, bearer(BOB))) == (7, 1)
    assert shown(progress(api, bearer(ALICE))) == (30, 1)

    assert api.post("/sdapi/v1/skip", headers=bearer(BOB)).json() is None
    # Read the flag before the fake's count: the worker clears a skip only after sending it.
    assert stored(database_url, alice_job).skip_requested_at is None
    wait_for(lambda: bob_fake.skips == 1, what="bob's skip to reach his A1111")
    assert alice_fake.skips == 0

    assert api.post("/sdapi/v1/interrupt", headers=bearer(BOB)).json() == {}
    assert stored(database_url, alice_job).cancel_requested_at is None
    assert progress(api, bearer(ALICE))["state"]["interrupted"] is False
    made.wait_status(bob_job, "canceled")
    assert bob_fake.interrupts == 1 and alice_fake.interrupts == 0

    # Bob has nothing left: his /progress is idle while Alice's job still runs.
    idle = progress(api, bearer(BOB))
    assert idle["progress"] == 0.0 and idle["state"]["job_count"] == 0
    assert idle["current_image"] is None and idle["state"]["sampling_steps"] == 0
    assert made.job(alice_job)["status"] == "processing"
    assert shown(progress(api, bearer(ALICE))) == (30, 1)

    assert api.post("/sdapi/v1/interrupt", auth=("any", "alice-token")).json() == {}
    made.wait_status(alice_job, "canceled")


@pytest.mark.slow
def test_job_id_picks_one_of_the_callers_running_jobs(
    running: tuple[Stack, dict[str, FakeA1111]],
    database_url: str,
) -> None:
    made, fakes = running
    api = made.api
    assert api is not None
    long_job = run_job(made, ALICE, steps=30)
    short_job = run_job(made, ALICE, steps=7)
    long_run, short_run = wait_running(made, long_job, short_job)

    def steps_of(job_id: str) -> int:
        state = progress(api, bearer(ALICE), job_id=job_id)["state"]
        assert state["job_count"] == 2  # still every one of her jobs
        return int(state["sampling_steps"])

    assert (steps_of(long_job), steps_of(short_job)) == (30, 7)

    assert (
        api.post("/sdapi/v1/skip", params={"job_id": short_job}, headers=bearer(ALICE)).json()
        is None
    )
    assert stored(database_url, long_job).skip_requested_at is None
    wait_for(lambda: fakes[short_run["backend"]].skips == 1, what="the skip to reach its A1111")
    assert fakes[long_run["backend"]].skips == 0

    assert (
        api.post("/sdapi/v1/interrupt", params={"job_id": short_job}, headers=bearer(ALICE)).json()
        == {}
    )
    assert stored(database_url, long_job).cancel_requested_at is None
    made.wait_status(short_job, "canceled")
    assert made.job(long_job)["status"] == "processing"
    assert shown(progress(api, bearer(ALICE))) == (30, 1)

    assert api.post("/sdapi/v1/interrupt", headers=bearer(ALICE)).json() == {}
    made.wait_status(long_job, "canceled")
