"""Log lines: JSON when not on a terminal, text on one, the job id on every line about a job.
What the real API and worker processes write is in tests/processes/test_logs.py."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from a1111_proxy import logs


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
