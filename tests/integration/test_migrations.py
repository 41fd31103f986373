"""Migrations build exactly the schema the code declares, on SQLite and PostgreSQL, and a
database upgraded from the first revision keeps its rows usable by this code."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from alembic import command
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from a1111_proxy.app import create_app
from a1111_proxy.db.engine import Database
from a1111_proxy.jobs import JobRepository, error_json
from a1111_proxy.migrate import alembic_config, upgrade
from tests.claims import claim_next
from tests.conftest import _pg, create_pg_database, postgres_unavailable
from tests.servers import ASYNC, serve


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path}/data/fresh.db"  # the folder does not exist yet
        return
    name = f"a1111_proxy_mig_{uuid.uuid4().hex[:10]}"
    if (failure := create_pg_database(name)) is not None:
        postgres_unavailable(failure)
    yield f"postgresql+asyncpg://root@127.0.0.1:5432/{name}"
    _pg(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_upgrade_to_head_leaves_no_drift_and_downgrade_undoes_it(empty_database: str) -> None:
    upgrade(empty_database)
    config = alembic_config(empty_database)
    command.check(config)  # raises if autogenerate would find any difference
    command.downgrade(config, "base")
    upgrade(empty_database)  # and it goes up again cleanly


def test_a_sqlite_file_from_an_earlier_version_is_converted_to_incremental_vacuum(
    tmp_path: Path,
) -> None:
    import sqlite3

    path = tmp_path / "old.db"
    url = f"sqlite+aiosqlite:///{path}"
    upgrade(url, "788abb4a5cc6")  # the revision before auto-vacuum was set up
    with sqlite3.connect(path, isolation_level=None) as conn:  # as earlier versions made files
        conn.execute("PRAGMA auto_vacuum=NONE")
        conn.execute("VACUUM")
        assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 0
    upgrade(url)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # INCREMENTAL
    fresh = tmp_path / "new.db"
    upgrade(f"sqlite+aiosqlite:///{fresh}")
    with sqlite3.connect(fresh) as conn:
        assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2


# --- a database that holds rows from the first revision -----------------------------------------

FIRST = "550981369be1"  # job core: jobs, job_payloads, job_images, workers
PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 24
KEYED_BODY = {"prompt": "a queued lighthouse", "steps": 12}
BACKEND = "http://127.0.0.1:7860"


def _job(seq: int, status: str, now: float, **columns: Any) -> dict[str, Any]:
    """A jobs row with only the first revision's columns, as that version's code wrote them."""
    body = {"prompt": f"job {seq}", "steps": 20, "seed": seq}
    return {
        "seq": seq,
        "id": str(uuid.UUID(int=seq)),
        "type": "txt2img",
        "status": status,
        "priority": 0,
        "request": json.dumps(body),
        "result": None,
        "image_count": 0,
        "error": None,
        "progress": 0.0,
        "eta_relative": None,
        "attempts": 0,
        "max_attempts": 3,
        "run_after": now - 60,
        "lease_owner": None,
        "lease_token": None,
        "lease_expires_at": None,
        "backend": None,
        "cancel_requested_at": None,
        "idempotency_key": None,
        "request_hash": None,
        "webhook_url": None,
        "webhook_secret": None,
        "webhook_events": None,
        "created_at": now - 120 + seq,
        "started_at": None,
        "completed_at": None,
        "updated_at": now - 60,
        **columns,
    }


def _first_revision_rows(now: float) -> dict[str, list[dict[str, Any]]]:
    done = {"started_at": now - 100, "completed_at": now - 90, "backend": BACKEND, "attempts": 1}
    a1111_error = {
        "error": "HTTPException",
        "detail": "Sampler not found",
        "body": "",
        "errors": "",
    }
    jobs = [
        _job(
            1,
            "queued",
            now,
            request=json.dumps(KEYED_BODY),
            priority=5,
            idempotency_key="first-revision-key",
            request_hash=_fingerprint(KEYED_BODY),
            webhook_url="https://hooks.example.com/a1111",
            webhook_secret="whsec_c2VjcmV0LXNlY3JldC1zZWNyZXQ=",
            webhook_events=json.dumps(["completed"]),
        ),
        _job(
            2,
            "processing",
            now,
            attempts=1,
            progress=0.4,
            eta_relative=3.5,
            started_at=now - 30,
            backend=BACKEND,
            lease_owner="old-worker",
            lease_token=str(uuid.uuid4()),
            lease_expires_at=now - 5,  # its worker stopped for the upgrade
        ),
        _job(
            3,
            "completed",
            now,
            result=json.dumps(
                {"images": [], "parameters": {"prompt": "job 3"}, "info": '{"seed": 3}'}
            ),
            image_count=2,
            progress=1.0,
            **done,
        ),
        _job(
            4,
            "error",
            now,
            error=json.dumps(
                {
                    "code": "backend_rejected",
                    "message": "A1111 rejected the txt2img request with HTTP 404",
                    "backend": BACKEND,
                    "backend_status": 404,
                    "backend_body": a1111_error,
                }
            ),
            **done,
        ),
        _job(
            5,
            "canceled",
            now,
            error=json.dumps({"code": "canceled", "message": "canceled before it started"}),
            completed_at=now - 80,
        ),
    ]
    return {
        "jobs": jobs,
        "job_payloads": [
            {"job_seq": job["seq"], "body": job["request"]}
            for job in jobs
            if job["status"] in ("queued", "processing")
        ],
        "job_images": [{"job_seq": 3, "n": n, "data": PNG + bytes([n])} for n in range(2)],
        "workers": [
            {
                "id": "old-worker",
                "started_at": now - 3600,
                "heartbeat_at": now - 5,
                "slots": json.dumps([{"backend": BACKEND, "state": "busy"}]),
            }
        ],
    }


def _fingerprint(body: dict[str, Any]) -> str:
    """The request hash an Idempotency-Key is stored with (routes/jobs.py's)."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


async def _write_rows(url: str, rows: dict[str, list[dict[str, Any]]]) -> None:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            for table, values in rows.items():  # in foreign-key order
                columns = ", ".join(values[0])
                marks = ", ".join(f":{name}" for name in values[0])
                await conn.execute(
                    text(f"INSERT INTO {table} ({columns}) VALUES ({marks})"), values
                )
            if not url.startswith("sqlite"):  # rows given their seq: move the sequence past them
                await conn.execute(
                    text("SELECT setval(pg_get_serial_sequence('jobs', 'seq'), MAX(seq)) FROM jobs")
                )
    finally:
        await engine.dispose()


def test_rows_from_the_first_revision_survive_the_upgrade_and_work_with_this_code(
    empty_database: str, settings_for: Any
) -> None:
    now = time.time()
    rows = _first_revision_rows(now)
    upgrade(empty_database, FIRST)
    asyncio.run(_write_rows(empty_database, rows))
    upgrade(empty_database)

    asyncio.run(_stored_rows_read_back(empty_database, rows))
    with serve(create_app(settings_for(database_url=empty_database))) as url:
        _the_api_shows_them(url, rows)
    asyncio.run(_the_machine_runs_them(empty_database))


async def _stored_rows_read_back(url: str, rows: dict[str, list[dict[str, Any]]]) -> None:
    db = Database(url)
    try:
        repo = JobRepository(db)
        listed = await repo.page(limit=10)
        assert [job.seq for job in listed] == [5, 4, 3, 2, 1]  # newest first
        for old in rows["jobs"]:
            job = await repo.get(old["id"])
            assert job is not None and job.status == old["status"]
            assert job.request == json.loads(old["request"])
            assert (job.deadline_at, job.owner, job.checkpoint, job.skip_requested_at) == (
                None,
                None,
                None,
                None,
            )
        assert await repo.images(3) == [PNG + b"\0", PNG + b"\1"]
        error = (await repo.get(rows["jobs"][3]["id"])).error
        assert error is not None and error["backend_body"]["detail"] == "Sampler not found"
        assert await repo.webhook_secret(1) == rows["jobs"][0]["webhook_secret"]
        [worker] = await repo.live_workers(stale_after=60)
        assert worker.slots == [{"backend": BACKEND, "state": "busy"}]
    finally:
        await db.dispose()


def _the_api_shows_them(url: str, rows: dict[str, list[dict[str, Any]]]) -> None:
    with httpx.Client(base_url=url, timeout=30, headers=ASYNC) as api:
        listing = api.get("/sdapi/v1/jobs").json()["jobs"]
        assert [job["id"] for job in listing] == [job["id"] for job in reversed(rows["jobs"])]
        queued, running, completed, failed, canceled = (
            api.get(f"/sdapi/v1/jobs/{job['id']}").json() for job in rows["jobs"]
        )
        assert queued["status"] == "queued" and queued["queue_position"] == 1
        assert queued["webhook"] == {
            "url": "https://hooks.example.com/a1111",
            "events": ["completed"],
        }
        assert running["status"] == "processing" and running["progress"] == 0.4
        assert completed["result"]["info"] == '{"seed": 3}'
        images = [base64.b64decode(image) for image in completed["result"]["images"]]
        assert images == [PNG + b"\0", PNG + b"\1"]
        assert completed["image_urls"] == [
            f"/sdapi/v1/jobs/{completed['id']}/images/{n}" for n in (0, 1)
        ]
        assert api.get(completed["image_urls"][1]).content == PNG + b"\1"
        assert failed["error"]["code"] == "backend_rejected" and failed["result"] is None
        assert canceled["error"]["code"] == "canceled"
        queue = api.get("/sdapi/v1/queue").json()
        assert [job["id"] for job in queue["queued"]] == [queued["id"]]
        assert [job["id"] for job in queue["running"]] == [running["id"]]
        # Keys are per tenant now, and a job stored before owners has no tenant: its key makes
        # a new job (the old one is untouched), which the key then replays.
        keyed = {"Idempotency-Key": "first-revision-key"}
        again = api.post("/sdapi/v1/txt2img", json=KEYED_BODY, headers=keyed)
        assert again.status_code == 202 and again.json()["id"] != queued["id"]
        replayed = api.post("/sdapi/v1/txt2img", json=KEYED_BODY, headers=keyed)
        assert replayed.status_code == 200 and replayed.json()["id"] == again.json()["id"]


async def _the_machine_runs_them(url: str) -> None:
    db = Database(url)
    try:
        repo = JobRepository(db, lease_seconds=30)
        assert await repo.reap_expired() == [(str(uuid.UUID(int=2)), "queued")]
        first = await claim_next(repo, "new-worker", BACKEND)
        assert first is not None and first.seq == 1  # priority 5 first
        assert first.payload == KEYED_BODY and first.attempts == 1
        assert await repo.complete(first, {"images": [], "info": "{}"}, [PNG])
        second = await claim_next(repo, "new-worker", BACKEND)
        assert second is not None and second.seq == 2 and second.attempts == 2
        assert await repo.finish(second, "error", error_json("backend_rejected", "refused"))
        # Then only the job the API stored after the upgrade (its key's new job) is left.
        third = await claim_next(repo, "new-worker", BACKEND)
        assert third is not None and third.seq > 5 and third.payload == KEYED_BODY
        assert await claim_next(repo, "new-worker", BACKEND) is None
        done = await repo.get(first.id)
        assert done is not None and done.status == "completed" and done.image_count == 1
        assert await repo.images(first.seq) == [PNG]
        [(delivery, _)] = await repo.deliveries.for_job(first.seq)  # its webhook is queued
        assert delivery.event == "completed" and delivery.url == "https://hooks.example.com/a1111"
        failed = await repo.get(second.id)
        assert failed is not None and failed.status == "error" and failed.lease_owner is None
    finally:
        await db.dispose()


def test_the_fair_share_revision_numbers_waiting_jobs_per_owner_and_priority(
    empty_database: str,
) -> None:
    """Queued and running jobs take turns 0, 1, 2... per owner and priority, in the order they
    came (jobs without an owner count as one owner), so the queue rotates across owners at once;
    finished jobs take 0."""
    import asyncio

    from sqlalchemy import text

    from a1111_proxy.db.engine import Database

    upgrade(empty_database, "5b1f3c2d9e7a")  # the revision before
    jobs = [  # (owner, priority, status), in the order they were submitted
        ("alice", 0, "queued"),
        ("alice", 0, "processing"),
        ("alice", 0, "queued"),
        ("bob", 0, "queued"),
        ("alice", 5, "queued"),
        (None, 0, "queued"),
        ("bob", 0, "completed"),
        (None, 0, "queued"),
        ("bob", 0, "queued"),
    ]

    async def store() -> None:
        db = Database(empty_database)
        async with db.writing() as conn:
            for n, (owner, priority, status) in enumerate(jobs):
                await conn.execute(
                    text(
                        "INSERT INTO jobs (id, type, status, priority, request, max_attempts, "
                        "run_after, created_at, updated_at, owner, lease_token) VALUES (:id, "
                        "'txt2img', :status, :priority, '{}', 3, 0, 0, 0, :owner, :token)"
                    ),
                    {
                        "id": f"job-{n}",
                        "status": status,
                        "priority": priority,
                        "owner": owner,
                        "token": "t" if status == "processing" else None,
                    },
                )
        await db.dispose()

    async def turns() -> list[int]:
        db = Database(empty_database)
        async with db.reading() as conn:
            rows = await conn.execute(text("SELECT turn FROM jobs ORDER BY seq"))
            found = list(rows.scalars())
        await db.dispose()
        return found

    asyncio.run(store())
    upgrade(empty_database)
    assert asyncio.run(turns()) == [0, 1, 2, 0, 0, 0, 0, 1, 1]
