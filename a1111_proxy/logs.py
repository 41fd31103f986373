"""Log lines: JSON objects (one a line) for log collectors, or plain text for a terminal.

Every line about a job carries its id: the worker sets `job_id` in a context variable for the
task that runs a job (and so for everything that task calls, the backend client included); a
line written elsewhere passes it with `extra={"job_id": ...}`.

No line shows a URL's user name and password (a backend URL in A1111_URLS may carry them, and
httpx logs every request's URL at DEBUG): `CredentialFilter` removes them from every record the
handler writes, its message, its exception and its `extra` fields.
"""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import IO, Any

from a1111_proxy.redaction import scrub

job_id_var: ContextVar[str | None] = ContextVar("job_id", default=None)

# Loggers that write every SQL statement's parameters (webhook secrets, image data) at DEBUG.
PARAMETER_LOGGERS = ("aiosqlite", "sqlalchemy.engine")
# Attributes every LogRecord has; anything else was passed with `extra=` and is worth keeping.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "color_message",
}  # uvicorn's message again, with terminal colours


class JobIdFilter(logging.Filter):
    """Gives every record a `job_id` attribute (None when the line is about no job)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "job_id", None) is None:
            record.job_id = job_id_var.get()
        return True


class CredentialFilter(logging.Filter):
    """Rewrites a record so that no URL in it shows `user:password@` (the record is changed in
    place: handlers after this one see it scrubbed too)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "@" in message:
            record.msg, record.args = scrub(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text and "@" in record.exc_text:
            record.exc_text = scrub(record.exc_text)
        for key, value in vars(record).items():
            if key not in _STANDARD and isinstance(value, str) and "@" in value:
                setattr(record, key, scrub(value))
        return True


class JsonFormatter(logging.Formatter):
    """{"time", "level", "logger", "message", "job_id"?, other `extra` fields?, "exception"?}"""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and value is not None and key not in line:
                line[key] = value if isinstance(value, str | int | float | bool) else str(value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exception"] = record.exc_text
        return json.dumps(line, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """The classic line, with `[job <id>]` added when the message does not name the job."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        job_id = getattr(record, "job_id", None)
        if job_id and job_id not in record.getMessage():
            first, newline, rest = text.partition("\n")
            text = f"{first} [job {job_id}]{newline}{rest}"
        return text


def use_json(log_format: str, stream: IO[str]) -> bool:
    if log_format == "auto":
        return not (hasattr(stream, "isatty") and stream.isatty())
    return log_format == "json"


def configure(level: str, log_format: str = "auto", stream: IO[str] | None = None) -> None:
    """One handler on the root logger (uvicorn's loggers propagate to it)."""
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if use_json(log_format, stream) else TextFormatter())
    handler.addFilter(JobIdFilter())
    handler.addFilter(CredentialFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    # The logging HOWTO's "Optimization": no line shows the caller's file and line, nor the
    # thread or process, so records need not collect them (the caller's frame walk cost more
    # than formatting the line, for every request's access line at info).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.captureWarnings(True)  # Python's warnings become lines of the same format
    for name in PARAMETER_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    # httpx logs every request at INFO: the worker's progress polls would flood the log (and
    # cost CPU on every job); our own lines say what happened to each job.
    if root.level > logging.DEBUG:
        # alembic.runtime.plugins announces each of its plugins at INFO on every migrate.
        for name in ("httpx", "httpcore", "alembic.runtime.plugins"):
            logging.getLogger(name).setLevel(logging.WARNING)
