"""Several workers that all list the same A1111s (A1111_URLS shared), on SQLite and PostgreSQL:
the claim path alone keeps a second job off a backend that runs one."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import asyncpg
import pytest
from sqlalchemy.ext.asyncio import AsyncConnection

from a1111_proxy.backends import Backend
from a1111_proxy.backends.a1111 import A1111Backend
from a1111_proxy.backends.fake import FakeBackend
from a1111_proxy.db.engine import Database
from a1111_proxy.jobs import Claim, JobRepository, NewJob
from a1111_proxy.jobs.placement import ADVISORY_SPACE, Slots
from a1111_proxy.wakeup import NOTIFY_CHANNEL, PROGRESS_CHANNEL, WORK_CHANNEL, make_wakeup
from tests.claims import claim_next
from tests.conftest import _truncate_pg
from tests.fakes.a1111_fleet import FleetMember, fleet
from worker.execute import Timing
from worker.loop import Worker

pytestmark = pytest.mark.anyio

BACKENDS, WORKERS, JOBS = 8, 3, 60
SHARED = "http://shared-a1111:7860"


class HeldCommits(Database):
    """A database whose write transactions, once done, wait for `release` before they commit
    (`holding` is set meanwhile): a claim caught between its writes and its commit, its
    statements in autocommit included."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.holding = asyncio.Event()
        self.release = asyncio.Event()

    @asynccontextmanager
    async def writing(self) -> AsyncIterator[AsyncConnection]:
        async with super().writing() as conn:
            yield conn
            self.holding.set()
            await self.release.wait()

    @asynccontextmanager
    async def writing_alone(self) -> AsyncIterator[AsyncConnection]:
        # A statement in autocommit commits as it ends: held here as a transaction would be.
        async with self.writing() as conn:
            yield conn


async def test_a_claim_made_while_another_claim_of_its_backend_is_open_takes_no_job_there(
    database_url: str,
) -> None:
    """Worker B looks while worker A's claim of the shared backend has not committed yet:
    the backend looks idle to B, but B must not give it a job (PostgreSQL: A holds the
    backend's lock, and B leaves it to A without waiting; SQLite: B begins after A commits)."""
    held, other = HeldCommits(database_url), Database(database_url)
    one, two = JobRepository(held), JobRepository(other)
    for i in range(2):
        text_ = json.dumps({"prompt": f"p{i}"})
        await two.submit(NewJob("txt2img", request=text_, payload=text_))
    try:
        first = asyncio.create_task(claim_next(one, "worker-a", SHARED))
        await held.holding.wait()  # A has claimed, and not committed
        second = asyncio.create_task(claim_next(two, "worker-b", SHARED))
        if not held.is_sqlite:  # SQLite: B cannot begin before A commits
            async with asyncio.timeout(30):
                assert await second is None  # A's claim holds the backend: B waits for nothing
        held.release.set()
        assert await first is not None
        assert await second is None  # the backend runs A's job
    finally:
        held.release.set()
        await held.dispose()
        await other.dispose()


# Stands in for PostgreSQL's pg_try_advisory_xact_lock (found first on the search path): before
# taking the lock, the backend starts a job of another worker, as when that worker's claim
# commits between this claim's first look and its lock.
_STARTED_MEANWHILE = """
CREATE FUNCTION meanwhile.pg_try_advisory_xact_lock(space integer, key integer)
RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    UPDATE public.jobs SET status = 'processing', backend = 'http://one',
        lease_owner = 'worker-b', lease_token = 'b:1', lease_expires_at = 1e12
    WHERE seq = (SELECT min(seq) FROM public.jobs);
    RETURN pg_catalog.pg_try_advisory_xact_lock(space, key);
END
$$
"""


@pytest.fixture
def empty_pg(postgres_url: str) -> str:
    _truncate_pg(postgres_url)
    return postgres_url


@pytest.mark.postgres
async def test_a_backend_that_starts_a_job_between_a_claims_look_and_its_lock_is_left_alone(
    empty_pg: str,
) -> None:
    """PostgreSQL: the claim's function looks again once it holds a backend's lock; a backend
    another worker gave a job meanwhile is not returned as idle (else it would run two)."""
    postgres_url = empty_pg
    repo = JobRepository(Database(postgres_url))
    body = json.dumps({"prompt": "p"})
    await repo.submit(NewJob("txt2img", request=body, payload=body))
    await repo.db.dispose()
    conn = await asyncpg.connect(postgres_url.replace("postgresql+asyncpg", "postgresql"))
    idle = "SELECT * FROM a1111_proxy_idle_backends($1::text[], 'worker-a', $2)"
    try:
        async with conn.transaction():  # the backend idle throughout: it is returned
            assert await conn.fetchval(idle, ["http://one"], ADVISORY_SPACE) == "http://one"
        await conn.execute("CREATE SCHEMA meanwhile")
        await conn.execute(_STARTED_MEANWHILE)
        await conn.execute("SET search_path = meanwhile, pg_catalog, public")
        async with conn.transaction():
            assert await conn.fetch(idle, ["http://one"], ADVISORY_SPACE) == []
    finally:
        await conn.execute("DROP SCHEMA IF EXISTS meanwhile CASCADE")
        await conn.close()


@pytest.fixture
async def members() -> AsyncIterator[list[tuple[str, FleetMember]]]:
    async with fleet(BACKENDS, service_time=0.02) as found:
        yield found


def shared_worker(database_url: str, urls: list[str], number: int) -> Worker:
    """A worker of its own (its own engine, as a process would have) listing every URL."""
    repo = JobRepository(Database(database_url), lease_seconds=30)
    backends: list[Backend] = [A1111Backend(url, connect_retries=2) for url in urls]
    return Worker(
        repo=repo,
        backends=backends,
        wakeup=make_wakeup(database_url, 0.005, (WORK_CHANNEL,)),
        timing=Timing(progress_seconds=0.01, heartbeat_seconds=1),
        worker_id=f"shared-{number}",
    )


async def submit_many(repo: JobRepository, count: int) -> list[str]:
    ids = []
    for i in range(count):
        # Service times that differ, so that backends free up in every order.
        text = json.dumps({"prompt": f"p{i}", "fake_seconds": 0.05 + 0.02 * (i % 7)})
        ids.append((await repo.submit(NewJob("txt2img", request=text, payload=text))).job.id)
    return ids


async def test_workers_sharing_many_backends_never_send_one_of_them_two_jobs_at_once(
    database_url: str, members: list[tuple[str, FleetMember]]
) -> None:
    urls = [url for url, _ in members]
    workers = [shared_worker(database_url, urls, n) for n in range(WORKERS)]
    ids = await submit_many(workers[0].repo, JOBS)  # a backlog: the workers race for it
    running = [asyncio.create_task(worker.run()) for worker in workers]
    try:
        async with asyncio.timeout(120):
            while (await workers[0].repo.counts()).get("completed", 0) < JOBS:
                await asyncio.sleep(0.02)
        jobs = [await workers[0].repo.get(job_id) for job_id in ids]
    finally:
        for worker in workers:
            worker.stop()
        await asyncio.gather(*running)
        for worker in workers:
            await worker.repo.db.dispose()
    assert [job.status if job else None for job in jobs] == ["completed"] * JOBS
    assert sum(len(member.runs) for _, member in members) == JOBS  # each job ran once
    # Every backend ran jobs, never two at once.
    assert [member.max_in_flight for _, member in members] == [1] * BACKENDS


async def test_a_claim_says_whether_more_jobs_wait_than_it_took(database_url: str) -> None:
    db = Database(database_url)
    repo = JobRepository(db)
    try:
        for i in range(3):
            body = json.dumps({"prompt": f"p{i}"})
            await repo.submit(NewJob("txt2img", request=body, payload=body))
        two = await repo.claim("worker-a", [("http://one", None), ("http://two", None)])
        assert [claim.more_queued for _, claim in two] == [True, True]
        last = await claim_next(repo, "worker-a", "http://three")
        assert last is not None and last.more_queued is False
    finally:
        await db.dispose()


async def test_a_job_that_ends_wakes_the_api_but_no_worker_and_a_queued_one_wakes_both(
    database_url: str,
) -> None:
    """PostgreSQL: workers' claimers listen on WORK_CHANNEL, the API on NOTIFY_CHANNEL (and
    its progress streams on PROGRESS_CHANNEL: progress stored, not a lease renewed alone)."""
    db = Database(database_url)
    if db.is_sqlite:
        await db.dispose()
        pytest.skip("SQLite has no channels: a waiter sees every commit (data_version)")
    heard: list[str] = []
    listener = await asyncpg.connect(database_url.replace("postgresql+asyncpg", "postgresql"))
    for channel in (NOTIFY_CHANNEL, WORK_CHANNEL, PROGRESS_CHANNEL):
        await listener.add_listener(channel, lambda *args: heard.append(args[2]))
    repo = JobRepository(db)
    try:
        body = json.dumps({"prompt": "a fox"})
        await repo.submit(NewJob("txt2img", request=body, payload=body))
        claim = await claim_next(repo, "worker-a", SHARED)
        assert claim is not None
        assert (await repo.touch(claim)).alive and (await repo.touch(claim, progress=0.5)).alive
        assert await repo.complete(claim, {"images": []}, [])
        await repo.submit(NewJob("txt2img", request=body, payload=body))
        async with asyncio.timeout(30):  # notifications arrive in the order of the commits
            while heard.count(WORK_CHANNEL) < 2:
                await asyncio.sleep(0.01)
        submitted = [NOTIFY_CHANNEL, WORK_CHANNEL]
        # The end: the API's only.
        assert heard == [*submitted, PROGRESS_CHANNEL, NOTIFY_CHANNEL, *submitted]
    finally:
        await listener.close()
        await db.dispose()


class RecordedClaims(JobRepository):
    """The job store, recording each claim (the task that asked, the jobs it got); it holds the
    first claim made for a freed slot (`hold`) until `release` is set."""

    def __init__(self, db: Database) -> None:
        super().__init__(db, lease_seconds=30)
        self.made: list[tuple[str, int]] = []
        self.hold = False
        self.holding = asyncio.Event()
        self.release = asyncio.Event()

    async def claim(self, owner: str, slots: Slots) -> list[tuple[int, Claim]]:
        task = asyncio.current_task()
        asked_by = task.get_name() if task else ""
        if self.hold and asked_by == "claim-next":
            self.hold = False
            self.holding.set()
            await self.release.wait()
        claimed = await super().claim(owner, slots)
        self.made.append((asked_by, len(claimed)))
        return claimed


async def until(check: Callable[[], bool]) -> None:
    async with asyncio.timeout(30):
        while not check():
            await asyncio.sleep(0.005)


async def test_backends_that_answer_while_a_claim_runs_get_their_next_jobs_without_waiting(
    database_url: str,
) -> None:
    """A worker with four busy slots and one whose backend runs another worker's job: three
    backends answer while the claim made for the first one is held. Their next jobs are
    claimed meanwhile, and no claim looks at a slot that another claim is looking at (the
    other worker's backend, left to the held claim): none comes back empty."""
    db = Database(database_url)
    repo = RecordedClaims(db)
    elsewhere = FakeBackend("http://elsewhere")
    await submit_many(repo, 1)
    assert await claim_next(JobRepository(db), "another-worker", elsewhere.name) is not None
    await submit_many(repo, 8)
    own = [FakeBackend(f"http://own{i}", service_time=300) for i in range(4)]
    worker = Worker(
        repo=repo,
        backends=[*own, elsewhere],
        wakeup=make_wakeup(database_url, 0.005, (WORK_CHANNEL,)),
        timing=Timing(progress_seconds=0.02, heartbeat_seconds=1),
        shutdown_grace_seconds=0.2,
    )
    running = asyncio.create_task(worker.run())
    try:
        await until(lambda: all(fake.current is not None for fake in own))
        repo.hold = True
        own[0].finish_current()
        await asyncio.wait_for(repo.holding.wait(), 30)
        for fake in own[1:]:
            fake.finish_current()
        await until(lambda: all(len(fake.generation_requests()) == 2 for fake in own[1:]))
        repo.release.set()
        await until(lambda: len(own[0].generation_requests()) == 2)
    finally:
        repo.release.set()
        worker.stop()
        await running
        await db.dispose()
    for_freed_slots = [got for asked_by, got in repo.made if asked_by == "claim-next"]
    assert for_freed_slots and 0 not in for_freed_slots
    assert [fake.max_in_flight for fake in own] == [1] * 4  # no slot got two jobs
