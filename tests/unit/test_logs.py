"""Log lines: JSON when not on a terminal, text on one, the job id on every line about a job."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from a1111_proxy import logs
from tests.fakes.a1111 import FakeA1111
from tests.stack import Stack


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def root_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)


def test_lines_are_json_with_the_job_id_when_stderr_is_not_a_terminal(root_logging: None) -> None:
    out = io.StringIO()
    logs.configure("info", "auto", out)
    token = logs.job_id_var.set("job-123")
    try:
        logging.getLogger("a1111_proxy.worker").info("generating %d images", 2)
    finally:
        logs.job_id_var.reset(token)
    logging.getLogger("a1111_proxy").warning("about nothing in particular")
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["message"] == "generating 2 images" and first["job_id"] == "job-123"
    assert first["level"] == "info" and first["logger"] == "a1111_proxy.worker"
    assert first["time"].endswith("Z")
    assert second["message"] == "about nothing in particular" and "job_id" not in second


def test_an_exception_is_kept_inside_its_json_line(root_logging: None) -> None:
    out = io.StringIO()
    logs.configure("info", "json", out)
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("x").exception("failed", extra={"job_id": "j-9"})
    [line] = out.getvalue().splitlines()
    record = json.loads(line)
    assert record["job_id"] == "j-9" and "ValueError: boom" in record["exception"]


def test_a_terminal_gets_plain_text_naming_the_job(root_logging: None) -> None:
    out = Terminal()
    logs.configure("info", "auto", out)
    logging.getLogger("a1111_proxy.worker").info("waiting", extra={"job_id": "job-7"})
    line = out.getvalue().strip()
    assert " INFO a1111_proxy.worker: waiting [job job-7]" in line
    with pytest.raises(ValueError):
        json.loads(line)


def test_worker_and_api_processes_write_json_lines_that_name_the_job(tmp_path: Path) -> None:
    from tests.servers import serve

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
