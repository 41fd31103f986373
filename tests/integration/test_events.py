"""Live job events (SSE) from an API in this process, over a SQLite file: what the API process
keeps per stream. The streams between real processes are in tests/processes/test_events.py."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.servers import ASYNC, serve, wait_for
from tests.sse import parse


def submit(client: httpx.Client, **body: object) -> str:
    response = client.post("/sdapi/v1/txt2img", json={"prompt": "cat", "steps": 10, **body})
    assert response.status_code == 202, response.text
    return response.json()["id"]


def test_a_client_that_goes_away_is_forgotten_by_its_api_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from a1111_proxy import app as app_module
    from a1111_proxy.migrate import upgrade
    from a1111_proxy.settings import Settings
    from a1111_proxy.waiter import JobWaiter

    made: list[JobWaiter] = []

    class Recorded(JobWaiter):
        def __init__(self, *args: object) -> None:
            super().__init__(*args)  # type: ignore[arg-type]
            made.append(self)

    monkeypatch.setattr(app_module, "JobWaiter", Recorded)
    url = f"sqlite+aiosqlite:///{tmp_path}/jobs.db"
    upgrade(url)
    settings = Settings(_env_file=None, database_url=url)  # type: ignore[call-arg]
    with (
        serve(app_module.create_app(settings)) as base,
        httpx.Client(base_url=base, headers=ASYNC) as client,
    ):
        job_id = submit(client)
        for _ in range(3):  # one after the other, each hanging up mid-stream
            with client.stream("GET", f"/sdapi/v1/jobs/{job_id}/events") as response:
                events = parse(response.iter_lines())  # held: dropping it hangs up
                next(e for e in events if e.event == "status")
                assert made[0].followers >= 1
        wait_for(lambda: made[0].followers == 0, timeout=5, what="the streams to be forgotten")
