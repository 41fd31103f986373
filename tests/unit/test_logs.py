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


def test_no_line_shows_a_urls_user_name_and_password(root_logging: None) -> None:
    """httpx logs each request's URL (A1111_URLS may carry `user:password@`); a message, an
    exception and an `extra` field are written without them, the host still named."""
    out = io.StringIO()
    logs.configure("debug", "json", out)
    logging.getLogger("httpx").setLevel(logging.NOTSET)  # another test's configure quietened it
    url = "http://sd-user:pw-secret-0042@127.0.0.1:7860"
    logging.getLogger("httpx").info('HTTP Request: %s %s "%s"', "POST", f"{url}/x", "200 OK")
    try:
        raise ConnectionError(f"cannot reach {url}")
    except ConnectionError:
        logging.getLogger("a1111_proxy.worker").exception("failed", extra={"backend": url})
    text = out.getvalue()
    assert "pw-secret-0042" not in text and "sd-user" not in text
    first, second = (json.loads(line) for line in text.splitlines())
    assert first["message"] == 'HTTP Request: POST http://127.0.0.1:7860/x "200 OK"'
    assert "cannot reach http://127.0.0.1:7860" in second["exception"]
    assert second["backend"] == "http://127.0.0.1:7860"
