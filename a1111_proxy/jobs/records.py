"""What the job store hands out: rows decoded once into frozen records.

This is the only place where a job's JSON columns (request, result, error, webhook_events), a
claim's payload and a worker's slots are decoded, and where job errors are encoded. Everything
downstream (API rendering, webhooks, event streams, the worker) reads typed fields, and a
misspelt field is an AttributeError, never a silent None.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Row

from a1111_proxy.db.tables import jobs

TERMINAL = frozenset({"completed", "error", "canceled"})
GENERATIONS = frozenset({"txt2img", "img2img"})

# Columns the API shows; never the payload, the secret or image data.
JOB_COLUMNS = tuple(
    c
    for c in jobs.c
    if c.name not in {"webhook_secret", "lease_token", "request_hash", "idempotency_key"}
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
    result: dict[str, Any] | None  # the backend's answer (a generation's images stored apart)
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


@dataclass(frozen=True, slots=True)
class WorkerRecord:
    """A worker's last heartbeat: its slots as it described them (backend, state, ...)."""

    id: str
    started_at: float
    heartbeat_at: float
    slots: list[dict[str, Any]]


def job_record(row: AnyRow) -> JobRecord:
    """The record of a row read with JOB_COLUMNS."""
    return _decode(row._mapping)


def snapshot_columns(row: AnyRow) -> dict[str, Any]:
    """A job row's columns as the webhook outbox stores them (undecoded, so that every
    attempt of a message sends the same bytes)."""
    return dict(row._mapping)


def snapshot_record(data: str) -> JobRecord:
    """The record of a job snapshot the outbox stored (`snapshot_columns`, as JSON)."""
    return _decode(dict.fromkeys(_NULLABLE) | json.loads(data))


def _decode(columns: Mapping[Any, Any]) -> JobRecord:
    return JobRecord(
        seq=columns["seq"],
        id=columns["id"],
        type=columns["type"],
        status=columns["status"],
        priority=columns["priority"],
        request=_object(columns["request"]) or {},
        result=_object(columns["result"]),
        image_count=columns["image_count"],
        error=_object(columns["error"]),
        progress=columns["progress"],
        eta_relative=columns["eta_relative"],
        attempts=columns["attempts"],
        max_attempts=columns["max_attempts"],
        run_after=columns["run_after"],
        lease_owner=columns["lease_owner"],
        lease_expires_at=columns["lease_expires_at"],
        backend=columns["backend"],
        cancel_requested_at=columns["cancel_requested_at"],
        skip_requested_at=columns["skip_requested_at"],
        checkpoint=columns["checkpoint"],
        webhook_url=columns["webhook_url"],
        webhook_events=decode_events(columns["webhook_events"]),
        created_at=columns["created_at"],
        started_at=columns["started_at"],
        completed_at=columns["completed_at"],
        updated_at=columns["updated_at"],
        deadline_at=columns["deadline_at"],
        owner=columns["owner"],
    )


def job_state(row: AnyRow) -> JobState:
    return JobState(row.id, row.seq, row.status, row.attempts, row.progress, row.eta_relative,
                    row.preview_at)


def claim_record(row: AnyRow, backend: str, *, more_queued: bool) -> Claim:
    """A claimed row (the claim's RETURNING columns) as the worker's Claim."""
    return Claim(row.seq, row.id, row.type, row.lease_token, row.attempts, row.max_attempts,
                 backend, row.checkpoint, _object(row.payload) or {}, more_queued=more_queued)


def worker_record(row: AnyRow) -> WorkerRecord:
    return WorkerRecord(row.id, row.started_at, row.heartbeat_at, list(json.loads(row.slots)))


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
