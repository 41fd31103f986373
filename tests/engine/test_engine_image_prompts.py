"""Image prompts (IP-Adapter units in the A1111 ControlNet extension's shape) on the bundled
engine, on a tiny random SD1.5, a tiny random CLIP vision encoder and tiny random IP-Adapters
(tests/fakes/tiny_ip_adapter.py), on the CPU, offline."""

from __future__ import annotations

import asyncio
import base64
import io
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

torch = pytest.importorskip("torch", reason="the engine tests need the engine extra (torch)")
pytest.importorskip("diffusers", reason="the engine tests need the engine extra (diffusers)")

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from a1111_proxy.app import create_app  # noqa: E402
from a1111_proxy.backends import BackendRejected  # noqa: E402
from a1111_proxy.backends.diffusers import DiffusersBackend  # noqa: E402
from a1111_proxy.catalogue import CatalogueStore  # noqa: E402
from a1111_proxy.db.engine import Database  # noqa: E402
from a1111_proxy.engine import ip_adapter  # noqa: E402
from a1111_proxy.engine.image_prompts import ImagePromptUnit  # noqa: E402
from a1111_proxy.jobs import JobRepository  # noqa: E402
from a1111_proxy.wakeup import make_wakeup  # noqa: E402
from tests.fakes import tiny_ip_adapter  # noqa: E402
from tests.servers import ASYNC, serve  # noqa: E402
from worker.catalogue import CatalogueKeeper  # noqa: E402
from worker.execute import Timing  # noqa: E402
from worker.loop import Worker  # noqa: E402

if TYPE_CHECKING:
    from tests.engine.conftest import TinyModels

from tests.engine.conftest import cpu_backend  # noqa: E402
from tests.engine.results import pixels  # noqa: E402

pytestmark = [pytest.mark.anyio, pytest.mark.engine]
SMALL = {"steps": 4, "width": 64, "height": 64, "seed": 7, "prompt": "a cat", "cfg_scale": 5}
SD15 = {"override_settings": {"sd_model_checkpoint": "tiny15"}}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory, tiny_models: TinyModels) -> Iterator[Path]:
    """MODELS_DIR with a tiny SD1.5, a plain and a plus IP-Adapter for it in ControlNet/, and a
    CLIP vision encoder (one file) in clip_vision/."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = tmp_path_factory.mktemp("image-prompts")
    models = root / "models"
    sd15 = tiny_models.sd15(root / "configs" / "sd15")
    tiny_models.write_single_file(sd15, models / "Stable-diffusion" / "tiny15.safetensors")
    control = models / "ControlNet"
    tiny_ip_adapter.ip_adapter(sd15.unet, control / "ip-adapter_tiny.safetensors")
    tiny_ip_adapter.ip_adapter(sd15.unet, control / "ip-adapter-plus_tiny.safetensors", plus=True)
    tiny_ip_adapter.clip_vision(models / "clip_vision" / "CLIP-ViT-H-14-tiny.safetensors")
    yield root


@pytest.fixture
async def backend(models_dir: Path) -> AsyncIterator[DiffusersBackend]:
    made = cpu_backend(models_dir)
    yield made
    await made.aclose()


def picture(colour: str, shape: str = "ellipse") -> str:
    image = Image.new("RGB", (48, 40), colour)
    draw = ImageDraw.Draw(image)
    getattr(draw, shape)((6, 6, 40, 34), fill="white", outline="black")
    out = io.BytesIO()
    image.save(out, "PNG")
    return base64.b64encode(out.getvalue()).decode()


RED, BLUE = picture("red"), picture("blue", "rectangle")
UNIT = {"enabled": True, "module": "ip-adapter_clip_sd15", "model": "ip-adapter_tiny", "image": RED}


def prompted(*units: dict[str, Any]) -> dict[str, Any]:
    return {**SMALL, **SD15, "alwayson_scripts": {"controlnet": {"args": list(units)}}}


def differ(a: dict[str, Any], b: dict[str, Any]) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


async def test_an_image_prompt_changes_the_image_and_weight_0_gives_the_plain_one(
    backend: DiffusersBackend,
) -> None:
    plain = await backend.generate("txt2img", {**SMALL, **SD15})
    red = await backend.generate("txt2img", prompted(UNIT))
    blue = await backend.generate("txt2img", prompted({**UNIT, "image": BLUE}))
    off = await backend.generate("txt2img", prompted({**UNIT, "weight": 0}))
    assert differ(red, plain) > 10 and differ(red, blue) > 5
    assert differ(off, plain) == 0
    assert differ(await backend.generate("txt2img", {**SMALL, **SD15}), plain) == 0  # not kept
    info = red["info"]
    assert 'ControlNet 0: \\"Module: ip-adapter_clip_sd15, Model: ip-adapter_tiny' in info


async def test_the_step_range_is_honoured_and_an_empty_range_gives_the_plain_image(
    backend: DiffusersBackend,
) -> None:
    plain = await backend.generate("txt2img", {**SMALL, **SD15})
    full = await backend.generate("txt2img", prompted(UNIT))
    late = await backend.generate("txt2img", prompted({**UNIT, "guidance_start": 0.5}))
    none = await backend.generate("txt2img", prompted({**UNIT, "guidance_end": 0}))
    assert differ(none, plain) == 0
    assert differ(late, plain) > 0 and differ(late, full) > 0


async def test_a_plus_ip_adapter_steers_with_the_encoders_hidden_states(
    backend: DiffusersBackend,
) -> None:
    plain = await backend.generate("txt2img", {**SMALL, **SD15})
    plus = await backend.generate("txt2img", prompted({**UNIT, "model": "ip-adapter-plus_tiny"}))
    assert differ(plus, plain) > 10


async def test_several_images_in_one_unit_are_averaged_into_one_embedding(
    backend: DiffusersBackend, models_dir: Path
) -> None:
    red = await backend.generate("txt2img", prompted(UNIT))
    twice = await backend.generate("txt2img", prompted({**UNIT, "image": [RED, {"image": RED}]}))
    both = await backend.generate("txt2img", prompted({**UNIT, "image": [RED, BLUE]}))
    assert differ(twice, red) == 0 and differ(both, red) > 0
    library = ip_adapter.Library(models_dir / "models", torch.device("cpu"), torch.float32)
    unet = backend.models.get("tiny15").pipe.unet
    adapter = library.adapter("ip-adapter_tiny", unet)
    unit = ImagePromptUnit(0, "ip-adapter_clip_sd15", "ip-adapter_tiny")
    encoder = library.encoder(adapter, unit, "here")
    images = [Image.open(io.BytesIO(base64.b64decode(p))).convert("RGB") for p in (RED, BLUE)]
    mean = ip_adapter.embed(adapter, encoder, images)
    one, other = (ip_adapter.embed(adapter, encoder, [image]) for image in images)
    assert torch.allclose(mean[1], (one[1] + other[1]) / 2, atol=1e-5)
    assert torch.equal(mean[0], one[0])  # "no image" is the same for any image


async def test_a_missing_clip_vision_encoder_fails_saying_what_to_put_where(
    backend: DiffusersBackend, models_dir: Path
) -> None:
    folder = models_dir / "models" / "clip_vision"
    hidden = folder.with_name("clip_vision_hidden")
    folder.rename(hidden)
    try:
        with pytest.raises(BackendRejected) as refused:
            await backend.generate("txt2img", prompted(UNIT))
    finally:
        hidden.rename(folder)
    message = str(refused.value)
    assert "needs a CLIP vision encoder (ViT-H, 24 wide)" in message
    assert str(folder) in message and "image_encoder/model.safetensors" in message


async def test_an_unsupported_module_or_a_controlnet_as_ip_adapter_is_refused(
    backend: DiffusersBackend,
) -> None:
    with pytest.raises(BackendRejected, match=r"ip-adapter_face_id.*not available"):
        await backend.generate("txt2img", prompted({**UNIT, "module": "ip-adapter_face_id"}))
    with pytest.raises(BackendRejected, match="not found"):
        await backend.generate("txt2img", prompted({**UNIT, "model": "ip-adapter_nope"}))


async def until(api: httpx.AsyncClient, path: str, ready: Any) -> Any:
    async with asyncio.timeout(120):
        while True:
            body = (await api.get(path)).json()
            if ready(body):
                return body
            await asyncio.sleep(0.05)


async def test_an_image_prompt_runs_through_the_api_and_the_worker(
    backend: DiffusersBackend, sqlite_url: str, settings_for: Any, models_dir: Path
) -> None:
    db = Database(sqlite_url)
    settings = settings_for(
        database_url=sqlite_url, backend="diffusers", models_dir=str(models_dir / "models")
    )
    worker = Worker(
        repo=JobRepository(db, max_attempts=1, lease_seconds=30),
        backends=[backend],
        wakeup=make_wakeup(sqlite_url, 0.01),
        timing=Timing(progress_seconds=0.05, heartbeat_seconds=0.5),
        keeper=CatalogueKeeper(CatalogueStore(db), interval=300),
    )
    running = asyncio.create_task(worker.run())
    try:
        with serve(create_app(settings)) as url:
            async with httpx.AsyncClient(base_url=url, headers=ASYNC, timeout=60) as api:
                job = await api.post("/sdapi/v1/txt2img", json=prompted(UNIT))
                assert job.status_code == 202, job.text
                ran = await until(
                    api,
                    f"/sdapi/v1/jobs/{job.json()['id']}",
                    lambda j: j["status"] in ("completed", "error", "canceled"),
                )
                assert ran["status"] == "completed", ran["error"]
                direct = await backend.generate("txt2img", prompted(UNIT))
                assert differ(ran["result"], direct) == 0
    finally:
        worker.stop()
        await asyncio.wait_for(running, 60)
        await db.dispose()
