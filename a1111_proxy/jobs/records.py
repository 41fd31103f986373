"""What the job store hands out: rows decoded once into frozen records.

This is the only place where a job's JSON columns (request, result, error, webhook_events), a
claim's payload and a worker's slots are decoded, and where job errors are encoded. Everything
downstream (API rendering, webhooks, event streams, the worker) reads typed fields, and a
misspelt field is an AttributeError, never a silent None.

A column that cannot be decoded (damaged JSON, written by hand or by a bug) does not make the row
unreadable: the record holds what did decode and says in `damage` what did not, so views show
the job with a `render_error` instead of failing. Backend names are shown without credentials
(`redaction.backend_name`), also for rows and heartbeats stored before they were.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy import ColumnElement, Row, Text, cast, func, literal_column

from a1111_proxy.db.tables import jobs
from a1111_proxy.redaction import backend_name, scrub_all

TERMINAL = frozenset({"completed", "error", "canceled"})
GENERATIONS = frozenset({"txt2img", "img2img"})

# Columns the API shows; never the payload, the secret, image data, or what only claims and
# workers read (`turn`, `batch_key`, the watches).
_HIDDEN = {
    "webhook_secret",
    "lease_token",
    "request_hash",
    "idempotency_key",
    "turn",
    "batch_key",
    "preview_wanted_until",
    "progress_wanted_until",
}
JOB_COLUMNS = tuple(c for c in jobs.c if c.name not in _HIDDEN)
_NAMES = tuple(c.name for c in JOB_COLUMNS)  # JobRecord's fields, in this order
_COUNT = len(_NAMES)
_REQUEST, _RESULT, _ERROR, _EVENTS, _BACKEND = (
    _NAMES.index(name) for name in ("request", "result", "error", "webhook_events", "backend")
)
# A webhook snapshot taken before a column existed lacks it: such a column reads as None.
_NULLABLE = frozenset(c.name for c in JOB_COLUMNS if c.nullable)

AnyRow = Row[*tuple[Any, ...]]  # a result row of any columns


@dataclass(frozen=True, slots=True)
class JobRecord:
    """A job as stored (the columns of JOB_COLUMNS), its JSON columns decoded. Times are unix
    seconds."""

    seq: int
    id: str
    type: str
    status: str
    priority: int
    request: dict[str, Any]  # the body as stored for users (input images and secrets removed)
    # The backend's answer (a generation's images stored apart); None in listings (`page`).
    result: dict[str, Any] | None
    image_count: int
    error: dict[str, Any] | None  # {"code", "message", ...}
    progress: float
    eta_relative: float | None
    attempts: int
    max_attempts: int
    run_after: float
    lease_owner: str | None
    lease_expires_at: float | None
    backend: str | None
    cancel_requested_at: float | None
    skip_requested_at: float | None
    checkpoint: str | None
    webhook_url: str | None
    webhook_events: list[str] | None
    created_at: float
    started_at: float | None
    completed_at: float | None
    updated_at: float
    deadline_at: float | None
    owner: str | None
    # What could not be decoded ("the stored `result` cannot be read (...)"); None: all of it.
    # The columns it names hold None ({} for `request`).
    damage: str | None = None


@dataclass(frozen=True, slots=True)
class JobPage:
    """A page of a listing: its jobs, and the `seq` the next page continues before (None: this
    was the last page)."""

    jobs: list[JobRecord]
    next_seq: int | None


@dataclass(frozen=True, slots=True)
class JobState:
    """What changes while a job runs, for event streams and wait mode (never the preview
    image itself: `preview_at` is when the latest one was stored)."""

    id: str
    seq: int
    status: str
    attempts: int
    progress: float
    eta_relative: float | None
    preview_at: float | None


@dataclass(frozen=True, slots=True)
class Claim:
    """A job this worker holds the lease on."""

    seq: int
    id: str
    type: str
    token: str
    attempts: int
    max_attempts: int
    backend: str
    checkpoint: str | None = None
    payload: dict[str, Any] = field(default_factory=dict)  # the body to send
    more_queued: bool = False  # other jobs were due when this one was claimed
    batch_key: str | None = None  # what it shares with the jobs it may run with (one batch)
    progress_webhook: bool = False  # its progress goes out as webhook messages too
    end_webhook: bool = True  # its end does (True unless the claim read that it does not)


@dataclass(frozen=True, slots=True)
class WorkerRecord:
    """A worker's last heartbeat: its slots as it described them (backend, state, ...)."""

    id: str
    started_at: float
    heartbeat_at: float
    slots: list[dict[str, Any]]


def job_record(row: AnyRow, *, with_result: bool = True) -> JobRecord:
    """The record of a row whose first columns are JOB_COLUMNS, in their order (a
    `select(*JOB_COLUMNS, ...)`). `with_result=False` leaves `result` None undecoded: for
    listings, which never show it (an A1111 answer is kilobytes of JSON)."""
    return _decode(list(row[:_COUNT]), with_result=with_result)


def stored_record(values: dict[str, Any]) -> JobRecord:
    """The record of a job just stored from `values` (its columns by name, `seq` included;
    those not given are None): what reading the row back would give."""
    return _decode([values.get(name) for name in _NAMES])


def snapshot_columns(row: AnyRow) -> dict[str, Any]:
    """A job row's columns as the webhook outbox stores them (undecoded, so that every
    attempt of a message sends the same bytes)."""
    return dict(row._mapping)


def snapshot_json(written: Any) -> ColumnElement[str]:
    """PostgreSQL: snapshot_columns() as JSON, in SQL, for a statement that changes jobs
    (`written`: a CTE of the changed rows with the columns of JOB_COLUMNS)."""
    pairs: list[Any] = []
    for name in _NAMES:
        pairs += [literal_column(f"'{name}'"), written.c[name]]
    return cast(func.json_build_object(*pairs), Text)


def snapshot_record(data: str) -> JobRecord:
    """The record of a job snapshot the outbox stored (`snapshot_columns`, as JSON)."""
    columns = json.loads(data)
    return _decode([columns.get(name) if name in _NULLABLE else columns[name] for name in _NAMES])


def _decode(values: list[Any], *, with_result: bool = True) -> JobRecord:
    """`values`: the columns of JOB_COLUMNS, in order, as stored."""
    damage: list[str] = []
    values[_REQUEST] = _decoded(_object, values[_REQUEST], "request", damage) or {}
    values[_RESULT] = _decoded(_object, values[_RESULT], "result", damage) if with_result else None
    values[_ERROR] = _decoded(_object, values[_ERROR], "error", damage)
    values[_EVENTS] = _decoded(decode_events, values[_EVENTS], "webhook_events", damage)
    if values[_BACKEND] is not None:
        values[_BACKEND] = backend_name(values[_BACKEND])
    record = JobRecord(*values)
    return replace(record, damage="; ".join(damage)) if damage else record


def _decoded(decode: Callable[[Any], Any], text: Any, name: str, damage: list[str]) -> Any:
    """`decode(text)`, or None with the reason added to `damage`."""
    try:
        return decode(text)
    except (ValueError, TypeError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        damage.append(f"the stored `{name}` cannot be read ({type(exc).__name__}: {exc})")
        return None


def job_state(row: AnyRow) -> JobState:
    return JobState(
        row.id, row.seq, row.status, row.attempts, row.progress, row.eta_relative, row.preview_at
    )


def claim_record(
    row: AnyRow,
    backend: str,
    *,
    more_queued: bool,
    progress_webhook: bool = False,
    end_webhook: bool = True,
) -> Claim:
    """A claimed row (the claim's RETURNING columns) as the worker's Claim."""
    return Claim(
        row.seq,
        row.id,
        row.type,
        row.lease_token,
        row.attempts,
        row.max_attempts,
        backend,
        row.checkpoint,
        _object(row.payload) or {},
        more_queued=more_queued,
        batch_key=getattr(row, "batch_key", None),
        progress_webhook=progress_webhook,
        end_webhook=end_webhook,
    )


def worker_record(row: AnyRow) -> WorkerRecord:
    """A heartbeat, its slots' backend names and errors shown without credentials."""
    slots = scrub_all(list(json.loads(row.slots)))
    return WorkerRecord(row.id, row.started_at, row.heartbeat_at, slots)


def decode_events(text: str | None) -> list[str] | None:
    """A stored `webhook_events` list."""
    return None if text is None else [str(event) for event in json.loads(text)]


def error_json(code: str, message: str, **extra: Any) -> str:
    """A job error as stored in the `error` column."""
    return json.dumps({"code": code, "message": message, **extra})


def _object(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    value = json.loads(text)
    if isinstance(value, dict):
        return value
    if value is None:
        return None
    raise ValueError(f"a job column holds JSON {type(value).__name__}, not an object")
