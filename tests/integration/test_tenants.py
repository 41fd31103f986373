"""Tenants: a job belongs to the tenant whose token submitted it. A tenant sees, streams,
cancels and redelivers only its own jobs (another's answer 404, exactly as a missing job); an
admin (ADMIN_TOKENS) sees all and alone changes what every tenant shares. Idempotency keys,
POST /options and the limits are per tenant.

A real uvicorn on loopback over a real database (SQLite file and PostgreSQL)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from a1111_proxy.app import create_app
from a1111_proxy.catalogue import CatalogueStore
from a1111_proxy.db.engine import Database
from a1111_proxy.db.tables import job_payloads, jobs
from tests.integration.test_callers import bearer, submit
from tests.servers import serve

ALICE, BOB, OPS = "Bearer alice-token", "Bearer bob-token", "Bearer ops-token"
TOKENS = {"api_tokens": "alice:alice-token,bob:bob-token", "admin_tokens": "ops:ops-token"}
MODELS = [
    {"title": "base.safetensors [aaaa]", "model_name": "base", "sha256": "a" * 64},
    {"title": "anime.safetensors [bbbb]", "model_name": "anime", "sha256": "b" * 64},
]


def serve_with(database_url: str, settings_for: Any, **extra: Any) -> Any:
    settings = settings_for(database_url=database_url, **TOKENS, **extra)
    return serve(create_app(settings))


@pytest.fixture
def api(database_url: str, settings_for) -> Iterator[httpx.Client]:  # type: ignore[no-untyped-def]
    asyncio.run(_store_models(database_url))
    with serve_with(database_url, settings_for) as url, httpx.Client(base_url=url) as client:
        yield client


async def _store_models(database_url: str) -> None:
    db = Database(database_url)
    try:
        await CatalogueStore(db).put("sd-models", MODELS, "http://a1111:7860")
    finally:
        await db.dispose()


# --- isolation ------------------------------------------------------------------------------


def test_another_tenants_job_answers_404_everywhere_as_a_missing_job_would(
    api: httpx.Client,
) -> None:
    alices = submit(api, headers=bearer(ALICE))["id"]
    missing = api.get("/sdapi/v1/jobs/no-such-job", headers=bearer(BOB)).json()
    for method, path in [
        ("GET", f"/sdapi/v1/jobs/{alices}"),
        ("GET", f"/sdapi/v1/jobs/{alices}/images/0"),
        ("GET", f"/sdapi/v1/jobs/{alices}/events"),
        ("GET", f"/sdapi/v1/jobs/{alices}/webhooks"),
        ("POST", f"/sdapi/v1/jobs/{alices}/webhooks/redeliver"),
        ("POST", f"/sdapi/v1/jobs/{alices}/cancel"),
        ("GET", f"/sdapi/v1/progress?job_id={alices}"),
        ("POST", f"/sdapi/v1/interrupt?job_id={alices}"),
        ("POST", f"/sdapi/v1/skip?job_id={alices}"),
    ]:
        answer = api.request(method, path, headers=bearer(BOB))
        assert answer.status_code == 404, (method, path, answer.text)
        assert answer.json()["code"] in {"job_not_found", missing["code"]}
    # Bob's cancel did nothing: Alice's job still waits.
    mine = api.get(f"/sdapi/v1/jobs/{alices}", headers=bearer(ALICE)).json()
    assert mine["status"] == "queued" and mine["owner"] == "alice"


def test_a_tenant_lists_only_its_own_jobs_and_an_admin_lists_all_or_one_tenants(
    api: httpx.Client,
) -> None:
    alices = {submit(api, headers=bearer(ALICE))["id"] for _ in range(2)}
    bobs = {submit(api, headers=bearer(BOB))["id"]}

    def listed(header: str, **params: str) -> set[str]:
        page = api.get("/sdapi/v1/jobs", headers=bearer(header), params=params)
        assert page.status_code == 200, page.text
        return {job["id"] for job in page.json()["jobs"]}

    assert listed(ALICE) == alices
    assert listed(BOB) == bobs
    assert listed(BOB, owner="alice") == bobs  # a tenant cannot widen its view
    assert listed(OPS) == alices | bobs
    assert listed(OPS, owner="alice") == alices


def test_an_admin_reads_and_cancels_any_tenants_job(api: httpx.Client) -> None:
    bobs = submit(api, headers=bearer(BOB))["id"]
    assert api.get(f"/sdapi/v1/jobs/{bobs}", headers=bearer(OPS)).json()["owner"] == "bob"
    canceled = api.post(f"/sdapi/v1/jobs/{bobs}/cancel", headers=bearer(OPS))
    assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"


# --- what every tenant shares ---------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/sdapi/v1/refresh-checkpoints", "/sdapi/v1/refresh-loras", "/sdapi/v1/refresh-vae"]
)
def test_only_an_admin_refreshes_the_catalogue(api: httpx.Client, path: str) -> None:
    refused = api.post(path, headers=bearer(ALICE))
    assert refused.status_code == 403
    assert refused.json()["code"] == "admin_only"
    assert "A1111_PROXY_ADMIN_TOKENS" in refused.json()["detail"]
    assert api.post(path, headers=bearer(OPS)).status_code == 200


def test_only_an_admin_reads_metrics(api: httpx.Client) -> None:
    assert api.get("/metrics", headers=bearer(ALICE)).status_code == 403
    assert api.get("/metrics").status_code == 401
    assert "a1111_proxy_jobs" in api.get("/metrics", headers=bearer(OPS)).text


def test_health_shows_details_to_an_admin_and_only_a_summary_to_anyone_else(
    api: httpx.Client,
) -> None:
    for headers in ({}, bearer(ALICE), bearer("Bearer wrong")):
        summary = api.get("/health", headers=headers)
        assert summary.status_code == 503  # no worker runs in this test
        body = summary.json()
        assert set(body) == {"status", "database", "workers", "backends", "problems", "detail"}
        assert body["workers"] == 0 and "ADMIN_TOKENS" in body["detail"]
    detailed = api.get("/health", headers=bearer(OPS)).json()
    assert detailed["workers"] == [] and detailed["queue"] is not None


def test_a_tenants_options_are_its_own_and_its_jobs_take_them(
    api: httpx.Client, database_url: str
) -> None:
    """open-webui and SillyTavern pick their model with POST /options: with a tenant token that
    picks the tenant's model, not everyone's."""
    chosen = {"sd_model_checkpoint": "anime", "CLIP_stop_at_last_layers": 2}
    assert api.post("/sdapi/v1/options", json=chosen, headers=bearer(ALICE)).status_code == 200
    assert api.post("/sdapi/v1/options", json={"sd_model_checkpoint": "base"}, headers=bearer(OPS))

    alices_view = api.get("/sdapi/v1/options", headers=bearer(ALICE)).json()
    assert alices_view["sd_model_checkpoint"] == "anime.safetensors [bbbb]"
    assert alices_view["CLIP_stop_at_last_layers"] == 2
    bobs_view = api.get("/sdapi/v1/options", headers=bearer(BOB)).json()
    assert bobs_view["sd_model_checkpoint"] == "base.safetensors [aaaa]"
    assert "CLIP_stop_at_last_layers" not in bobs_view

    alices = submit(api, headers=bearer(ALICE))
    bobs = submit(api, headers=bearer(BOB))
    own = submit(api, headers=bearer(ALICE), override_settings={"CLIP_stop_at_last_layers": 1})
    sent = asyncio.run(_as_sent(database_url, [alices["id"], bobs["id"], own["id"]]))
    assert sent[alices["id"]] == ("anime.safetensors [bbbb]", {"CLIP_stop_at_last_layers": 2})
    assert sent[bobs["id"]] == ("base.safetensors [aaaa]", None)
    assert sent[own["id"]] == ("anime.safetensors [bbbb]", {"CLIP_stop_at_last_layers": 1})


async def _as_sent(database_url: str, ids: list[str]) -> dict[str, tuple[str, Any]]:
    """Each job's checkpoint and the override_settings its backend will receive."""
    db = Database(database_url)
    try:
        async with db.reading() as conn:
            rows = await conn.execute(
                select(jobs.c.id, jobs.c.checkpoint, job_payloads.c.body)
                .join(job_payloads, job_payloads.c.job_seq == jobs.c.seq)
                .where(jobs.c.id.in_(ids))
            )
            return {
                row.id: (row.checkpoint, json.loads(row.body).get("override_settings"))
                for row in rows
            }
    finally:
        await db.dispose()


def test_a_tenant_naming_an_unknown_checkpoint_in_options_gets_a_422(api: httpx.Client) -> None:
    answer = api.post(
        "/sdapi/v1/options", json={"sd_model_checkpoint": "nope"}, headers=bearer(ALICE)
    )
    assert answer.status_code == 422 and "base.safetensors" in answer.json()["detail"]


# --- idempotency and limits -----------------------------------------------------------------


def test_an_idempotency_key_is_per_tenant(api: httpx.Client) -> None:
    key = {"Idempotency-Key": "order-17"}
    first = submit(api, headers={**bearer(ALICE), **key})
    again = api.post(
        "/sdapi/v1/txt2img",
        json={"prompt": "cat"},
        headers={**bearer(ALICE), **key, "Prefer": "respond-async"},
    )
    assert again.status_code == 200 and again.json()["id"] == first["id"]
    bobs = submit(api, headers={**bearer(BOB), **key}, prompt="dog")
    assert bobs["id"] != first["id"] and bobs["owner"] == "bob"


def alices_refused_submit(api: httpx.Client) -> httpx.Response:
    answer = api.post(
        "/sdapi/v1/txt2img",
        json={"prompt": "cat"},
        headers={**bearer(ALICE), "Prefer": "respond-async"},
    )
    assert answer.status_code == 429, answer.text
    assert answer.json()["code"] == "tenant_limit"
    return answer


def test_a_tenant_over_its_queue_limit_gets_429_and_others_go_on(
    database_url: str,
    settings_for,  # type: ignore[no-untyped-def]
) -> None:
    with (
        serve_with(database_url, settings_for, tenant_max_queued=2) as url,
        httpx.Client(base_url=url) as api,
    ):
        kept = [submit(api, headers=bearer(ALICE))["id"] for _ in range(2)]
        refused = alices_refused_submit(api)
        assert refused.status_code == 429
        assert refused.json()["code"] == "tenant_limit"
        assert "TENANT_MAX_QUEUED" in refused.json()["detail"]
        assert int(refused.headers["Retry-After"]) >= 1
        submit(api, headers=bearer(BOB))  # Bob's queue is his own
        api.post(f"/sdapi/v1/jobs/{kept[0]}/cancel", headers=bearer(ALICE))
        submit(api, headers=bearer(ALICE))  # a place freed


def test_a_tenant_over_its_submit_rate_gets_429_with_the_seconds_to_wait(
    database_url: str,
    settings_for,  # type: ignore[no-untyped-def]
) -> None:
    with (
        serve_with(database_url, settings_for, tenant_submits_per_minute=3) as url,
        httpx.Client(base_url=url) as api,
    ):
        for _ in range(3):
            submit(api, headers=bearer(ALICE))
        refused = alices_refused_submit(api)
        assert refused.status_code == 429 and "SUBMITS_PER_MINUTE" in refused.json()["detail"]
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        submit(api, headers=bearer(BOB))


def test_concurrent_submits_do_not_pass_the_queue_limit(
    database_url: str,
    settings_for,  # type: ignore[no-untyped-def]
) -> None:
    """Submits that arrive together are stored in one transaction: the limit counts them all."""
    with serve_with(database_url, settings_for, tenant_max_queued=5) as url:

        async def burst() -> list[int]:
            async with httpx.AsyncClient(base_url=url) as client:
                answers = await asyncio.gather(
                    *(
                        client.post(
                            "/sdapi/v1/txt2img",
                            json={"prompt": "cat"},
                            headers={**bearer(ALICE), "Prefer": "respond-async"},
                        )
                        for _ in range(20)
                    )
                )
            return sorted(answer.status_code for answer in answers)

        assert asyncio.run(burst()) == [202] * 5 + [429] * 15


def test_the_queue_shows_a_tenant_its_own_jobs_at_their_places_among_everyones(
    api: httpx.Client,
) -> None:
    bobs = submit(api, headers=bearer(BOB))["id"]
    alices = submit(api, headers=bearer(ALICE))["id"]
    seen = api.get("/sdapi/v1/queue", headers=bearer(ALICE)).json()
    assert [(job["id"], job["position"]) for job in seen["queued"]] == [(alices, 2)]
    assert seen["queued_total"] == 2 and bobs not in str(seen)
    everyone = api.get("/sdapi/v1/queue", headers=bearer(OPS)).json()
    assert [job["id"] for job in everyone["queued"]] == [bobs, alices]
