"""A model downloaded through the API is usable at once with the bundled engine: the real API, a
real Worker on BACKEND=diffusers (its catalogue lists MODELS_DIR) with its Downloader, and a fake
Civitai on loopback serving a tiny real single-file checkpoint."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

pytest.importorskip("torch", reason="the engine tests need the engine extra (torch)")
pytest.importorskip("diffusers", reason="the engine tests need the engine extra (diffusers)")

from a1111_proxy.app import create_app
from a1111_proxy.backends.diffusers import DiffusersBackend
from a1111_proxy.catalogue import CatalogueStore
from a1111_proxy.civitai import CivitaiClient
from a1111_proxy.db.engine import Database
from a1111_proxy.downloads import DownloadStore
from a1111_proxy.engine.config import EngineConfig
from a1111_proxy.jobs import JobRepository
from a1111_proxy.model_info import ModelInfoStore
from a1111_proxy.wakeup import make_wakeup
from tests.fakes.civitai import FakeCivitai
from tests.servers import ASYNC, serve
from worker.catalogue import CatalogueKeeper
from worker.downloader import DownloadConfig, Downloader
from worker.execute import Timing
from worker.loop import Worker

if TYPE_CHECKING:
    from tests.engine.conftest import TinyModels

pytestmark = [pytest.mark.anyio, pytest.mark.engine]

DOWNLOADS = "/sdapi/v1/models/downloads"


@pytest.fixture
def civitai() -> Iterator[tuple[FakeCivitai, str]]:
    fake = FakeCivitai()
    with serve(fake.app) as url:
        yield fake, url


async def until(api: httpx.AsyncClient, path: str, ready: Any, what: str) -> Any:
    async with asyncio.timeout(120):
        while True:
            body = (await api.get(path)).json()
            if ready(body):
                return body
            await asyncio.sleep(0.05)


async def test_a_downloaded_checkpoint_is_listed_and_generates_at_once(
    tmp_path: Path,
    tiny_models: TinyModels,
    civitai: tuple[FakeCivitai, str],
    sqlite_url: str,
    settings_for: Any,
) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    fake, civitai_url = civitai
    configs = tmp_path / "configs"
    checkpoint = tmp_path / "elsewhere" / "tiny.safetensors"
    tiny_models.write_single_file(tiny_models.sd15(configs / "sd15"), checkpoint)
    fake.add(51, "tinydl", checkpoint.read_bytes())
    models = tmp_path / "models"
    models.mkdir()
    db = Database(sqlite_url)
    settings = settings_for(
        database_url=sqlite_url,
        backend="diffusers",
        models_dir=str(models),
        civitai_url=civitai_url,
    )
    downloader = Downloader(
        DownloadStore(db),
        CivitaiClient(civitai_url, min_interval=0),
        CatalogueStore(db),
        ModelInfoStore(db),
        DownloadConfig(models_dir=models, reserve_bytes=0, heartbeat_seconds=0.05),
        worker_id="engine-worker",
        interval=0.05,
    )
    backend = DiffusersBackend(
        EngineConfig(models_dir=models, device="cpu", skeletons={"sd15": configs / "sd15"})
    )
    worker = Worker(
        repo=JobRepository(db, max_attempts=1, lease_seconds=30),
        backends=[backend],
        wakeup=make_wakeup(sqlite_url, 0.01),
        timing=Timing(progress_seconds=0.05, heartbeat_seconds=0.5),
        keeper=CatalogueKeeper(CatalogueStore(db), interval=300),
        catalogue_check_seconds=0.05,
        chores=[downloader],
    )
    running = asyncio.create_task(worker.run())
    try:
        with serve(create_app(settings)) as url:
            async with httpx.AsyncClient(base_url=url, headers=ASYNC, timeout=60) as api:
                await until(api, "/sdapi/v1/sd-models", lambda b: b == [], "the empty catalogue")
                added = (await api.post(DOWNLOADS, json={"source": "51"})).json()
                done = await until(
                    api,
                    f"{DOWNLOADS}/{added['id']}",
                    lambda d: d["status"] in ("completed", "failed"),
                    "the download",
                )
                assert done["status"] == "completed", done
                listed = await until(
                    api, "/sdapi/v1/sd-models", lambda b: b != [], "the catalogue's refresh"
                )
                assert [m["model_name"] for m in listed] == ["tinydl"]
                assert listed[0]["civitai"]["version_id"] == 51  # recorded by the download
                job = await api.post(
                    "/sdapi/v1/txt2img",
                    json={
                        "prompt": "a cat",
                        "steps": 2,
                        "width": 64,
                        "height": 64,
                        "override_settings": {"sd_model_checkpoint": "tinydl"},
                    },
                )
                assert job.status_code == 202, job.text
                ran = await until(
                    api,
                    f"/sdapi/v1/jobs/{job.json()['id']}",
                    lambda j: j["status"] in ("completed", "error", "canceled"),
                    "the job",
                )
                assert ran["status"] == "completed", ran["error"]
                assert "Model: tinydl" in ran["result"]["info"]
    finally:
        worker.stop()
        await asyncio.wait_for(running, 60)
        await db.dispose()
