"""The `noise_mask` extension on the bundled engine (tiny random SD1.5, CPU, offline), and its
validation in the API (with the engine, and refused with an A1111 backend)."""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

torch = pytest.importorskip("torch", reason="the engine tests need the engine extra (torch)")
pytest.importorskip("diffusers", reason="the engine tests need the engine extra (diffusers)")

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from a1111_proxy.app import create_app  # noqa: E402
from a1111_proxy.backends.diffusers import DiffusersBackend  # noqa: E402
from a1111_proxy.engine.params import problems  # noqa: E402
from tests.servers import ASYNC, serve  # noqa: E402

if TYPE_CHECKING:
    from tests.engine.conftest import TinyModels

from tests.engine.conftest import cpu_backend  # noqa: E402

pytestmark = [pytest.mark.anyio, pytest.mark.engine]
SIZE = 128
BODY = {"steps": 8, "width": SIZE, "height": SIZE, "seed": 11, "prompt": "a cat", "cfg_scale": 5}
BODY |= {"override_settings": {"sd_model_checkpoint": "tiny15"}}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory, tiny_models: TinyModels) -> Iterator[Path]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = tmp_path_factory.mktemp("noise-mask")
    sd15 = tiny_models.sd15(root / "configs" / "sd15")
    tiny_models.write_single_file(sd15, root / "models" / "Stable-diffusion" / "tiny15.safetensors")
    yield root


@pytest.fixture
async def backend(models_dir: Path) -> AsyncIterator[DiffusersBackend]:
    made = cpu_backend(models_dir)
    yield made
    await made.aclose()


def left_half_mask() -> str:
    """White on the left half (re-imagined), black on the right (kept)."""
    image = Image.new("L", (SIZE, SIZE), 0)
    image.paste(255, (0, 0, SIZE // 2, SIZE))
    out = io.BytesIO()
    image.save(out, "PNG")
    return base64.b64encode(out.getvalue()).decode()


MASK = {"mask": left_half_mask(), "strength": 1.0, "start": 0.0, "end": 0.5}


def pixels(result: dict[str, Any]) -> np.ndarray:
    image = Image.open(io.BytesIO(base64.b64decode(result["images"][0])))
    return np.asarray(image.convert("RGB"), dtype=np.float64)


async def test_the_masked_region_is_re_imagined_and_the_rest_stays_close(
    backend: DiffusersBackend,
) -> None:
    plain = pixels(await backend.generate("txt2img", BODY))
    masked = await backend.generate("txt2img", {**BODY, "noise_mask": MASK})
    change = np.abs(pixels(masked) - plain).mean(axis=(0, 2))  # per column
    inside, outside = change[: SIZE // 2 - 16].mean(), change[SIZE // 2 + 16 :].mean()
    assert inside > 10 and inside > 3 * outside, (inside, outside)  # UNet attention mixes a bit
    written = json.loads(masked["info"])["infotexts"][0]
    assert 'Noise mask: "strength 1.0, steps 0%-50%"' in written  # quoted: it has a comma


async def test_the_same_seed_gives_the_same_image_and_another_seed_another(
    backend: DiffusersBackend,
) -> None:
    first = pixels(await backend.generate("txt2img", {**BODY, "noise_mask": MASK}))
    again = pixels(await backend.generate("txt2img", {**BODY, "noise_mask": MASK}))
    other = await backend.generate("txt2img", {**BODY, "seed": 12, "noise_mask": MASK})
    assert np.array_equal(first, again)
    assert not np.array_equal(first, pixels(other))


async def test_strength_0_or_an_empty_range_gives_the_image_without_a_mask(
    backend: DiffusersBackend,
) -> None:
    plain = pixels(await backend.generate("txt2img", BODY))
    weak = await backend.generate("txt2img", {**BODY, "noise_mask": {**MASK, "strength": 0}})
    empty = {**MASK, "start": 0.5, "end": 0.5}
    none = await backend.generate("txt2img", {**BODY, "noise_mask": empty})
    assert np.array_equal(pixels(weak), plain) and np.array_equal(pixels(none), plain)


async def test_img2img_takes_a_noise_mask_too(backend: DiffusersBackend) -> None:
    start = (await backend.generate("txt2img", BODY))["images"][0]
    body = {**BODY, "init_images": [start], "denoising_strength": 0.8}
    plain = pixels(await backend.generate("img2img", body))
    masked = pixels(await backend.generate("img2img", {**body, "noise_mask": MASK}))
    assert np.abs(masked - plain)[:, : SIZE // 2 - 16].mean() > 5


@pytest.mark.parametrize(
    ("noise_mask", "where", "reason"),
    [
        ({"strength": 1}, "noise_mask.mask", "Field required"),
        ({**MASK, "strength": 1.5}, "noise_mask.strength", "less than or equal to 1"),
        ({**MASK, "start": 0.6, "end": 0.2}, "noise_mask", "must not be after end"),
        ({**MASK, "stregth": 1}, "noise_mask.stregth", "Extra inputs are not permitted"),
        ("white", "noise_mask", "valid dictionary"),
    ],
)
def test_a_bad_noise_mask_is_refused_naming_the_field_and_the_reason(
    noise_mask: Any, where: str, reason: str
) -> None:
    (problem,) = problems("txt2img", {**BODY, "noise_mask": noise_mask})
    assert problem.startswith(where) and reason in problem


def test_the_api_answers_422_for_a_bad_noise_mask_and_for_one_sent_to_an_a1111_backend(
    sqlite_url: str, settings_for: Callable[..., Any]
) -> None:
    engine = settings_for(database_url=sqlite_url, backend="diffusers")
    with serve(create_app(engine)) as url, httpx.Client(base_url=url, headers=ASYNC) as api:
        bad = api.post("/sdapi/v1/txt2img", json={**BODY, "noise_mask": {**MASK, "end": 2}})
        assert bad.status_code == 422
        assert bad.json()["detail"][0]["loc"] == ["body", "noise_mask", "end"]
        good = api.post("/sdapi/v1/txt2img", json={**BODY, "noise_mask": MASK})
        assert good.status_code == 202, good.text
    a1111 = settings_for(database_url=sqlite_url, backend="a1111")
    with serve(create_app(a1111)) as url, httpx.Client(base_url=url, headers=ASYNC) as api:
        refused = api.post("/sdapi/v1/txt2img", json={**BODY, "noise_mask": MASK})
        assert refused.status_code == 422
        (detail,) = refused.json()["detail"]
        assert detail["loc"] == ["body", "noise_mask"] and "BACKEND=diffusers" in detail["msg"]
        assert api.post("/sdapi/v1/txt2img", json=BODY).status_code == 202
