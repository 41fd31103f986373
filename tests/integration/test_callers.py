"""A1111's global /progress, /interrupt and /skip act on the caller's own jobs: the API token's
tenant (Bearer, or Basic with any user name), or the client address when tokens are off.

API tests run a real uvicorn on loopback over a real database; where a job must be running, real
API and worker processes drive two fake A1111s (one job each)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from a1111_proxy.app import create_app
from a1111_proxy.db.engine import Database
from a1111_proxy.jobs import JobRepository
from a1111_proxy.settings import Settings
from tests.fakes.a1111 import FakeA1111
from tests.servers import serve, wait_for
from tests.stack import Stack

TOKENS = "alice:alice-token,alice:alice-second-token,bob:bob-token,carol:carol-token,plain-token"
ALICE, BOB, CAROL = ("Bearer alice-token", "Bearer bob-token", "Bearer carol-token")
ASYNC = {"Prefer": "respond-async"}


def bearer(header: str) -> dict[str, str]:
    return {"Authorization": header}


def submit(client: httpx.Client, auth: Any = None, headers: dict[str, str] | None = None,
           **body: Any) -> dict[str, Any]:
    response = client.post("/sdapi/v1/txt2img", json={"prompt": "cat", **body}, auth=auth,
                           headers={**ASYNC, **(headers or {})})
    assert response.status_code == 202, response.text
    return response.json()  # type: ignore[no-any-return]


def progress(client: httpx.Client, headers: dict[str, str], auth: Any = None,
             **params: str) -> dict[str, Any]:
    response = client.get("/sdapi/v1/progress", headers=headers, auth=auth, params=params)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def stored(url: str, job_id: str) -> Any:
    """The job's row as the database holds it now (flags the API does not show)."""

    async def read() -> Any:
        db = Database(url)
        try:
            return await JobRepository(db).get(job_id)
        finally:
            await db.dispose()

    return asyncio.run(read())


# --- API_TOKENS ---------------------------------------------------------------------------


def test_api_tokens_name_tenants_and_a_plain_token_gets_a_name_that_hides_it() -> None:
    settings = Settings(_env_file=None, api_tokens=TOKENS)  # type: ignore[call-arg]
    plain = "token-" + hashlib.sha256(b"plain-token").hexdigest()[:8]
    assert settings.tenants() == [
        ("alice", "alice-token"), ("alice", "alice-second-token"), ("bob", "bob-token"),
        ("carol", "carol-token"), (plain, "plain-token"),
    ]
    assert "plain-token" not in plain


@pytest.mark.parametrize("entry", [":s3cret-token", "alice:", "alice: "])
def test_an_api_tokens_entry_with_an_empty_part_is_refused_without_showing_it(entry: str) -> None:
    with pytest.raises(ValidationError) as raised:
        Settings(_env_file=None, api_tokens=f"bob:bob-token,{entry}")  # type: ignore[call-arg]
    message = str(raised.value)
    assert "api_tokens" in message and "entry 2" in message and "name:token" in message
    assert "s3cret-token" not in message and "bob-token" not in message


def test_one_token_given_to_two_tenants_is_refused() -> None:
    with pytest.raises(ValidationError, match="two tenants, 'alice' and 'bob'") as raised:
        Settings(_env_file=None, api_tokens="alice:same,bob:same")  # type: ignore[call-arg]
    assert "same" not in str(raised.value).replace("'alice' and 'bob'", "")


# --- the caller, through the API ------------------------------------------------------------


@pytest.fixture
def secured(database_url: str, settings_for) -> Iterator[httpx.Client]:  # type: ignore[no-untyped-def]
    settings = settings_for(database_url=database_url, api_tokens=TOKENS)
    with serve(create_app(settings)) as url, httpx.Client(base_url=url) as client:
        yield client


def test_a_job_shows_its_tenant_as_owner_whether_sent_by_bearer_or_basic_with_any_user_name(
    secured: httpx.Client,
) -> None:
    by_bearer = submit(secured, headers=bearer(ALICE))
    by_basic = submit(secured, auth=("whoever", "alice-token"))
    by_other_name = submit(secured, auth=("someone-else", "alice-second-token"))
    by_bob = submit(secured, auth=("alice", "bob-token"))  # the user name is not the caller
    by_plain = submit(secured, headers=bearer("Bearer plain-token"))
    assert [job["owner"] for job in (by_bearer, by_basic, by_other_name, by_bob)] == [
        "alice", "alice", "alice", "bob"]
    assert by_plain["owner"] == "token-" + hashlib.sha256(b"plain-token").hexdigest()[:8]
    shown = secured.get(f"/sdapi/v1/jobs/{by_basic['id']}", headers=bearer(BOB))
    assert shown.json()["owner"] == "alice"
    listed = secured.get("/sdapi/v1/jobs", headers=bearer(CAROL))
    assert {job["id"]: job["owner"] for job in listed.json()["jobs"]}[by_bob["id"]] == "bob"
    assert "plain-token" not in listed.text and "alice-token" not in listed.text


def test_progress_counts_only_the_callers_own_queued_and_running_jobs(
    secured: httpx.Client,
) -> None:
    submit(secured, headers=bearer(ALICE))
    submit(secured, auth=("anyone", "alice-token"))
    submit(secured, headers=bearer(BOB))
    assert progress(secured, {}, auth=("x", "alice-token"))["state"]["job_count"] == 2
    assert progress(secured, bearer(ALICE))["state"]["job_count"] == 2
    assert progress(secured, bearer(BOB))["state"]["job_count"] == 1
    idle = progress(secured, bearer(CAROL))
    assert idle == {"progress": 0.0, "eta_relative": 0.0, "current_image": None, "textinfo": None,
                    "state": {"skipped": False, "interrupted": False,
                              "stopping_generation": False, "job": "", "job_count": 0,
                              "job_timestamp": "0", "job_no": 0, "sampling_step": 0,
                              "sampling_steps": 0}}


def test_a_job_id_that_is_not_the_callers_is_a_404_naming_it(secured: httpx.Client) -> None:
    bobs = submit(secured, headers=bearer(BOB))["id"]
    alices = submit(secured, headers=bearer(ALICE))["id"]
    unknown = "00000000-0000-0000-0000-000000000000"
    for method, path in (("GET", "progress"), ("POST", "interrupt"), ("POST", "skip")):
        for job_id in (bobs, unknown):
            response = secured.request(method, f"/sdapi/v1/{path}", params={"job_id": job_id},
                                       headers=bearer(ALICE))
            assert response.status_code == 404, (path, response.text)
            body = response.json()
            assert body["code"] == "job_not_found" and job_id in body["detail"]
            assert set(body) >= {"error", "detail", "body", "errors"}  # A1111's error shape
    # Her own job is hers to pick: queued, so nothing to interrupt or skip yet.
    mine = progress(secured, bearer(ALICE), job_id=alices)
    assert mine["progress"] == 0.0 and mine["state"]["job_count"] == 1
    assert secured.post("/sdapi/v1/interrupt", params={"job_id": alices},
                        headers=bearer(ALICE)).json() == {}
    assert secured.post("/sdapi/v1/skip", params={"job_id": alices},
                        headers=bearer(ALICE)).json() is None
    assert secured.get(f"/sdapi/v1/jobs/{bobs}", headers=bearer(BOB)).json()["status"] == "queued"


def test_without_tokens_each_client_address_is_its_own_caller(
    database_url: str, settings_for  # type: ignore[no-untyped-def]
) -> None:
    settings = settings_for(database_url=database_url)
    other = httpx.HTTPTransport(local_address="127.0.0.2")  # Linux answers all of 127/8
    with serve(create_app(settings)) as url, httpx.Client(base_url=url) as here, \
            httpx.Client(base_url=url, transport=other) as there:
        first = submit(here)
        submit(here)
        theirs = submit(there)
        assert (first["owner"], theirs["owner"]) == ("127.0.0.1", "127.0.0.2")
        assert progress(here, {})["state"]["job_count"] == 2
        assert progress(there, {})["state"]["job_count"] == 1
        assert there.get("/sdapi/v1/progress", params={"job_id": first["id"]}).status_code == 404
        assert progress(here, {}, job_id=first["id"])["state"]["job_count"] == 2


# --- running jobs: API and worker processes, two fake A1111s --------------------------------


@pytest.fixture
def running(tmp_path: Path, database_url: str) -> Iterator[tuple[Stack, dict[str, FakeA1111]]]:
    fakes = [FakeA1111(name="one"), FakeA1111(name="two")]
    with serve(fakes[0].app) as one, serve(fakes[1].app) as two:
        # A long lease: nothing here may be requeued while a busy machine runs the test.
        made = Stack(tmp_path, [one, two], database_url, A1111_PROXY_API_TOKENS=TOKENS,
                     A1111_PROXY_LEASE_SECONDS="30")
        try:
            made.start_api().headers["Authorization"] = CAROL  # Stack's own reads: a third tenant
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
    running: tuple[Stack, dict[str, FakeA1111]], database_url: str,
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
    running: tuple[Stack, dict[str, FakeA1111]], database_url: str,
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

    assert api.post("/sdapi/v1/skip", params={"job_id": short_job},
                    headers=bearer(ALICE)).json() is None
    assert stored(database_url, long_job).skip_requested_at is None
    wait_for(lambda: fakes[short_run["backend"]].skips == 1, what="the skip to reach its A1111")
    assert fakes[long_run["backend"]].skips == 0

    assert api.post("/sdapi/v1/interrupt", params={"job_id": short_job},
                    headers=bearer(ALICE)).json() == {}
    assert stored(database_url, long_job).cancel_requested_at is None
    made.wait_status(short_job, "canceled")
    assert made.job(long_job)["status"] == "processing"
    assert shown(progress(api, bearer(ALICE))) == (30, 1)

    assert api.post("/sdapi/v1/interrupt", headers=bearer(ALICE)).json() == {}
    made.wait_status(long_job, "canceled")
