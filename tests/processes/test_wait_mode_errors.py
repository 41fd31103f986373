"""Every error a held request can get (RESPONSE_MODE=auto, no Prefer header), as the client reads
it: A1111's refusal as A1111 sent it, every other failure in A1111's error shape (`error`,
`detail`, `body`, `errors`) with `code` and `job_id`, and the job in `Location` and `X-Job-Id`.
Real API and worker processes (one attempt per job), the fake A1111 on loopback."""

from __future__ import annotations

import json
import signal
import socket
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fakes.a1111 import FakeA1111
from tests.servers import wait_for
from tests.stack import Stack

pytestmark = pytest.mark.slow

ERROR_SHAPE = {"error", "detail", "body", "errors", "code", "job_id"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, fake: FakeA1111) -> Iterator[Stack]:
    made = Stack(
        tmp_path_factory.mktemp("wait-errors"),
        [fake.url],  # type: ignore[attr-defined]
        A1111_PROXY_MAX_ATTEMPTS="1",  # a failure ends the job: what the held client gets
        A1111_PROXY_CONNECT_RETRIES="1",
    )
    try:
        api = made.start_api()
        made.start_worker()
        wait_for(lambda: api.get("/health").json()["workers"], what="the worker's heartbeat")
        yield made
    finally:
        made.close()


@pytest.fixture
def held(api: httpx.Client) -> Iterator[Callable[..., Future[httpx.Response]]]:
    """Send a held request in the background (as A1111 clients do: no Prefer header)."""
    pool = ThreadPoolExecutor(4)

    def send(body: dict[str, Any], **headers: str) -> Future[httpx.Response]:
        return pool.submit(api.post, "/sdapi/v1/txt2img", json=body, headers=headers)

    yield send
    pool.shutdown(wait=False, cancel_futures=True)  # a failed test may leave a request held


@pytest.fixture
def busy(stack: Stack, fake: FakeA1111) -> Iterator[str]:
    """The only backend runs a long job of someone else's, so new jobs stay queued; canceled
    (interrupted at once) afterwards."""
    job_id = stack.submit(prompt="keeps the backend busy", fake_seconds=120)
    stack.wait_status(job_id, "processing")
    wait_for(lambda: fake.current is not None, what="the long job to run on A1111")
    yield job_id
    assert stack.api is not None
    stack.api.post(f"/sdapi/v1/jobs/{job_id}/cancel")
    stack.wait_status(job_id, "canceled", "completed")


def job_with_prompt(stack: Stack, prompt: str) -> dict[str, Any]:
    """The newest job with this prompt (a held client sees its id only in the answer)."""
    assert stack.api is not None
    jobs = stack.api.get("/sdapi/v1/jobs").json()["jobs"]
    return next((job for job in jobs if job["request"].get("prompt") == prompt), {})


def queued_job(stack: Stack, prompt: str) -> str:
    job = wait_for(
        lambda: (j := job_with_prompt(stack, prompt)).get("status") == "queued" and j,
        what=f"the job {prompt!r} to be queued",
    )
    return str(job["id"])


def our_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The answer is ours, in A1111's error shape, naming the job it is about."""
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert set(body) == ERROR_SHAPE
    assert body["code"] == code and body["error"]
    assert body["detail"] and body["errors"] == body["detail"] and body["body"] == ""
    assert body["job_id"] == response.headers["x-job-id"]
    assert response.headers["location"] == f"/sdapi/v1/jobs/{body['job_id']}"
    return body


# --- the job ended on the backend --------------------------------------------------------------


def test_a1111s_own_500_comes_back_as_a1111_sent_it_with_the_job_in_the_headers(
    stack: Stack, fake: FakeA1111, api: httpx.Client
) -> None:
    fake.fail_next(1, status=500)  # A1111's exception handler: its error shape
    response = api.post("/sdapi/v1/txt2img", json={"prompt": "fails on A1111"})
    assert response.status_code == 500
    assert response.json() == {
        "error": "RuntimeError",
        "detail": "",
        "body": "",
        "errors": "fake failure",
    }
    job = stack.job(response.headers["x-job-id"])
    assert response.headers["location"] == f"/sdapi/v1/jobs/{job['id']}"
    assert job["status"] == "error" and job["error"]["code"] == "backend_rejected"
    assert job["error"]["backend_status"] == 500


def test_an_answer_that_is_not_a1111s_is_a_502_naming_the_backend(
    stack: Stack, fake: FakeA1111, api: httpx.Client
) -> None:
    fake.garbage_next()
    body = our_error(
        api.post("/sdapi/v1/txt2img", json={"prompt": "garbage"}), 502, "backend_bad_response"
    )
    assert fake.url in body["detail"] and "--api" in body["detail"]  # type: ignore[attr-defined]
    assert stack.job(body["job_id"])["status"] == "error"


@pytest.mark.parametrize(
    ("status", "answer", "says"),
    [
        (404, {"detail": "Not Found"}, "--api"),  # A1111 started without --api
        (405, {"detail": "Method Not Allowed"}, "--api"),
    ],
)
def test_an_a1111_that_the_proxy_cannot_use_is_a_502_not_a_refusal_of_the_clients_request(
    fake: FakeA1111, api: httpx.Client, status: int, answer: dict[str, str], says: str
) -> None:
    fake.fail_next(1, status=status, body=answer)
    response = api.post("/sdapi/v1/txt2img", json={"prompt": "misconfigured"})
    body = our_error(response, 502, "backend_bad_response")
    assert f"HTTP {status}" in body["detail"] and says in body["detail"]
    assert "www-authenticate" not in response.headers  # the client's own credentials are fine


def test_an_a1111_that_wants_a_password_is_a_503_saying_to_set_a1111_auth(
    fake: FakeA1111, api: httpx.Client
) -> None:
    """A 401 from A1111 (--api-auth, no A1111_AUTH) leaves the backend unusable until the
    operator sets the password: the job goes back to the queue, and the held client gets 503
    and what to set, never the 401 (its own credentials are fine)."""
    fake.fail_next(1, status=401, body={"detail": "Incorrect username or password"})
    response = api.post("/sdapi/v1/txt2img", json={"prompt": "misconfigured"})
    body = our_error(response, 503, "backend_unavailable")
    assert "HTTP 401" in body["detail"] and "A1111_PROXY_A1111_AUTH" in body["detail"]
    assert "www-authenticate" not in response.headers


def test_a1111_refusing_what_is_missing_is_still_its_own_404(
    fake: FakeA1111, api: httpx.Client
) -> None:
    refusal = {"error": "HTTPException", "detail": "Sampler not found", "body": "", "errors": ""}
    fake.fail_next(1, status=404, body=refusal)
    response = api.post("/sdapi/v1/txt2img", json={"prompt": "x", "sampler_name": "nope"})
    assert response.status_code == 404 and response.json() == refusal


@pytest.mark.parametrize(
    "last_answer",
    [
        {"status": 503},  # a gateway: text, no body kept
        {"status": 500, "body": "Internal Server Error"},  # not A1111's error shape
    ],
)
def test_a1111_unavailable_through_every_attempt_is_a_503_to_retry_later_never_a_bare_500(
    stack: Stack, fake: FakeA1111, api: httpx.Client, last_answer: dict[str, Any]
) -> None:
    fake.fail_next(1, **last_answer)
    response = api.post("/sdapi/v1/txt2img", json={"prompt": "unavailable"})
    body = our_error(response, 503, "backend_unavailable")
    assert response.headers["retry-after"] == "30"
    assert f"HTTP {last_answer['status']}" in body["detail"] and fake.url in body["detail"]  # type: ignore[attr-defined]
    job = stack.job(body["job_id"])
    assert job["status"] == "error" and job["error"]["backend_status"] == last_answer["status"]


# --- the job ended before it ran ---------------------------------------------------------------


def test_a_job_canceled_by_someone_else_before_it_ran_is_a_409(
    stack: Stack, busy: str, held: Callable[..., Future[httpx.Response]]
) -> None:
    waiting = held({"prompt": "canceled by another"})
    job_id = queued_job(stack, "canceled by another")
    assert stack.api is not None
    stack.api.post(f"/sdapi/v1/jobs/{job_id}/cancel")
    body = our_error(waiting.result(timeout=30), 409, "canceled")
    assert body["job_id"] == job_id and "before it started" in body["detail"]


def test_a_deadline_that_passes_before_the_job_ran_is_a_504(
    stack: Stack, busy: str, held: Callable[..., Future[httpx.Response]]
) -> None:
    waiting = held({"prompt": "too late"}, **{"Cancel-After": "0.5"})
    body = our_error(waiting.result(timeout=30), 504, "deadline")
    assert "Cancel-After" in body["detail"]
    assert stack.job(body["job_id"])["status"] == "canceled"


def test_an_idempotency_key_reused_with_another_body_is_a_422_before_anything_is_queued(
    api: httpx.Client,
) -> None:
    key = {"Idempotency-Key": "reused-key"}
    first = api.post("/sdapi/v1/txt2img", json={"prompt": "first"}, headers=key)
    assert first.status_code == 200
    again = api.post("/sdapi/v1/txt2img", json={"prompt": "second"}, headers=key)
    assert again.status_code == 422
    body = again.json()
    assert body["code"] == "idempotency_key_reused" and "Idempotency-Key" in body["detail"]
    assert {"error", "detail", "body", "errors"} <= set(body)
    assert "x-job-id" not in again.headers  # no job was made for it


def hold_with_key(base: str, body: dict[str, Any], key: str) -> socket.socket:
    """A held txt2img with an Idempotency-Key on a raw socket, left open (the caller closes)."""
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    data = json.dumps(body).encode()
    sock.sendall(
        b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Idempotency-Key: {key}\r\nContent-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    return sock


def test_a_retry_with_the_same_idempotency_key_after_the_client_went_away_gets_the_result(
    stack: Stack, busy: str, held: Callable[..., Future[httpx.Response]]
) -> None:
    body = {"prompt": "asked twice"}
    sock = hold_with_key(stack.base, body, "retried-key")
    job_id = queued_job(stack, "asked twice")
    sock.close()  # the client timed out; it will ask again with the same key
    assert stack.api_proc is not None
    wait_for(
        lambda: f"job {job_id}: its waiting client went away" in stack.api_proc.output(),
        what="the API to see the client go",
    )
    retried = held(body, **{"Idempotency-Key": "retried-key"})
    assert stack.api is not None
    stack.api.post(f"/sdapi/v1/jobs/{busy}/cancel")  # the backend is free for it
    response = retried.result(timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["x-job-id"] == job_id
    assert response.headers["idempotent-replayed"] == "true"
    assert response.json()["images"]


# --- the worker running it died ----------------------------------------------------------------


def test_a_job_whose_worker_died_with_no_attempt_left_is_a_500_worker_lost(
    tmp_path: Path, fake: FakeA1111
) -> None:
    made = Stack(tmp_path, [fake.url], A1111_PROXY_MAX_ATTEMPTS="1")  # type: ignore[attr-defined]
    try:
        api = made.start_api()
        worker = made.start_worker()
        wait_for(lambda: api.get("/health").json()["workers"], what="the worker's heartbeat")
        fake.hang_next()
        with ThreadPoolExecutor(1) as pool, httpx.Client(base_url=made.base, timeout=60) as plain:
            waiting = pool.submit(plain.post, "/sdapi/v1/txt2img", json={"prompt": "orphan"})
            wait_for(
                lambda: job_with_prompt(made, "orphan").get("status") == "processing",
                what="the job to run",
            )
            worker.signal(signal.SIGKILL)
            made.start_worker()  # its reaper finds the lease that ran out
            body = our_error(waiting.result(timeout=60), 500, "worker_lost")
        assert "worker" in body["detail"]
    finally:
        made.close()
