"""Civitai metadata from end to end: the worker's enricher asks Civitai (respx, through the client's
`transport=`) about what the catalogue lists and stores the answers; the real API shows them as
`civitai` on /sd-models and /loras, finds one model by name, and never waits on Civitai."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import respx

from a1111_proxy.app import create_app
from a1111_proxy.backends.a1111 import A1111Backend
from a1111_proxy.catalogue import CatalogueStore
from a1111_proxy.civitai import CivitaiClient
from a1111_proxy.db.engine import Database
from a1111_proxy.jobs import JobRepository, NewJob
from a1111_proxy.model_info import ModelInfoStore
from a1111_proxy.wakeup import make_wakeup
from tests.fakes.a1111 import MODELS, FakeA1111
from tests.fakes.civitai import (
    CIVITAI,
    RecordedSleep,
    by_hash,
    safetensors_bytes,
    transport,
    version,
)
from tests.fakes.clock import Clock
from tests.servers import ASYNC, serve
from worker.catalogue import CatalogueKeeper
from worker.downloader import Downloader
from worker.enricher import CivitaiEnricher
from worker.execute import Timing
from worker.hasher import ModelHasher
from worker.loop import Worker
from worker.main import build_chores

pytestmark = pytest.mark.anyio

SD15, SDXL = MODELS[0]["sha256"], MODELS[1]["sha256"]
LORA_FILE = safetensors_bytes(b"\x01\x02" * 5000, {"ss_output_name": "add_detail"})
KOHYA_AUTOV3 = "0123456789ab"
TTL = 7 * 24 * 3600.0


@pytest.fixture
def router() -> respx.Router:
    return respx.Router(assert_all_called=False)


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    """These tests run on the SQLite file only (`db`, the API and the worker share it)."""
    return sqlite_url


def enricher_for(
    db: Database, router: respx.Router, clock: Clock | None = None, **options: Any
) -> CivitaiEnricher:
    sleep = RecordedSleep()
    client = CivitaiClient(CIVITAI, transport=transport(router), sleep=sleep, clock=sleep.clock)
    clock = clock or Clock(1_000_000.0)
    return CivitaiEnricher(
        CatalogueStore(db),
        ModelInfoStore(db, clock=clock),
        client,
        ttl=TTL,
        rest_seconds=0,
        clock=clock,
        **options,
    )


async def put_catalogue(
    db: Database, models: list[dict[str, Any]], loras: list[dict[str, Any]] | None = None
) -> None:
    store = CatalogueStore(db)
    await store.put("sd-models", models, "fake")
    await store.put("loras", loras or [], "fake")


# --- the enricher -----------------------------------------------------------------------


async def test_hits_and_404s_are_stored_and_not_asked_again(
    db: Database, router: respx.Router
) -> None:
    hit = by_hash(router, SD15).respond(200, json=version(1, "SD 1.5"))
    missing = by_hash(router, SDXL).respond(404)
    lora = by_hash(router, KOHYA_AUTOV3).respond(200, json=version(2, "Detail", "LORA"))
    await put_catalogue(
        db,
        MODELS,
        [
            {
                "name": "detail",
                "alias": "detail",
                "path": "/l/detail.pt",
                "metadata": {"sshs_model_hash": KOHYA_AUTOV3 + "cd" * 26},
            }
        ],
    )
    enricher = enricher_for(db, router)
    await enricher.tick()
    await enricher.tick()
    await enricher.aclose()
    assert (hit.call_count, missing.call_count, lora.call_count) == (1, 1, 1)
    lookups = await ModelInfoStore(db).lookups([SD15, SDXL, KOHYA_AUTOV3])
    assert lookups[SD15].summary["model_name"] == "SD 1.5"  # type: ignore[index]
    assert lookups[SDXL].found is False and lookups[SDXL].summary is None
    assert lookups[KOHYA_AUTOV3].summary["type"] == "LORA"  # type: ignore[index]


async def test_500s_give_up_this_round_and_the_next_round_asks_again(
    db: Database, router: respx.Router
) -> None:
    route = by_hash(router, SD15).mock(
        side_effect=[httpx.Response(500)] * 4 + [httpx.Response(200, json=version(1, "SD 1.5"))]
    )
    await put_catalogue(db, MODELS[:1])
    enricher = enricher_for(db, router)
    await enricher.tick()
    assert route.call_count == 4 and await ModelInfoStore(db).lookups([SD15]) == {}
    assert enricher.unavailable
    await enricher.tick()
    await enricher.aclose()
    assert route.call_count == 5 and not enricher.unavailable
    assert (await ModelInfoStore(db).lookups([SD15]))[SD15].found


async def test_answers_are_asked_again_only_after_the_ttl(
    db: Database, router: respx.Router
) -> None:
    route = by_hash(router, SD15).mock(
        side_effect=[httpx.Response(404), httpx.Response(200, json=version(1, "Uploaded since"))]
    )
    await put_catalogue(db, MODELS[:1])
    clock = Clock(1_000_000.0)
    enricher = enricher_for(db, router, clock)
    await enricher.tick()
    clock.now += TTL - 1
    await enricher.tick()
    assert route.call_count == 1
    clock.now += 2
    await enricher.tick()
    await enricher.aclose()
    assert route.call_count == 2
    summary = (await ModelInfoStore(db).lookups([SD15]))[SD15].summary
    assert summary is not None and summary["model_name"] == "Uploaded since"


async def test_an_unreachable_civitai_is_logged_once_and_the_worker_carries_on(
    db: Database, router: respx.Router, caplog: pytest.LogCaptureFixture
) -> None:
    route = by_hash(router, SD15).mock(side_effect=httpx.ConnectError("name resolution failed"))
    await put_catalogue(db, MODELS[:1])
    enricher = enricher_for(db, router)
    with caplog.at_level(logging.INFO, logger="a1111_proxy.worker"):
        for _ in range(3):
            await enricher.tick()
    await enricher.aclose()
    assert route.call_count == 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "civitai: unavailable" in warnings[0].getMessage()


# --- through the real API, with a real worker ---------------------------------------------


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    """Files beside the fake A1111: its LoRA, which A1111 lists without a hash."""
    root = tmp_path / "models"
    (root / "Lora").mkdir(parents=True)
    (root / "Lora" / "add_detail.safetensors").write_bytes(LORA_FILE)
    return root


@pytest.fixture
def api_url(sqlite_url: str, settings_for: Any) -> Iterator[str]:
    with serve(create_app(settings_for(database_url=sqlite_url))) as url:
        yield url


def make_worker(
    db: Database, sqlite_url: str, a1111_url: str, models_dir: Path, router: respx.Router
) -> Worker:
    info = ModelInfoStore(db)
    client = CivitaiClient(CIVITAI, transport=transport(router), min_interval=0.01)
    return Worker(
        repo=JobRepository(db, max_attempts=3, lease_seconds=5),
        backends=[A1111Backend(a1111_url, connect_retries=2, retry_wait=0.01)],
        wakeup=make_wakeup(sqlite_url, 0.005),
        timing=Timing(progress_seconds=0.02, heartbeat_seconds=0.2),
        keeper=CatalogueKeeper(CatalogueStore(db)),
        catalogue_check_seconds=0.05,
        chores=[
            ModelHasher(info, models_dir, interval=0.05),
            CivitaiEnricher(CatalogueStore(db), info, client, ttl=TTL, interval=0.05),
        ],
    )


@contextlib.asynccontextmanager
async def running(worker: Worker) -> AsyncIterator[Worker]:
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, 10)


async def eventually(check: Any, timeout: float = 10) -> Any:
    async with asyncio.timeout(timeout):
        while not (value := await check()):
            await asyncio.sleep(0.02)
    return value


async def test_the_api_shows_civitai_on_sd_models_and_loras_and_finds_one_by_name(
    db: Database,
    sqlite_url: str,
    api_url: str,
    fake_a1111: tuple[FakeA1111, str],
    models_dir: Path,
    router: respx.Router,
) -> None:
    import hashlib

    lora_sha = hashlib.sha256(LORA_FILE).hexdigest()
    by_hash(router, SD15).respond(200, json=version(4384, "DreamShaper"))
    by_hash(router, SDXL).respond(404)
    by_hash(router, lora_sha).respond(200, json=version(58390, "Detail Tweaker", "LORA"))
    worker = make_worker(db, sqlite_url, fake_a1111[1], models_dir, router)
    async with httpx.AsyncClient(base_url=api_url, headers=ASYNC) as api, running(worker):
        models = await eventually(lambda: _listed_with_civitai(api, "sd-models"))
        loras = await eventually(lambda: _listed_with_civitai(api, "loras"))
        plain_models = (await api.get("/sdapi/v1/sd-models", params={"civitai": "false"})).json()
        plain_loras = (await api.get("/sdapi/v1/loras?civitai=false")).json()
        by_title = await api.get(f"/sdapi/v1/sd-models/{quote(MODELS[1]['title'])}")
        by_raw_title = await api.get(f"/sdapi/v1/sd-models/{MODELS[1]['title']}")
        by_name = await api.get("/sdapi/v1/sd-models/v1-5-pruned-emaonly")
        by_hash_ = await api.get(f"/sdapi/v1/sd-models/{MODELS[0]['hash']}")
        by_rel_path = await api.get("/sdapi/v1/sd-models/SDXL/juggernautXL_v9.safetensors")
        lora = await api.get("/sdapi/v1/loras/add_detail")
        lora_plain = await api.get("/sdapi/v1/loras/add_detail?civitai=false")
        unknown_model = await api.get("/sdapi/v1/sd-models/nope [123]")
        unknown_lora = await api.get("/sdapi/v1/loras/nope")

    # A1111's fields, in A1111's order, untouched; `civitai` added last where Civitai knows it.
    assert plain_models == MODELS and plain_loras == fake_a1111[0].catalogue["loras"]
    assert [list(m)[:6] for m in models] == [list(MODELS[0]), list(MODELS[1])]
    assert list(models[0])[-1] == "civitai" and "civitai" not in models[1]  # SDXL: not on Civitai
    assert {k: v for k, v in models[0].items() if k != "civitai"} == MODELS[0]
    assert models[0]["civitai"]["model_name"] == "DreamShaper"
    assert models[0]["civitai"]["page_url"] == f"{CIVITAI}/models/5384?modelVersionId=4384"
    assert loras[0]["civitai"]["trained_words"] == ["detailed"]
    assert loras[0]["civitai"]["images"][0]["width"] == 512

    assert by_title.status_code == 200 and by_title.json() == MODELS[1]
    assert by_raw_title.json() == MODELS[1] and by_rel_path.json() == MODELS[1]
    assert by_name.json()["civitai"]["version_id"] == 4384
    assert by_hash_.json()["title"] == MODELS[0]["title"]
    assert lora.json()["civitai"]["model_name"] == "Detail Tweaker"
    assert "civitai" not in lora_plain.json()
    assert unknown_model.status_code == 404 and unknown_lora.status_code == 404
    assert unknown_model.json()["code"] == "model_not_found"
    assert MODELS[0]["title"] in unknown_model.json()["detail"]
    assert "'add_detail'" in unknown_lora.json()["detail"]


async def _listed_with_civitai(api: httpx.AsyncClient, name: str) -> list[dict[str, Any]] | None:
    response = await api.get(f"/sdapi/v1/{name}")  # 503 until the worker fetched a catalogue
    listed = response.json() if response.status_code == 200 else None
    return listed if listed and "civitai" in listed[0] else None


async def test_listings_and_jobs_do_not_wait_while_civitai_hangs(
    db: Database,
    sqlite_url: str,
    api_url: str,
    fake_a1111: tuple[FakeA1111, str],
    models_dir: Path,
    router: respx.Router,
) -> None:
    asked, left = asyncio.Event(), asyncio.Event()

    async def hang(request: httpx.Request) -> httpx.Response:
        asked.set()
        try:
            await asyncio.sleep(3600)
        finally:
            left.set()
        raise AssertionError("unreachable")

    router.get(url__startswith=CIVITAI).mock(side_effect=hang)
    worker = make_worker(db, sqlite_url, fake_a1111[1], models_dir, router)
    repo = JobRepository(db, max_attempts=3, lease_seconds=5)
    async with httpx.AsyncClient(base_url=api_url, headers=ASYNC) as api:
        async with running(worker):
            await asyncio.wait_for(asked.wait(), 10)  # a Civitai request is hanging now
            for _ in range(15):  # each answered while it hangs (it would never end otherwise)
                await asyncio.wait_for(_listing(api), 10)
            body = json.dumps({"prompt": "a cat", "steps": 5})
            job = (await repo.submit(NewJob("txt2img", request=body, payload=body))).job
            await eventually(lambda: _completed(repo, job.id))
            assert not left.is_set()  # all of it happened while Civitai still hung


async def _listing(api: httpx.AsyncClient) -> None:
    response = await api.get("/sdapi/v1/sd-models")
    assert response.status_code == 200 and len(response.json()) == 2


async def _completed(repo: JobRepository, job_id: str) -> bool:
    return (await repo.get(job_id)).status == "completed"


async def test_with_civitai_turned_off_the_api_shows_a1111s_lists_and_no_lookups_run(
    db: Database,
    sqlite_url: str,
    settings_for: Any,
) -> None:
    await put_catalogue(db, MODELS)
    await ModelInfoStore(db).save_lookup(SD15, {"model_name": "DreamShaper"}, TTL)
    settings = settings_for(database_url=sqlite_url, civitai_enabled=False)
    with serve(create_app(settings)) as url:
        async with httpx.AsyncClient(base_url=url, headers=ASYNC) as api:
            listed = (await api.get("/sdapi/v1/sd-models")).json()
    chores = build_chores(settings, db)
    for chore in chores:
        await chore.aclose()
    assert listed == MODELS
    assert [type(chore) for chore in chores] == [ModelHasher, Downloader]
    enabled = build_chores(settings_for(database_url=sqlite_url), db)
    for chore in enabled:
        await chore.aclose()
    assert [type(chore) for chore in enabled] == [ModelHasher, Downloader, CivitaiEnricher]
