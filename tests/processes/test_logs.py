"""Log lines of the real API and worker processes: JSON lines that name the job."""

from __future__ import annotations

import json
from pathlib import Path

from tests.fakes.a1111 import FakeA1111
from tests.servers import serve
from tests.stack import Stack


def test_worker_and_api_processes_write_json_lines_that_name_the_job(tmp_path: Path) -> None:
    fake = FakeA1111(service_time=0.05)
    with serve(fake.app) as url:
        stack = Stack(tmp_path, [url])
        try:
            stack.start_api()
            worker = stack.start_worker()
            job_id = stack.submit()
            stack.wait_status(job_id, "completed")
            api_lines = [json.loads(line) for line in stack.api_proc.output().splitlines()]
            worker_lines = [json.loads(line) for line in worker.output().splitlines()]
        finally:
            stack.close()
    assert any("Application startup complete" in line["message"] for line in api_lines)
    about_job = [line for line in worker_lines if job_id in line["message"]]
    assert len(about_job) >= 2  # the attempt, the completion
    assert all(line["job_id"] == job_id for line in about_job)
