"""SQL fragments that the job store's writers and readers must agree on."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, String, and_, case, literal, literal_column, or_, select

from a1111_proxy.db.tables import STATUSES, jobs
from a1111_proxy.jobs.records import JobRecord

# The claim order: highest priority first, then by turn (fair share across owners, turns.py),
# then oldest. The queue view shows the same order; ix_jobs_queue serves it.
QUEUE_ORDER = (jobs.c.priority.desc(), jobs.c.turn, jobs.c.seq)

# What the webhook outbox needs to know of a job that changed (outbox.py).
WEBHOOK_COLUMNS = (jobs.c.seq, jobs.c.webhook_url, jobs.c.webhook_events)

# A job that leaves `processing` gives up its lease (and any skip asked of that attempt).
NO_LEASE = {
    "lease_owner": None,
    "lease_token": None,
    "lease_expires_at": None,
    "skip_requested_at": None,
}

DEADLINE_ERROR = json.dumps(
    {
        "code": "deadline",
        "message": "canceled: its deadline (Cancel-After header or timeout field) passed before it "
        "finished; submit it again with a longer timeout, or none",
    }
)


def of_owner(owner: str | None, job_id: str | None) -> list[ColumnElement[bool]]:
    """WHERE terms: `owner`'s jobs, or only the one `job_id` names (of any owner when `owner`
    is None: an admin naming a job)."""
    if owner is None and job_id is None:
        raise ValueError("of_owner needs an owner or a job id")
    terms = [] if owner is None else [jobs.c.owner == owner]
    if job_id is not None:
        terms.append(jobs.c.id == job_id)
    return terms


def in_status(status: str) -> ColumnElement[bool]:
    """WHERE term `status = '<status>'` with the value written into the SQL, not bound: a
    partial index on that status (ix_jobs_queue) can then serve the query in PostgreSQL's
    generic plan of a prepared statement (asyncpg prepares them), which a bound value hides
    it from."""
    assert status in STATUSES
    return jobs.c.status == literal_column(f"'{status}'")


QUEUED = in_status("queued")


def queued_ahead_of(seq: Any, priority: Any) -> ColumnElement[bool]:
    """WHERE term: jobs before job `seq` (of `priority`) in QUEUE_ORDER (values or bound
    parameters)."""
    turn = select(jobs.c.turn).where(jobs.c.seq == seq).scalar_subquery()
    earlier = or_(jobs.c.turn < turn, and_(jobs.c.turn == turn, jobs.c.seq < seq))
    return or_(jobs.c.priority > priority, and_(jobs.c.priority == priority, earlier))


def past_deadline(now: float) -> ColumnElement[bool]:
    return and_(jobs.c.deadline_at.is_not(None), jobs.c.deadline_at <= now)


def not_expired(now: float | ColumnElement[float]) -> ColumnElement[bool]:
    return or_(jobs.c.deadline_at.is_(None), jobs.c.deadline_at > now)


def deadline_sweep_due(now: float) -> ColumnElement[bool]:
    """Jobs the deadline sweep acts on: queued ones past their deadline, and running ones past
    it that were not asked to stop yet."""
    waiting = jobs.c.status == "queued"
    running = and_(jobs.c.status == "processing", jobs.c.cancel_requested_at.is_(None))
    return and_(past_deadline(now), or_(waiting, running))


def cancel_error(default: Any) -> Any:
    """The error of a job that ends canceled: "deadline" when the deadline sweep asked for the
    cancel (at or after the deadline), else `default` (a value or a column expression)."""
    if not hasattr(default, "self_group"):
        default = literal(default, String)
    asked_after_deadline = and_(
        jobs.c.deadline_at.is_not(None),
        jobs.c.cancel_requested_at.is_not(None),
        jobs.c.cancel_requested_at >= jobs.c.deadline_at,
    )
    return case((asked_after_deadline, literal(DEADLINE_ERROR)), else_=default)


# How many jobs (of those the other filters keep) one page filtered by prompt text looks at.
PROMPT_SCAN = 2000


@dataclass(frozen=True)
class JobFilter:
    """What a listing keeps: each field that is set must hold (`checkpoints`: any of them)."""

    status: str | None = None
    type: str | None = None
    owner: str | None = None  # a tenant's jobs only
    checkpoints: tuple[str, ...] = ()  # the job's requested checkpoint, under any of its names
    prompt: str | None = None  # text in the prompt, ignoring case

    def clauses(self) -> list[ColumnElement[bool]]:
        """WHERE terms for all but `prompt` (see prompt_like)."""
        terms = []
        if self.owner is not None:
            terms.append(jobs.c.owner == self.owner)
        if self.status is not None:
            terms.append(jobs.c.status == self.status)
        if self.type is not None:
            terms.append(jobs.c.type == self.type)
        if self.checkpoints:
            terms.append(jobs.c.checkpoint.in_(self.checkpoints))
        return terms


def prompt_like(text: str) -> ColumnElement[bool]:
    """Whether the stored request (JSON) holds `text` as JSON writes it inside a string (with
    non-ASCII characters escaped, as the API stores it, or not), ignoring ASCII case: a cheap
    first look; prompt_matches then checks the prompt itself."""
    forms = {json.dumps(text)[1:-1], json.dumps(text, ensure_ascii=False)[1:-1]}
    return or_(*(jobs.c.request.icontains(form, autoescape=True) for form in sorted(forms)))


def prompt_matches(record: JobRecord, text: str) -> bool:
    prompt = record.request.get("prompt")
    return isinstance(prompt, str) and text.casefold() in prompt.casefold()
