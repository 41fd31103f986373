"""CORS for browser clients, and the deadline inputs (Cancel-After, timeout), against the real
app served by uvicorn on loopback over a SQLite file."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from a1111_proxy.app import create_app
from a1111_proxy.migrate import upgrade
from a1111_proxy.settings import Settings
from tests.servers import ASYNC, serve

ORIGIN = "https://studio.example"
TOKEN = "s3cret-token"


def _serve(tmp_path: Path, **values: object) -> Iterator[httpx.Client]:
    url = f"sqlite+aiosqlite:///{tmp_path}/jobs.db"
    upgrade(url)
    settings = Settings(_env_file=None, database_url=url, **values)  # type: ignore[call-arg]
    with (
        serve(create_app(settings)) as base,
        httpx.Client(base_url=base, timeout=10, headers=ASYNC) as client,
    ):
        yield client


@pytest.fixture(scope="module")
def cors_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    yield from _serve(
        tmp_path_factory.mktemp("cors"),
        cors_origins=f"{ORIGIN}, https://other.example",
        api_tokens=TOKEN,
    )


@pytest.fixture(scope="module")
def plain_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    yield from _serve(tmp_path_factory.mktemp("plain"))


def test_a_preflight_with_auth_headers_is_allowed_for_a_listed_origin_without_a_token(
    cors_api: httpx.Client,
) -> None:
    response = cors_api.options(
        "/sdapi/v1/txt2img",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, idempotency-key",
        },
    )
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == ORIGIN
    allowed = response.headers["access-control-allow-headers"].lower()
    assert {"authorization", "content-type", "idempotency-key", "cancel-after"} <= {
        h.strip() for h in allowed.split(",")
    }
    assert "POST" in response.headers["access-control-allow-methods"]


def test_a_browser_can_read_the_job_location_and_id_headers(cors_api: httpx.Client) -> None:
    response = cors_api.post(
        "/sdapi/v1/txt2img",
        json={"prompt": "cat"},
        headers={"Origin": ORIGIN, "Authorization": f"Bearer {TOKEN}"},
    )
    assert response.status_code == 202
    assert response.headers["access-control-allow-origin"] == ORIGIN
    exposed = {
        h.strip().lower() for h in response.headers["access-control-expose-headers"].split(",")
    }
    assert {"location", "x-job-id"} <= exposed


def test_auth_still_applies_and_its_401_is_readable_by_the_browser(cors_api: httpx.Client) -> None:
    response = cors_api.get("/sdapi/v1/jobs", headers={"Origin": ORIGIN})
    assert response.status_code == 401
    assert response.headers["access-control-allow-origin"] == ORIGIN


def test_an_origin_not_listed_gets_no_cors_headers(cors_api: httpx.Client) -> None:
    preflight = cors_api.options(
        "/sdapi/v1/jobs",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"},
    )
    assert preflight.status_code == 400
    response = cors_api.get(
        "/sdapi/v1/jobs",
        headers={"Origin": "https://evil.example", "Authorization": f"Bearer {TOKEN}"},
    )
    assert response.status_code == 200 and "access-control-allow-origin" not in response.headers


def test_without_cors_origins_no_cors_headers_are_sent(plain_api: httpx.Client) -> None:
    response = plain_api.get("/sdapi/v1/jobs", headers={"Origin": ORIGIN})
    assert response.status_code == 200
    assert not any(name.startswith("access-control-") for name in response.headers)


@pytest.mark.parametrize("value", ["abc", "0", "-5", "nan", "inf", "1e12"])
def test_cancel_after_must_be_a_positive_number_of_seconds(
    plain_api: httpx.Client, value: str
) -> None:
    response = plain_api.post(
        "/sdapi/v1/txt2img", json={"prompt": "cat"}, headers={"Cancel-After": value}
    )
    assert response.status_code == 422
    [issue] = response.json()["detail"]
    assert issue["loc"] == ["header", "Cancel-After"] and "seconds" in issue["msg"]


@pytest.mark.parametrize("value", [0, -1, "soon", 1e12])
def test_the_timeout_field_must_be_a_positive_number_of_seconds(
    plain_api: httpx.Client, value: object
) -> None:
    response = plain_api.post("/sdapi/v1/txt2img", json={"prompt": "cat", "timeout": value})
    assert response.status_code == 422
    assert [issue["loc"] for issue in response.json()["detail"]] == [["body", "timeout"]]


def test_a_deadline_is_shown_on_the_job_and_the_earlier_of_header_and_field_wins(
    plain_api: httpx.Client,
) -> None:
    job = plain_api.post(
        "/sdapi/v1/txt2img", json={"prompt": "cat", "timeout": 600}, headers={"Cancel-After": "60"}
    ).json()
    assert "timeout" not in job["request"]  # ours, never sent to A1111
    from datetime import datetime

    created = datetime.fromisoformat(job["created_at"])
    deadline = datetime.fromisoformat(job["deadline_at"])
    assert 59 < (deadline - created).total_seconds() < 61
    detail = plain_api.get(f"/sdapi/v1/jobs/{job['id']}").json()
    assert detail["queue_position"] == 1 and detail["deadline_at"] == job["deadline_at"]
