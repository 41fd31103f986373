"""A1111's global /progress, /interrupt and /skip act on the caller's own jobs: the API token's
tenant (Bearer, or Basic with any user name), or the client address when tokens are off.

These tests run a real uvicorn on loopback over a real database; where a job must be running,
tests/processes/test_callers.py runs real API and worker processes."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from a1111_proxy.app import create_app
from a1111_proxy.db.engine import Database
from a1111_proxy.jobs import JobRepository
from tests.servers import serve
from tests.unit.test_callers import TOKENS

ALICE, BOB, CAROL = ("Bearer alice-token", "Bearer bob-token", "Bearer carol-token")
ASYNC = {"Prefer": "respond-async"}


def bearer(header: str) -> dict[str, str]:
    return {"Authorization": header}


def submit(
    client: httpx.Client, auth: Any = None, headers: dict[str, str] | None = None, **body: Any
) -> dict[str, Any]:
    response = client.post(
        "/sdapi/v1/txt2img",
        json={"prompt": "cat", **body},
        auth=auth,
        headers={**ASYNC, **(headers or {})},
    )
    assert response.status_code == 202, response.text
    return response.json()  # type: ignore[no-any-return]


def progress(
    client: httpx.Client, headers: dict[str, str], auth: Any = None, **params: str
) -> dict[str, Any]:
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
        "alice",
        "alice",
        "alice",
        "bob",
    ]
    assert by_plain["owner"] == "token-" + hashlib.sha256(b"plain-token").hexdigest()[:8]
    shown = secured.get(f"/sdapi/v1/jobs/{by_basic['id']}", headers=bearer(ALICE))
    assert shown.json()["owner"] == "alice"
    listed = secured.get("/sdapi/v1/jobs", headers=bearer(BOB))
    assert {job["id"]: job["owner"] for job in listed.json()["jobs"]} == {by_bob["id"]: "bob"}
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
    assert idle == {
        "progress": 0.0,
        "eta_relative": 0.0,
        "current_image": None,
        "textinfo": None,
        "state": {
            "skipped": False,
            "interrupted": False,
            "stopping_generation": False,
            "job": "",
            "job_count": 0,
            "job_timestamp": "0",
            "job_no": 0,
            "sampling_step": 0,
            "sampling_steps": 0,
        },
    }


def test_a_job_id_that_is_not_the_callers_is_a_404_naming_it(secured: httpx.Client) -> None:
    bobs = submit(secured, headers=bearer(BOB))["id"]
    alices = submit(secured, headers=bearer(ALICE))["id"]
    unknown = "00000000-0000-0000-0000-000000000000"
    for method, path in (("GET", "progress"), ("POST", "interrupt"), ("POST", "skip")):
        for job_id in (bobs, unknown):
            response = secured.request(
                method, f"/sdapi/v1/{path}", params={"job_id": job_id}, headers=bearer(ALICE)
            )
            assert response.status_code == 404, (path, response.text)
            body = response.json()
            assert body["code"] == "job_not_found" and job_id in body["detail"]
            assert set(body) >= {"error", "detail", "body", "errors"}  # A1111's error shape
    # Her own job is hers to pick: queued, so nothing to interrupt or skip yet.
    mine = progress(secured, bearer(ALICE), job_id=alices)
    assert mine["progress"] == 0.0 and mine["state"]["job_count"] == 1
    assert (
        secured.post("/sdapi/v1/interrupt", params={"job_id": alices}, headers=bearer(ALICE)).json()
        == {}
    )
    assert (
        secured.post("/sdapi/v1/skip", params={"job_id": alices}, headers=bearer(ALICE)).json()
        is None
    )
    assert secured.get(f"/sdapi/v1/jobs/{bobs}", headers=bearer(BOB)).json()["status"] == "queued"


def test_without_tokens_each_client_address_is_its_own_caller_and_may_name_any_job(
    database_url: str,
    settings_for,  # type: ignore[no-untyped-def]
) -> None:
    settings = settings_for(database_url=database_url)
    other = httpx.HTTPTransport(local_address="127.0.0.2")  # Linux answers all of 127/8
    with (
        serve(create_app(settings)) as url,
        httpx.Client(base_url=url) as here,
        httpx.Client(base_url=url, transport=other) as there,
    ):
        first = submit(here)
        submit(here)
        theirs = submit(there)
        assert (first["owner"], theirs["owner"]) == ("127.0.0.1", "127.0.0.2")
        assert progress(here, {})["state"]["job_count"] == 2
        assert progress(there, {})["state"]["job_count"] == 1
        # No tokens, no identities to keep apart (a loopback-only server has one user): naming
        # a job by id reaches it from any address, as an admin's would.
        assert there.get("/sdapi/v1/progress", params={"job_id": first["id"]}).status_code == 200
        assert progress(here, {}, job_id=first["id"])["state"]["job_count"] == 2
