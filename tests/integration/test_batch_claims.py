"""Claiming compatible jobs as one batch (ENGINE_MAX_BATCH), on SQLite and on PostgreSQL: one
statement takes the first due job and the jobs with its batch key; each keeps its own lease."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from a1111_proxy.engine.compat import batch_key
from a1111_proxy.jobs import JobRepository, NewJob
from a1111_proxy.schemas import render_job
from tests.fakes.clock import Clock

pytestmark = pytest.mark.anyio
SLOT = [("diffusers:gpu", None)]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def repo_options(clock: Clock) -> dict[str, Any]:
    return {"lease_seconds": 30, "clock": clock, "batch_key": batch_key}


async def submit(repo: JobRepository, **body: Any) -> str:
    text = json.dumps({"prompt": "cat", "steps": 4, **body})
    return (await repo.submit(NewJob("txt2img", request=text, payload=text))).job.id


async def test_a_batch_claim_takes_the_first_job_and_the_compatible_ones_each_with_its_lease(
    repo: JobRepository, clock: Clock
) -> None:
    first = await submit(repo, prompt="a")
    other = await submit(repo, steps=5)  # not compatible: stays queued
    second = await submit(repo, prompt="b", seed=3)
    third = await submit(repo, prompt="c", batch_size=2)
    claimed = [c for _, c in await repo.claim("w", SLOT, batch=4)]
    assert [c.id for c in claimed] == [first, second, third]
    assert len({c.token for c in claimed}) == 3 and all(c.batch_key for c in claimed)
    assert (await repo.get(other)).status == "queued"
    assert all(c.more_queued for c in claimed)

    # Each lease fences its own job: a stale token stores nothing, the real one does.
    stale = dataclasses.replace(claimed[1], token=claimed[0].token)
    assert not await repo.complete(stale, {"images": []}, [b"x"])
    assert await repo.complete(claimed[1], {"images": []}, [b"png"])
    assert (await repo.get(second)).status == "completed"
    assert (await repo.get(first)).status == "processing"


async def test_a_batch_claim_takes_a_lone_job_alone_and_a_job_without_key_alone(
    repo: JobRepository,
) -> None:
    hires = await submit(repo, enable_hr=True)  # runs alone: no key
    plain = await submit(repo)
    assert [c.id for _, c in await repo.claim("w", SLOT, batch=4)] == [hires]
    assert [c.id for _, c in await repo.claim("w2", [("diffusers:b", None)], batch=4)] == [plain]


async def test_a_batch_is_topped_up_with_jobs_of_its_key_only(repo: JobRepository) -> None:
    first = await submit(repo, prompt="a")
    [(_, head)] = await repo.claim("w", SLOT, batch=4)
    await submit(repo, steps=9)
    later = await submit(repo, prompt="b")
    more = await repo.claim("w", SLOT, batch=3, key=head.batch_key)
    assert head.id == first and [c.id for _, c in more] == [later]


async def test_a_job_with_a_batch_key_is_shown_whole_with_its_result(repo: JobRepository) -> None:
    job_id = await submit(repo, prompt="a")
    [(_, claim)] = await repo.claim("w", SLOT, batch=4)
    assert claim.batch_key is not None
    assert await repo.complete(claim, {"images": [], "info": "{}"}, [b"png"])
    view = render_job(await repo.get(job_id), [b"png"])
    assert "render_error" not in view and view["result"]["info"] == "{}"
