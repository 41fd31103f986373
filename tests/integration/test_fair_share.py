"""Fair share: within a priority, claims rotate across owners (a1111_proxy/jobs/turns.py), on
SQLite and on PostgreSQL. Jobs go through the real submit path (grouped commits included)."""

from __future__ import annotations

import asyncio
import json

import pytest

from a1111_proxy.db.engine import Database
from a1111_proxy.jobs import JobRepository, NewJob
from tests.claims import claim_next
from tests.plans import plan, sent

pytestmark = pytest.mark.anyio

BIG_BATCH = 1000


def job(owner: str | None, n: int = 0, priority: int = 0) -> NewJob:
    body = json.dumps({"prompt": f"{owner} #{n}"})
    return NewJob("txt2img", request=body, payload=body, priority=priority, owner=owner)


async def submit_many(repo: JobRepository, owner: str, count: int, priority: int = 0) -> list[str]:
    """`count` jobs of `owner` submitted at once (committed in groups, as the API's are)."""
    done = await asyncio.gather(*(repo.submit(job(owner, n, priority)) for n in range(count)))
    return [submitted.job.id for submitted in done]


async def submit_one(repo: JobRepository, owner: str | None, priority: int = 0) -> str:
    return (await repo.submit(job(owner, priority=priority))).job.id


async def claim_all(repo: JobRepository) -> list[str]:
    """Claim one job at a time until none is due; the ids in claim order."""
    return [id for [id] in await claims_until(repo, None, slots=1)]


async def claims_until(repo: JobRepository, wanted: str | None, slots: int) -> list[list[str]]:
    """Claim `slots` jobs at a time until `wanted` is claimed, or none is due; each claim's
    ids, in slot order (the claim order)."""
    backends = [(f"http://slot{n}", None) for n in range(slots)]
    claims: list[list[str]] = []
    while claimed := await repo.claim("w", backends):
        claims.append([claim.id for _, claim in sorted(claimed, key=lambda c: c[0])])
        if wanted in claims[-1]:
            break
    return claims


async def test_one_job_behind_a_1000_job_batch_waits_for_at_most_one_of_them_on_one_slot(
    repo: JobRepository,
) -> None:
    batch = await submit_many(repo, "alice", BIG_BATCH)
    first = [await claim_next(repo, "w", "http://slot") for _ in range(3)]
    assert [claim.id for claim in first if claim] == batch[:3]
    bobs = await submit_one(repo, "bob")
    claimed = await claims_until(repo, bobs, slots=1)
    assert claimed == [[batch[3]], [bobs]]  # one of alice's jobs went first, then bob's
    assert (await repo.queued(limit=1))[1] == BIG_BATCH - 4  # the rest still waits


async def test_with_several_slots_it_waits_for_at_most_one_job_per_slot(
    repo: JobRepository,
) -> None:
    batch = await submit_many(repo, "alice", BIG_BATCH)
    bobs = await submit_one(repo, "bob")
    claimed = await claims_until(repo, bobs, slots=4)
    assert claimed == [[batch[0], bobs, batch[1], batch[2]]]  # the first claim of 4 slots
    assert (await repo.queued(limit=1))[1] == BIG_BATCH - 3


async def test_owners_with_jobs_waiting_take_turns(repo: JobRepository) -> None:
    alice = await submit_many(repo, "alice", 4)  # in one grouped commit
    bob = [await submit_one(repo, "bob") for _ in range(4)]  # one at a time
    carol = await submit_one(repo, "carol")
    claimed = await claim_all(repo)
    assert claimed == [
        alice[0],
        bob[0],
        carol,
        alice[1],
        bob[1],
        alice[2],
        bob[2],
        alice[3],
        bob[3],
    ]


async def test_a_higher_priority_goes_first_whatever_the_turns(repo: JobRepository) -> None:
    bobs = await submit_one(repo, "bob")
    urgent = await submit_many(repo, "alice", 5, priority=1)
    late = await submit_one(repo, "carol", priority=-1)
    claimed = await claim_all(repo)
    assert claimed == [*urgent, bobs, late]


async def test_the_queue_view_shows_the_claim_order_and_positions(repo: JobRepository) -> None:
    await submit_many(repo, "alice", 6)
    await submit_many(repo, "bob", 3, priority=1)
    await submit_many(repo, "carol", 2)
    queued, total = await repo.queued(limit=100)
    assert total == 11
    assert [await repo.queue_position(row) for row in queued] == list(range(1, 12))
    claimed = await claim_all(repo)
    assert [row.id for row in queued] == claimed


async def test_a_job_given_back_keeps_its_turn(repo: JobRepository) -> None:
    alice = await submit_many(repo, "alice", 3)
    bob = await submit_many(repo, "bob", 3)
    claim = await claim_next(repo, "w", "http://slot")
    assert claim is not None and claim.id == alice[0]
    assert await repo.release(claim)
    claimed = await claim_all(repo)
    assert claimed == [alice[0], bob[0], alice[1], bob[1], alice[2], bob[2]]


async def test_a_job_back_in_an_emptied_queue_is_not_put_behind_newcomers(
    repo: JobRepository,
) -> None:
    await submit_many(repo, "alice", 3)
    running = [await claim_next(repo, "w", f"http://slot{n}") for n in range(3)]
    assert all(running) and (await repo.queued(limit=1))[1] == 0
    newcomers = await submit_many(repo, "bob", 3)
    last = running[-1]
    assert last is not None and await repo.release(last)
    claimed = await claim_all(repo)
    assert claimed == [last.id, *newcomers]


async def test_jobs_without_an_owner_count_as_one_owner_and_keep_their_order(
    repo: JobRepository,
) -> None:
    ids = list(await asyncio.gather(*(submit_one(repo, None) for _ in range(3))))
    ids += [await submit_one(repo, None) for _ in range(3)]
    claimed = await claim_all(repo)
    assert claimed == ids


async def analyze(db: Database) -> None:
    """Statistics for the planner, as autovacuum (PostgreSQL) or PRAGMA optimize would keep."""
    async with db.writing() as conn:
        await conn.exec_driver_sql("ANALYZE")


def table_scans(plan: str) -> list[str]:
    """Lines of a plan (SQLite's, PostgreSQL's) that read the whole jobs table."""
    return [line for line in plan.splitlines() if "SCAN jobs" in line or "Seq Scan on jobs" in line]


def sorts(plan: str) -> list[str]:
    """Lines of a plan that sort jobs read from the table (not the few rows of a claim's CTEs)."""
    return [
        line
        for line in plan.splitlines()
        if "TEMP B-TREE" in line or ("Sort Key:" in line and "jobs" in line)
    ]


async def test_a_claim_reads_the_first_entries_of_the_queue_index(
    db: Database, repo: JobRepository
) -> None:
    await submit_many(repo, "alice", BIG_BATCH)
    await submit_many(repo, "bob", 20)
    await analyze(db)
    for slots in (1, 4):
        with sent(db, lambda sql: sql.lstrip().startswith("WITH")) as claims:
            assert await repo.claim("w", [(f"http://slot{n}", None) for n in range(slots)])
        claim_plan = await plan(db, *claims[0])
        assert "ix_jobs_queue" in claim_plan, claim_plan
        assert not table_scans(claim_plan) and not sorts(claim_plan), claim_plan


async def test_a_claim_of_many_jobs_reads_the_queue_once_before_the_first_analyze(
    db: Database, repo: JobRepository
) -> None:
    """PostgreSQL: a backlog that arrived before autovacuum's first ANALYZE looks nearly empty
    to the planner, which joined the claimed jobs to the table by walking every queued row
    once for each of them (a join filter; 6 ms for 16 of 1,000)."""
    if db.is_sqlite:
        pytest.skip("SQLite updates the claimed rows by rowid, whatever its statistics")
    await submit_many(repo, "bob", BIG_BATCH)
    with sent(db, lambda sql: sql.lstrip().startswith("WITH")) as claims:
        assert await repo.claim("w", [(f"http://slot{n}", None) for n in range(16)])
    claim_plan = await plan(db, *claims[0])
    assert "seq = ANY" in claim_plan, claim_plan  # the claimed jobs, as one array
    assert "Join Filter" not in claim_plan, claim_plan


async def test_a_submit_reads_its_turn_from_the_indexes(db: Database, repo: JobRepository) -> None:
    await submit_many(repo, "alice", BIG_BATCH)
    await analyze(db)
    with sent(db, lambda sql: ("json_each" in sql or "unnest" in sql) and "turn" in sql) as lookups:
        await asyncio.gather(submit_one(repo, "bob"), submit_one(repo, "carol"))
    [lookup] = lookups  # one statement for the grouped commit, whatever its owners
    turns_plan = await plan(db, *lookup)
    assert "ix_jobs_owner_turns" in turns_plan and "ix_jobs_queue" in turns_plan, turns_plan
    assert not table_scans(turns_plan), turns_plan
