"""unload-checkpoint, reload-checkpoint and /memory on the bundled engine (tiny random-weight
models on the CPU; the CUDA check runs where a GPU is present)."""

from __future__ import annotations

import asyncio
import gc
import inspect
import json
import os
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

torch = pytest.importorskip("torch", reason="the engine tests need the engine extra (torch)")
pytest.importorskip("diffusers", reason="the engine tests need the engine extra (diffusers)")

from a1111_proxy.app import create_app  # noqa: E402
from a1111_proxy.backends.diffusers import DiffusersBackend  # noqa: E402
from a1111_proxy.catalogue import CatalogueStore  # noqa: E402
from a1111_proxy.db.engine import Database  # noqa: E402
from a1111_proxy.engine.config import EngineConfig  # noqa: E402
from a1111_proxy.engine.device import CPU_NOTE  # noqa: E402
from a1111_proxy.jobs import JobRepository, NewJob  # noqa: E402
from a1111_proxy.wakeup import make_wakeup  # noqa: E402
from tests.servers import serve  # noqa: E402
from worker.catalogue import CatalogueKeeper  # noqa: E402
from worker.execute import Timing  # noqa: E402
from worker.loop import Worker  # noqa: E402

if TYPE_CHECKING:
    from tests.engine.conftest import TinyModels

pytestmark = [pytest.mark.anyio, pytest.mark.engine]
SMALL = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "seed": 7}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory, tiny_models: TinyModels) -> Iterator[Path]:
    """MODELS_DIR with two tiny SD1.5 single-file checkpoints, and their config folder."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = tmp_path_factory.mktemp("engine-checkpoint")
    source = tiny_models.sd15(root / "configs" / "sd15")
    checkpoints = root / "models" / "Stable-diffusion"
    for name in ("a-tiny", "b-tiny"):
        tiny_models.write_single_file(source, checkpoints / f"{name}.safetensors")
    yield root


def make_backend(models_dir: Path, device: str = "cpu") -> DiffusersBackend:
    return DiffusersBackend(
        EngineConfig(
            models_dir=models_dir / "models",
            device=device,
            skeletons={"sd15": models_dir / "configs" / "sd15"},
        )
    )


@pytest.fixture
async def backend(models_dir: Path) -> AsyncIterator[DiffusersBackend]:
    made = make_backend(models_dir)
    yield made
    await made.aclose()


def unet_of(backend: DiffusersBackend) -> weakref.ref[object]:
    loaded = backend.models.get(None)
    return weakref.ref(loaded.pipe.unet)


async def test_unload_frees_the_model_and_the_next_job_loads_it_again(
    backend: DiffusersBackend,
) -> None:
    await backend.generate("txt2img", SMALL)
    unet = unet_of(backend)
    assert backend.models.loaded() == ["a-tiny.safetensors"]

    await backend.unload_checkpoint()
    gc.collect()
    assert backend.models.loaded() == [] and unet() is None  # nothing holds its weights

    result = await backend.generate("txt2img", SMALL)
    assert len(result["images"]) == 1 and json.loads(result["info"])["sd_model_name"] == "a-tiny"
    assert backend.models.loaded() == ["a-tiny.safetensors"]


async def test_reload_loads_the_checkpoint_it_names_else_the_one_used_last(
    backend: DiffusersBackend,
) -> None:
    await backend.generate(
        "txt2img", {**SMALL, "override_settings": {"sd_model_checkpoint": "b-tiny"}}
    )
    await backend.unload_checkpoint()
    await backend.reload_checkpoint(None)
    assert backend.models.loaded() == ["b-tiny.safetensors"]  # the one used last
    await backend.unload_checkpoint()
    await backend.reload_checkpoint("a-tiny")
    assert backend.models.loaded() == ["a-tiny.safetensors"]


async def test_memory_is_answered_in_a1111s_shape(backend: DiffusersBackend) -> None:
    memory = await backend.catalogue_entry("memory")
    assert set(memory) == {"ram", "cuda"}
    assert set(memory["ram"]) == {"free", "used", "total"} and memory["ram"]["used"] > 0
    assert memory["cuda"] == {"error": "unavailable (the engine runs on cpu)"}


async def test_the_detailed_health_shows_the_engines_device_and_loaded_models(
    backend: DiffusersBackend, sqlite_url: str, settings_for: Any
) -> None:
    await backend.generate("txt2img", SMALL)
    db = Database(sqlite_url)
    try:
        await CatalogueKeeper(CatalogueStore(db)).fetch_all([backend])
    finally:
        await db.dispose()
    settings = settings_for(
        database_url=sqlite_url, backend="diffusers", admin_tokens="ops:ops-token"
    )
    with serve(create_app(settings)) as url, httpx.Client(base_url=url) as api:
        detailed = api.get("/health", headers={"Authorization": "Bearer ops-token"}).json()
        public = api.get("/health").json()
    device = detailed["device"]
    assert device["type"] == "cpu" and device["note"] == CPU_NOTE
    assert device["torch"] == torch.__version__ and device["dtype"] == "float32"
    assert device["memory"]["total"] >= device["memory"]["used"] > 0
    assert device["utilization_percent"] is None and device["temperature_c"] is None
    assert device["loaded_models"] == [
        {
            "name": "a-tiny.safetensors",
            "architecture": "sd15",
            "unet": "float32",
            "vae": "float32",
            "text_encoder": "float32",
        }
    ]
    assert device["age_seconds"] >= 0
    assert "device" not in public  # the detailed view is for admins


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
async def test_on_cuda_the_device_facts_name_the_gpu_and_its_memory(models_dir: Path) -> None:
    backend = make_backend(models_dir, device="cuda")
    try:
        await backend.generate("txt2img", SMALL)
        device = await backend.catalogue_entry("device")
        assert device["type"] == "cuda" and device["name"] == torch.cuda.get_device_name()
        assert device["memory"]["total"] > device["memory"]["free"] > 0
        assert device["loaded_models"][0]["unet"] == "float16"
        if device["nvml"] == "ok":
            assert 0 <= device["utilization_percent"] <= 100 and device["temperature_c"] > 0
    finally:
        await backend.aclose()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
async def test_on_cuda_unload_gives_the_gpu_memory_back(models_dir: Path) -> None:
    backend = make_backend(models_dir, device="cuda")
    try:
        await backend.generate("txt2img", SMALL)
        before = await backend.catalogue_entry("memory")
        assert before["cuda"]["allocated"]["current"] > 0
        assert set(before["cuda"]) == {
            "system",
            "active",
            "allocated",
            "reserved",
            "inactive",
            "events",
        }
        await backend.unload_checkpoint()
        after = await backend.catalogue_entry("memory")
        assert after["cuda"]["allocated"]["current"] < before["cuda"]["allocated"]["current"]
        assert after["cuda"]["reserved"]["current"] <= before["cuda"]["reserved"]["current"]
    finally:
        await backend.aclose()


async def until(check: Callable[[], object], timeout: float = 60) -> None:
    async with asyncio.timeout(timeout):
        while True:
            value = check()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return
            await asyncio.sleep(0.02)


async def test_the_worker_unloads_the_engine_between_jobs_and_a_later_job_still_runs(
    models_dir: Path, sqlite_url: str
) -> None:
    db = Database(sqlite_url)
    repo = JobRepository(db)
    backend = make_backend(models_dir)
    worker = Worker(
        repo=repo,
        backends=[backend],
        wakeup=make_wakeup(sqlite_url, 0.005),
        timing=Timing(
            progress_seconds=0.05, heartbeat_seconds=1, interrupt_grace_seconds=5, stall_seconds=60
        ),
        keeper=CatalogueKeeper(CatalogueStore(db)),
        shutdown_grace_seconds=5,
    )
    task = asyncio.create_task(worker.run())

    async def run_job() -> None:
        body = json.dumps(SMALL)
        job = (await repo.submit(NewJob("txt2img", request=body, payload=body))).job
        await until(lambda: _completed(repo, job.id))

    try:
        await run_job()
        assert backend.models.loaded() == ["a-tiny.safetensors"]
        await CatalogueStore(db).request_checkpoint(loaded=False)
        await until(lambda: backend.models.loaded() == [])
        await run_job()
        assert backend.models.loaded() == ["a-tiny.safetensors"]
    finally:
        worker.stop()
        await task
        await db.dispose()


async def _completed(repo: JobRepository, job_id: str) -> bool:
    row = await repo.get(job_id)
    assert row is not None and row.status in ("queued", "processing", "completed"), row
    return row.status == "completed"
