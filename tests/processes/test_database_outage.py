"""PostgreSQL going away while the system runs (a restart, a failover): every process rides it out,
no job is lost, and a client is told what happened while it lasts.

The processes reach the real PostgreSQL through a TCP relay (tests/relay.py) that the test cuts:
the port refuses connections and every open connection (pooled ones, LISTEN ones) is closed, as
a server restart looks from the client side.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import make_url

from tests.conftest import _pg, _truncate_pg
from tests.fakes.a1111 import FakeA1111
from tests.processes.conftest import serving
from tests.relay import Relay
from tests.stack import Stack

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

OUTAGE_SECONDS = 3.0  # longer than the stack's 2 s lease, in two halves: down, then starting


@pytest.fixture
def relay(postgres_url: str) -> Iterator[Relay]:
    _truncate_pg(postgres_url)
    with Relay(make_url(postgres_url).port or 5432) as made:
        yield made


@pytest.fixture
def fake() -> Iterator[FakeA1111]:
    with serving(FakeA1111(service_time=0.8)) as made:
        yield made


@pytest.fixture
def stack(tmp_path: Path, fake: FakeA1111, relay: Relay, postgres_url: str) -> Iterator[Stack]:
    url = make_url(postgres_url).set(port=relay.port).render_as_string(hide_password=False)
    made = Stack(tmp_path, [fake.url], database_url=url)  # type: ignore[attr-defined]
    try:
        yield made
    finally:
        made.close()


def test_a_database_outage_while_jobs_run_loses_no_job_and_every_process_rides_it_out(
    stack: Stack, relay: Relay, fake: FakeA1111
) -> None:
    api = stack.start_api()
    worker = stack.start_worker(A1111_PROXY_POLL_SECONDS="30")
    ids = [stack.submit(prompt=f"before {i}") for i in range(4)]
    waited: dict[str, httpx.Response] = {}

    def wait_mode_client() -> None:  # an A1111 client: no Prefer header, it waits for images
        body = {"prompt": "a client waiting through it", "steps": 2}
        waited["answer"] = httpx.post(f"{stack.base}/sdapi/v1/txt2img", json=body, timeout=120)

    waiting = threading.Thread(target=wait_mode_client)
    waiting.start()
    stack.wait_status(ids[0], "processing")

    database = make_url(stack.url).database
    relay.cut()  # the server is down: connections refused
    try:
        read = api.get(f"/sdapi/v1/jobs/{ids[1]}")
        posted = api.post("/sdapi/v1/txt2img", json={"prompt": "during"})
        time.sleep(OUTAGE_SECONDS / 2)
        # Back, but not letting anyone in yet, as while PostgreSQL starts up.
        _pg(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
        relay.restore()
        starting = api.get(f"/sdapi/v1/jobs/{ids[2]}")
        time.sleep(OUTAGE_SECONDS / 2)
    finally:
        _pg(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
        relay.restore()

    for answer in (read, posted, starting):
        assert answer.status_code == 503, answer.text
        assert answer.json()["code"] == "database_unavailable"
        assert "database" in answer.json()["detail"] and "retry" in answer.json()["detail"]
        assert int(answer.headers["Retry-After"]) >= 1

    for job_id in ids:
        job = stack.wait_status(job_id, "completed", "failed", "error", timeout=60)
        assert job["status"] == "completed", job
    waiting.join(timeout=60)
    answer = waited["answer"]
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["images"]) == 1

    # The same processes, still listening: an idle worker takes a new job on its wake-up, not
    # on its next look (once a second), so its LISTEN connection came back too.
    assert worker.popen.poll() is None and stack.api_proc is not None
    assert stack.api_proc.popen.poll() is None
    waits = []
    for i in range(4):
        time.sleep(0.3)  # the worker is idle, waiting on LISTEN
        after = stack.wait_status(stack.submit(prompt=f"after {i}"), "completed", timeout=30)
        waits.append(_seconds(after["started_at"]) - _seconds(after["created_at"]))
    assert max(waits) < 0.5, waits
    # And the API's: a waiting client is answered on the job's NOTIFY, not on the API's own
    # look (once a second; short jobs, so that such a look would come 0.8 s late).
    fake.service_time = 0.2
    late = []
    for i in range(4):
        began = time.monotonic()
        answer = httpx.post(f"{stack.base}/sdapi/v1/txt2img", json={"prompt": f"w{i}"}, timeout=30)
        assert answer.status_code == 200, answer.text
        late.append(time.monotonic() - began - fake.service_time)
    assert max(late) < 0.5, late
    prompts = [r.body["prompt"] for r in fake.generation_requests()]
    assert {f"before {i}" for i in range(4)} <= set(prompts)


def _seconds(stamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
