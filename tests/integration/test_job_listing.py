"""Listing jobs by model and by text in the prompt (what the web UI's filters ask for), on SQLite
and on PostgreSQL: the store's `listing`, then `GET /sdapi/v1/jobs` with `?model=` and
`?prompt=` over a real uvicorn."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from a1111_proxy.app import create_app
from a1111_proxy.catalogue import CatalogueStore
from a1111_proxy.db.engine import Database
from a1111_proxy.jobs import JobFilter, JobRepository, NewJob
from a1111_proxy.jobs import reads as reads_module
from tests.servers import ASYNC, serve

MODELS = [
    {
        "title": "sdxl/juggernaut.safetensors [c9e3e68f89]",
        "model_name": "sdxl_juggernaut",
        "hash": "c9e3e68f89",
        "sha256": "c9e3e68f89" + "1" * 54,
        "filename": "/models/Stable-diffusion/sdxl/juggernaut.safetensors",
    },
    {"title": "anime.safetensors [bbbb]", "model_name": "anime", "sha256": "b" * 64},
]


def new_job(prompt: Any, checkpoint: str | None = None, **extra: Any) -> NewJob:
    body = json.dumps({"prompt": prompt, **extra})
    return NewJob("txt2img", request=body, payload=body, checkpoint=checkpoint)


async def submitted(repo: JobRepository, *jobs: NewJob) -> list[str]:
    return [(await repo.submit(job)).job.id for job in jobs]


async def listed(repo: JobRepository, **where: Any) -> list[str]:
    found = await repo.listing(JobFilter(**where), limit=50)
    return [job.id for job in found.jobs]


@pytest.mark.anyio
async def test_a_prompt_filter_finds_the_text_in_the_prompt_only_ignoring_case(
    repo: JobRepository,
) -> None:
    fox, fox_upper, whale, negative = await submitted(
        repo,
        new_job("a red fox in the snow"),
        new_job("A RED FOX, oil painting"),
        new_job("a blue whale"),
        new_job("a cat", negative_prompt="red fox"),
    )
    assert await listed(repo, prompt="red fox") == [fox_upper, fox]
    assert await listed(repo, prompt="whale") == [whale]
    assert negative not in await listed(repo, prompt="fox")  # only in the negative prompt
    assert await listed(repo, prompt="no such words") == []


@pytest.mark.anyio
async def test_a_prompt_filter_matches_quotes_backslashes_and_unicode_and_no_wildcards(
    repo: JobRepository,
) -> None:
    quoted, accented, percent, plain = await submitted(
        repo,
        new_job('a sign that says "open"'),
        new_job("café au lait, 🐱"),
        new_job("100% cotton"),
        new_job("a plain prompt with C:\\path"),
    )
    assert await listed(repo, prompt='says "open"') == [quoted]
    assert await listed(repo, prompt="café") == [accented]
    assert await listed(repo, prompt="🐱") == [accented]
    assert await listed(repo, prompt="0% c") == [percent]
    assert await listed(repo, prompt="%") == [percent]  # a literal %, not "anything"
    assert await listed(repo, prompt="_") == []  # a literal _, not "any one character"
    assert await listed(repo, prompt="C:\\path") == [plain]


@pytest.mark.anyio
async def test_a_prompt_filter_skips_a_prompt_that_is_not_text(repo: JobRepository) -> None:
    await submitted(repo, new_job(["fox"]), new_job(None, note="fox"))
    assert await listed(repo, prompt="fox") == []


@pytest.mark.anyio
async def test_a_prompt_filtered_page_looks_at_a_bounded_window_and_says_where_to_go_on(
    repo: JobRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reads_module, "PROMPT_SCAN", 4)
    ids = await submitted(repo, *(new_job("fox" if i in (1, 8) else "cat") for i in range(10)))
    where = JobFilter(prompt="fox")
    pages = []
    cursor = None
    while True:
        page = await repo.listing(where, before_seq=cursor, limit=5)
        pages.append([job.id for job in page.jobs])
        if page.next_seq is None:
            break
        cursor = page.next_seq
    # Windows of 4 jobs (9-6, 5-2, 1-0): some pages hold no match but still lead on.
    assert pages == [[ids[8]], [], [ids[1]]]


@pytest.mark.anyio
async def test_a_full_page_of_prompt_matches_continues_after_its_last_match(
    repo: JobRepository,
) -> None:
    ids = await submitted(repo, *(new_job(f"fox {i}") for i in range(5)))
    first = await repo.listing(JobFilter(prompt="fox"), limit=2)
    assert [job.id for job in first.jobs] == [ids[4], ids[3]]
    rest = await repo.listing(JobFilter(prompt="fox"), before_seq=first.next_seq, limit=10)
    assert [job.id for job in rest.jobs] == [ids[2], ids[1], ids[0]]
    assert rest.next_seq is None


@pytest.mark.anyio
async def test_a_model_filter_keeps_jobs_that_asked_for_any_of_its_names(
    repo: JobRepository,
) -> None:
    title, name, other, none = await submitted(
        repo,
        new_job("a", checkpoint=MODELS[0]["title"]),
        new_job("b", checkpoint="sdxl_juggernaut"),
        new_job("c", checkpoint=MODELS[1]["title"]),
        new_job("d"),
    )
    names = (MODELS[0]["title"], "sdxl_juggernaut")
    assert await listed(repo, checkpoints=names) == [name, title]
    assert await listed(repo, checkpoints=(MODELS[1]["title"],)) == [other]
    assert none not in await listed(repo, checkpoints=names)


# --- GET /sdapi/v1/jobs ---------------------------------------------------------------------


@pytest.fixture
def api(database_url: str, settings_for: Any) -> Any:
    asyncio.run(_store_models(database_url))
    settings = settings_for(database_url=database_url)
    with serve(create_app(settings)) as url, httpx.Client(base_url=url, headers=ASYNC) as client:
        yield client


async def _store_models(database_url: str) -> None:
    db = Database(database_url)
    try:
        await CatalogueStore(db).put("sd-models", MODELS, "http://a1111:7860")
    finally:
        await db.dispose()


def post(api: httpx.Client, **body: Any) -> str:
    response = api.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def ids(api: httpx.Client, **params: str) -> list[str]:
    response = api.get("/sdapi/v1/jobs", params=params)
    assert response.status_code == 200, response.text
    return [job["id"] for job in response.json()["jobs"]]


def test_the_listing_filters_by_a_model_under_any_name_a1111_knows_it_by(
    api: httpx.Client,
) -> None:
    by_title = post(api, prompt="a", override_settings={"sd_model_checkpoint": MODELS[0]["title"]})
    by_hash = post(api, prompt="b", override_settings={"sd_model_checkpoint": "c9e3e68f89"})
    other = post(api, prompt="c", override_settings={"sd_model_checkpoint": "anime"})
    post(api, prompt="d")
    for name in (MODELS[0]["title"], "sdxl_juggernaut", "juggernaut.safetensors"):
        assert ids(api, model=name) == [by_hash, by_title], name
    assert ids(api, model="anime") == [other]
    assert ids(api, model="not-in-the-catalogue") == []


def test_the_listing_filters_by_prompt_text_with_the_other_filters(api: httpx.Client) -> None:
    fox = post(api, prompt="a red fox")
    canceled_fox = post(api, prompt="a sleeping fox")
    post(api, prompt="a whale")
    api.post(f"/sdapi/v1/jobs/{canceled_fox}/cancel")
    assert ids(api, prompt="FOX") == [canceled_fox, fox]
    assert ids(api, prompt="fox", status="queued") == [fox]
    assert ids(api, prompt="  fox  ", status="canceled") == [canceled_fox]
    assert len(ids(api, prompt="")) == 3  # blank: no filter
    too_long = api.get("/sdapi/v1/jobs", params={"prompt": "x" * 201})
    assert too_long.status_code == 422
    assert too_long.json()["detail"][0]["loc"] == ["query", "prompt"]


def test_a_list_never_carries_image_data(api: httpx.Client) -> None:
    post(api, prompt="a fox")
    page = api.get("/sdapi/v1/jobs", params={"prompt": "fox"}).json()
    assert all(job["result"] is None for job in page["jobs"])
    assert "base64" not in json.dumps(page) and len(json.dumps(page)) < 5000
