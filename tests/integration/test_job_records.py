"""Job rows decoded once into frozen records, on SQLite and on PostgreSQL: typed fields, JSON
columns decoded, webhook snapshots read the same way, misspelt fields refused."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import AsyncIterator
from typing import Any

import pytest

from a1111_proxy.db.engine import Database
from a1111_proxy.jobs import JobRecord, JobRepository, NewJob, error_json, snapshot_record
from a1111_proxy.jobs.records import JOB_COLUMNS
from tests.claims import claim_next
from tests.fakes.clock import Clock

pytestmark = pytest.mark.anyio

HINTS = typing.get_type_hints(JobRecord)


@pytest.fixture
async def repo(database_url: str) -> AsyncIterator[JobRepository]:
    db = Database(database_url)
    yield JobRepository(db, max_attempts=2, lease_seconds=30, clock=Clock())
    await db.dispose()


def hooked_job() -> NewJob:
    body = json.dumps({"prompt": "a fox", "steps": 4})
    return NewJob(
        "txt2img",
        request=body,
        payload=body,
        priority=3,
        webhook_url="http://127.0.0.1:9/hook",
        webhook_secret="s",
        webhook_events=json.dumps(["started", "completed"]),
        checkpoint="m.safetensors",
        timeout=600.0,
        owner="alice",
    )


def conforms(value: Any, hint: Any) -> bool:
    """Whether `value` is of the annotated type (the subset JobRecord uses)."""
    if isinstance(hint, types.UnionType):
        return any(conforms(value, option) for option in typing.get_args(hint))
    if hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(key, str) for key in value)
    if origin is list:
        [item] = typing.get_args(hint)
        return isinstance(value, list) and all(isinstance(v, item) for v in value)
    if hint is float:
        return isinstance(value, float)
    return isinstance(value, hint) and not (hint is int and isinstance(value, bool))


def assert_typed(record: JobRecord) -> None:
    wrong = {
        name: getattr(record, name)
        for name, hint in HINTS.items()
        if not conforms(getattr(record, name), hint)
    }
    assert not wrong, f"fields not of their declared type: {wrong}"


def test_every_column_the_api_shows_is_a_field_of_the_record_in_the_same_order() -> None:
    """Records are built from rows by position; the one field after the columns says what of
    the row could not be decoded."""
    names = [field.name for field in dataclasses.fields(JobRecord)]
    assert names == [*(c.name for c in JOB_COLUMNS), "damage"]


async def test_a_stored_job_reads_back_with_every_field_typed_and_its_json_decoded(
    repo: JobRepository,
) -> None:
    submitted = (await repo.submit(hooked_job())).job
    queued = await repo.get(submitted.id)
    assert queued == submitted
    assert_typed(queued)
    assert queued.request == {"prompt": "a fox", "steps": 4}
    assert queued.webhook_events == ["started", "completed"]
    assert queued.result is None and queued.error is None and queued.deadline_at is not None

    claim = await claim_next(repo, "w", "http://slot")
    assert claim is not None and claim.payload == {"prompt": "a fox", "steps": 4}
    await repo.skip_running(owner="alice")
    running = await repo.get(submitted.id)
    assert_typed(running)
    assert running.lease_owner == "w" and running.lease_expires_at is not None
    assert running.skip_requested_at is not None and running.started_at is not None

    await repo.cancel(submitted.id)
    answer = {"images": [], "info": "{}", "parameters": {"steps": 4}}
    assert await repo.complete(
        claim,
        answer,
        [b"png"],
        status="canceled",
        error=error_json("canceled", "canceled while running"),
    )
    ended = await repo.get(submitted.id)
    assert_typed(ended)
    assert ended.result == answer and ended.image_count == 1
    assert ended.error == {"code": "canceled", "message": "canceled while running"}
    assert ended.completed_at is not None and ended.cancel_requested_at is not None
    [listed] = await repo.page()
    assert listed == dataclasses.replace(ended, result=None)  # a listing never shows results


async def test_a_record_refuses_a_misspelt_field_and_any_change(repo: JobRepository) -> None:
    record = (await repo.submit(hooked_job())).job
    with pytest.raises(AttributeError):
        record.stauts  # type: ignore[attr-defined]  # noqa: B018
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.status = "completed"  # type: ignore[misc]


async def test_a_webhook_snapshot_reads_back_as_the_job_it_was_taken_of(
    repo: JobRepository,
) -> None:
    job = (await repo.submit(hooked_job())).job
    await claim_next(repo, "w", "http://slot")  # queues the `started` message
    [delivery] = await repo.deliveries.claim(10, lease_seconds=30)
    assert delivery.event == "started"
    assert snapshot_record(delivery.data) == await repo.get(job.id)


def test_a_snapshot_taken_before_a_column_existed_reads_that_column_as_none() -> None:
    stored = {c.name: None for c in JOB_COLUMNS} | {
        "seq": 1,
        "id": "j",
        "type": "txt2img",
        "status": "queued",
        "priority": 0,
        "request": '{"prompt": "x"}',
        "image_count": 0,
        "progress": 0.0,
        "attempts": 0,
        "max_attempts": 3,
        "run_after": 1.0,
        "created_at": 1.0,
        "updated_at": 1.0,
    }
    older = {name: value for name, value in stored.items() if name not in ("owner", "deadline_at")}
    record = snapshot_record(json.dumps(older))
    assert record.owner is None and record.deadline_at is None
    assert record.request == {"prompt": "x"}
    assert_typed(record)
