"""SERVE_PROCESSES: `serve` runs several API processes on one port. Each answers submits, held
(A1111-style) requests and event streams for jobs a worker completes in another process, and
one that dies is started again. Real processes, BACKEND=fake, one SQLite file."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.servers import ASYNC, Proc, free_port, wait_for, wait_http
from tests.stack import FAST_WORKER

pytestmark = pytest.mark.slow
PROCESSES = 2


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Proc, str]]:
    port = free_port()
    env = {
        **FAST_WORKER,
        "A1111_PROXY_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'jobs.db'}",
        "A1111_PROXY_BACKEND": "fake",
        "A1111_PROXY_FAKE_SECONDS": "0.05",
        "A1111_PROXY_FAKE_SLOTS": "2",
        "A1111_PROXY_SERVE_PROCESSES": str(PROCESSES),
    }
    migrate = Proc(["migrate"], env, tmp_path / "migrate.log")
    migrate.popen.wait(timeout=60)
    migrate.stop(timeout=5)
    api = Proc(["serve", "--port", str(port)], env, tmp_path / "serve.log")
    worker = Proc(["worker"], env, tmp_path / "worker.log")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/ready", timeout=60, proc=api)
        wait_for(lambda: len(_children(api.pid)) == PROCESSES, timeout=60, what="API processes")
        yield api, base
    finally:
        worker.stop(timeout=30)
        api.stop(timeout=30)


def _children(pid: int) -> list[int]:
    with contextlib.suppress(FileNotFoundError):
        listed = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        return [int(child) for child in listed if _is_python(int(child))]
    return []


def _is_python(pid: int) -> bool:
    with contextlib.suppress(FileNotFoundError):
        # multiprocessing's resource tracker is a child too; the API processes run uvicorn.
        return b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    return False


async def _held_txt2img(base: str, n: int) -> list[httpx.Response]:
    """n A1111-style requests at once, each on its own connection (so both processes get
    some), held until their jobs are done."""
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:
        return await asyncio.gather(
            *(
                client.post("/sdapi/v1/txt2img", json={"prompt": f"cat {i}", "steps": 2})
                for i in range(n)
            )
        )


def test_several_api_processes_hold_a1111_requests_until_a_worker_completes_them(
    served: tuple[Proc, str],
) -> None:
    _, base = served
    answers = asyncio.run(_held_txt2img(base, 16))
    assert [answer.status_code for answer in answers] == [200] * 16
    assert all(answer.json()["images"] for answer in answers)
    assert len({answer.headers["X-Job-Id"] for answer in answers}) == 16


def test_an_event_stream_on_any_process_sees_its_job_complete(served: tuple[Proc, str]) -> None:
    _, base = served
    for _ in range(4):  # new connections: the streams land on both processes
        with httpx.Client(base_url=base, timeout=60, headers=ASYNC) as api:
            job = api.post("/sdapi/v1/txt2img", json={"prompt": "cat", "steps": 2}).json()
        with (
            httpx.Client(base_url=base, timeout=60) as watcher,
            watcher.stream("GET", f"/sdapi/v1/jobs/{job['id']}/events") as stream,
        ):
            events = [line for line in stream.iter_lines() if line.startswith("event:")]
        assert events[-1] == "event: completed"


def test_an_api_process_that_dies_is_started_again_and_the_port_keeps_answering(
    served: tuple[Proc, str],
) -> None:
    api, base = served
    victim = _children(api.pid)[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(
        lambda: len(_children(api.pid)) == PROCESSES and victim not in _children(api.pid),
        timeout=60,
        what="the killed API process to be replaced",
    )
    with httpx.Client(base_url=base, timeout=30, headers=ASYNC) as client:
        for _ in range(10):
            assert client.get("/ready").status_code == 200
