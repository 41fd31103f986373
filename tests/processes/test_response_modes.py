"""How a generation request is answered: as A1111 does by default, async when asked, and never
left hanging: a waiting client that goes away cancels its queued job, and a request fails fast
when no backend can run it. Real API and worker processes, a fake A1111 on loopback."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fakes.a1111 import FakeA1111
from tests.fakes.webhook_sink import WebhookSink
from tests.processes.conftest import serving
from tests.servers import ASYNC, free_port, serve, wait_for
from tests.stack import Stack

pytestmark = pytest.mark.slow

BODY = {"prompt": "a lighthouse", "steps": 5}


@pytest.fixture
def fake() -> Iterator[FakeA1111]:
    with serving(FakeA1111(service_time=0.05)) as fake:
        yield fake


def make_stack(tmp: Path, backends: list[str], *, worker: bool = True, **env: str) -> Stack:
    stack = Stack(tmp, backends, **env)
    api = stack.start_api()
    if worker:
        stack.start_worker()
        wait_for(lambda: api.get("/health").json()["workers"], what="the worker's heartbeat")
    return stack


@pytest.fixture
def stack(tmp_path: Path, fake: FakeA1111) -> Iterator[Stack]:
    made = make_stack(tmp_path, [fake.url])  # type: ignore[attr-defined]
    yield made
    made.close()


def plain(stack: Stack) -> httpx.Client:
    """A client as A1111 clients are: no Prefer header, nothing proxy-specific."""
    client = httpx.Client(base_url=stack.base, timeout=30)
    stack.closers.append(client.close)
    return client


def test_a_plain_txt2img_is_answered_as_a1111_does_with_the_job_id_in_headers(
    stack: Stack, fake: FakeA1111
) -> None:
    response = plain(stack).post("/sdapi/v1/txt2img", json=BODY)
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"images", "parameters", "info"}
    assert json.loads(body["info"])["prompt"] == "a lighthouse"
    job_id = response.headers["x-job-id"]
    assert response.headers["location"] == f"/sdapi/v1/jobs/{job_id}"
    assert stack.job(job_id)["status"] == "completed"
    assert len(fake.generation_requests()) == 1


def test_prefer_respond_async_or_a_webhook_url_gets_202_with_the_job(
    tmp_path: Path, fake: FakeA1111
) -> None:
    with serve(WebhookSink().app) as sink:
        stack = make_stack(tmp_path, [fake.url], A1111_PROXY_WEBHOOK_ALLOW_PRIVATE="true")  # type: ignore[attr-defined]
        try:
            client = plain(stack)
            asked = client.post("/sdapi/v1/txt2img", json=BODY, headers=ASYNC)
            hooked = client.post("/sdapi/v1/txt2img", json={**BODY, "webhook_url": sink + "/h"})
            for response in (asked, hooked):
                assert response.status_code == 202, response.text
                assert response.json()["status"] in ("queued", "processing", "completed")
                stack.wait_status(response.json()["id"], "completed")
        finally:
            stack.close()


@pytest.mark.parametrize(("mode", "expected"), [("async", 202), ("wait", 200)])
def test_response_mode_forces_one_answer_for_requests_that_state_no_preference(
    tmp_path: Path, fake: FakeA1111, mode: str, expected: int
) -> None:
    stack = make_stack(
        tmp_path,
        [fake.url],
        A1111_PROXY_RESPONSE_MODE=mode,  # type: ignore[attr-defined]
        A1111_PROXY_WEBHOOK_ALLOW_PRIVATE="true",
    )
    try:
        client = plain(stack)
        assert client.post("/sdapi/v1/txt2img", json=BODY).status_code == expected
        hooked = client.post(
            "/sdapi/v1/txt2img", json={**BODY, "webhook_url": "http://127.0.0.1:9/hook"}
        )
        assert hooked.status_code == expected
    finally:
        stack.close()


# --- a waiting client that goes away --------------------------------------------------------


def hold(base: str, body: dict[str, object]) -> socket.socket:
    """Send a waiting txt2img on a raw socket and leave it open (the caller closes it)."""
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    data = json.dumps(body).encode()
    sock.sendall(
        b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data
    )
    return sock


def newest_job(stack: Stack, prompt: str) -> dict[str, object]:
    """The newest job with this prompt (the waiting client never saw its id); {} if none yet."""
    assert stack.api is not None
    jobs = stack.api.get("/sdapi/v1/jobs").json()["jobs"]
    return next((job for job in jobs if job["request"]["prompt"] == prompt), {})


def test_a_waiting_client_that_goes_away_cancels_its_job_before_it_starts(
    stack: Stack, fake: FakeA1111
) -> None:
    fake.service_time = 3.0
    busy = stack.submit(prompt="keeps the only backend busy")
    wait_for(lambda: fake.in_flight == 1, what="the first job to run")
    sock = hold(stack.base, {**BODY, "prompt": "nobody waits for me"})
    wait_for(
        lambda: newest_job(stack, "nobody waits for me").get("status") == "queued",
        what="the waiting job to be queued",
    )
    sock.close()
    job = wait_for(
        lambda: (j := newest_job(stack, "nobody waits for me")).get("status") == "canceled" and j,
        timeout=10,
        what="the abandoned job to be canceled",
    )
    assert job["error"]["code"] == "client_gone"
    stack.wait_status(busy, "completed")
    assert [r.body["prompt"] for r in fake.generation_requests()] == ["keeps the only backend busy"]


def test_a_waiting_client_that_goes_away_while_its_job_runs_leaves_the_result(
    stack: Stack, fake: FakeA1111
) -> None:
    fake.service_time = 1.0
    sock = hold(stack.base, {**BODY, "prompt": "finish me anyway"})
    wait_for(lambda: fake.in_flight == 1, what="the job to run")
    sock.close()
    wait_for(lambda: newest_job(stack, "finish me anyway"), what="the job")
    job_id = str(newest_job(stack, "finish me anyway")["id"])
    job = stack.wait_status(job_id, "completed", "canceled", "error")
    assert job["status"] == "completed" and job["result"]["images"]


def test_with_cancel_on_disconnect_off_an_abandoned_job_still_runs(
    tmp_path: Path, fake: FakeA1111
) -> None:
    stack = make_stack(tmp_path, [fake.url], A1111_PROXY_CANCEL_ON_DISCONNECT="false")  # type: ignore[attr-defined]
    try:
        fake.service_time = 1.0
        stack.submit(prompt="keeps the only backend busy")
        wait_for(lambda: fake.in_flight == 1, what="the first job to run")
        sock = hold(stack.base, {**BODY, "prompt": "run me anyway"})
        wait_for(
            lambda: newest_job(stack, "run me anyway").get("status") == "queued",
            what="the waiting job to be queued",
        )
        sock.close()
        job_id = str(newest_job(stack, "run me anyway")["id"])
        assert stack.wait_status(job_id, "completed", "canceled")["status"] == "completed"
    finally:
        stack.close()


# --- nothing can run the job ------------------------------------------------------------------


def test_a_waiting_request_gets_a1111s_503_naming_the_backend_once_none_answers(
    tmp_path: Path,
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    stack = make_stack(tmp_path, [dead], A1111_PROXY_BACKEND_DOWN_GRACE="1")
    try:
        client = plain(stack)
        queued = client.post(
            "/sdapi/v1/txt2img", json={**BODY, "prompt": "later"}, headers=ASYNC
        ).json()
        response = client.post("/sdapi/v1/txt2img", json=BODY)
        assert response.status_code == 503
        body = response.json()
        assert set(body) == {"error", "detail", "body", "errors", "code", "job_id"}
        assert dead in body["detail"] and body["code"] == "backend_unavailable"
        assert response.headers["retry-after"] == "30"
        assert body["job_id"] == response.headers["x-job-id"]
        assert response.headers["location"] == f"/sdapi/v1/jobs/{body['job_id']}"
        job = stack.job(response.headers["x-job-id"])
        assert job["status"] == "canceled" and job["error"]["code"] == "backend_unavailable"
        # The async job waits on, and says why.
        waiting = stack.job(queued["id"])
        assert waiting["status"] == "queued" and dead in waiting["waiting_reason"]
    finally:
        stack.close()


def test_without_a_worker_a_waiting_request_fails_after_the_grace_period_saying_what_to_start(
    tmp_path: Path, fake: FakeA1111
) -> None:
    stack = make_stack(tmp_path, [fake.url], worker=False, A1111_PROXY_BACKEND_DOWN_GRACE="1")  # type: ignore[attr-defined]
    try:
        response = plain(stack).post("/sdapi/v1/txt2img", json=BODY)
        assert response.status_code == 503
        assert "a1111-proxy worker" in response.json()["detail"]
    finally:
        stack.close()


def test_catalogue_routes_answer_503_until_a_catalogue_was_fetched_then_say_its_age(
    tmp_path: Path, fake: FakeA1111
) -> None:
    stack = make_stack(tmp_path, [fake.url], worker=False)  # type: ignore[attr-defined]
    try:
        client = plain(stack)
        for path in (
            "/sdapi/v1/sd-models",
            "/sdapi/v1/options",
            "/sdapi/v1/samplers",
            "/sdapi/v1/loras",
        ):
            response = client.get(path)
            assert response.status_code == 503, path
            assert "a1111-proxy worker" in response.json()["detail"]
        stack.start_worker()
        models = wait_for(
            lambda: (r := client.get("/sdapi/v1/sd-models")).status_code == 200 and r,
            what="the catalogue",
        )
        assert models.json() and int(models.headers["age"]) >= 0
        samplers = wait_for(
            lambda: "age" in (r := client.get("/sdapi/v1/samplers")).headers and r,
            what="the samplers (fetched after the models)",
        )
        assert samplers.json() and samplers.headers["age"].isdigit()
    finally:
        stack.close()
