"""A backend URL's user name and password (A1111_URLS=http://user:pass@host:port, for an A1111
started with --api-auth) are sent to A1111 and shown nowhere: not in /health (open without a
token), the job view, the list, the queue, /metrics labels, a backend's error echoing its URL,
nor the API's and the worker's logs, at DEBUG (where httpx writes every request's URL). Real
processes: the API, a worker, the fake A1111 and a backend that is down."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fakes.a1111 import FakeA1111
from tests.servers import free_port, serve, wait_for
from tests.stack import Stack

pytestmark = pytest.mark.slow

SECRET = "pw-secret-0042"


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[Stack, FakeA1111, str, str]]:
    """The stack, the fake A1111, and the two backends as they must be shown (the down one
    first, so that the worker tries it first and logs that it does not answer)."""
    fake = FakeA1111(service_time=0.05)
    with serve(fake.app) as a1111:
        dead = f"http://127.0.0.1:{free_port()}"
        urls = [
            dead.replace("http://", f"http://admin:{SECRET}@"),
            a1111.replace("http://", f"http://sd-user:{SECRET}@"),
        ]
        made = Stack(tmp_path, urls, A1111_PROXY_LOG_LEVEL="debug")
        try:
            yield made, fake, dead, a1111
        finally:
            made.close()


def shown(api: httpx.Client, path: str) -> str:
    response = api.get(path)
    assert response.status_code in (200, 503), response.text
    assert SECRET not in response.text, f"{path} shows the password: {response.text}"
    return response.text


def test_backend_credentials_reach_a1111_and_are_shown_nowhere(
    stack: tuple[Stack, FakeA1111, str, str],
) -> None:
    made, fake, dead, a1111 = stack
    api = made.start_api()
    made.start_worker()
    done = made.submit(prompt="a lighthouse")
    assert made.wait_status(done, "completed")["backend"] == a1111
    [sent] = fake.generation_requests()
    assert sent.authorization == "Basic " + base64.b64encode(f"sd-user:{SECRET}".encode()).decode()

    # A backend error that echoes the URL it was called at, credentials and all.
    echo = f"cannot reach {a1111.replace('http://', f'http://sd-user:{SECRET}@')}/sdapi/v1/options"
    fake.fail_next(1, status=422, body={"error": "Bad", "detail": echo, "body": "", "errors": echo})
    failed = made.submit(prompt="a storm")
    error = made.wait_status(failed, "error")["error"]
    assert error["backend_status"] == 422 and "cannot reach http://127.0.0.1:" in error["message"]

    health = wait_for(
        lambda: (text := shown(api, "/health")) and dead in text and "down" in text and text,
        what="/health to show the down backend",
    )
    assert a1111 in health
    for path in (
        f"/sdapi/v1/jobs/{done}",
        f"/sdapi/v1/jobs/{failed}",
        "/sdapi/v1/jobs",
        "/sdapi/v1/queue",
    ):
        shown(api, path)
    metrics = shown(api, "/metrics")
    assert f'backend="{a1111}"' in metrics and f'backend="{dead}"' in metrics

    for proc in made.procs:
        proc.stop()
    api_log, worker_log = (proc.log_path.read_text() for proc in made.procs)
    assert f"catalogue: {dead} did not answer" in worker_log  # it says which backend failed
    assert f"{a1111}/sdapi/v1/txt2img" in worker_log  # httpx's DEBUG line, without credentials
    assert SECRET not in worker_log and SECRET not in api_log
