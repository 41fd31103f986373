"""Prompt editing, alternation and hires fix on the bundled engine, end to end with tiny
random-weight SD1.5 and SDXL models on the CPU, offline."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

torch = pytest.importorskip("torch", reason="the engine tests need the engine extra (torch)")
pytest.importorskip("diffusers", reason="the engine tests need the engine extra (diffusers)")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from a1111_proxy.backends.diffusers import DiffusersBackend  # noqa: E402
from a1111_proxy.engine import conditioning, text  # noqa: E402
from a1111_proxy.engine.config import EngineConfig  # noqa: E402

if TYPE_CHECKING:
    from tests.engine.conftest import TinyModels

from tests.engine.results import infotext, pixels  # noqa: E402

pytestmark = [pytest.mark.anyio, pytest.mark.engine]
SD15 = {"override_settings": {"sd_model_checkpoint": "tiny15"}}
SMALL = {"steps": 4, "width": 64, "height": 64, "seed": 7, **SD15}
XL = {"override_settings": {"sd_model_checkpoint": "tinyxl"}}
HIRES = {"enable_hr": True, "denoising_strength": 0.5, "hr_second_pass_steps": 2}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory, tiny_models: TinyModels) -> Iterator[Path]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = tmp_path_factory.mktemp("editing")
    checkpoints = root / "models" / "Stable-diffusion"
    tiny_models.write_single_file(
        tiny_models.sd15(root / "configs" / "sd15"), checkpoints / "tiny15.safetensors"
    )
    tiny_models.sdxl(checkpoints / "tinyxl")
    yield root


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"  # module-wide, so that one backend (models loaded once) serves every test


@pytest.fixture(scope="module")
async def backend(models_dir: Path) -> AsyncIterator[DiffusersBackend]:
    made = DiffusersBackend(
        EngineConfig(
            models_dir=models_dir / "models",
            device="cpu",
            skeletons={"sd15": models_dir / "configs" / "sd15"},
            preview_steps=0,
        )
    )
    yield made
    await made.aclose()


async def image(backend: DiffusersBackend, **body: Any) -> np.ndarray:
    result = await backend.generate("txt2img", {**SMALL, **body})
    return pixels(result)


async def test_an_edit_at_the_last_step_is_the_first_prompt_and_at_step_0_the_second(
    backend: DiffusersBackend,
) -> None:
    cat, dog = await image(backend, prompt="cat"), await image(backend, prompt="dog")
    assert np.array_equal(await image(backend, prompt="[cat:dog:1.0]"), cat)
    assert np.array_equal(await image(backend, prompt="[cat:dog:0]"), dog)
    halfway = await image(backend, prompt="[cat:dog:0.5]")
    alternating = await image(backend, prompt="[cat|dog]")
    for made in (halfway, alternating):
        assert not np.array_equal(made, cat) and not np.array_equal(made, dog)
    assert not np.array_equal(halfway, alternating)


def test_each_step_gets_the_text_a1111_schedules_for_it(backend: DiffusersBackend) -> None:
    pipe = backend.models.get("tiny15").pipe
    long = ", ".join(["a very detailed cat"] * 8)  # two 75-token chunks

    def plain(prompt: str, negative: str = "") -> text.Embeds:
        return text.encode(pipe, prompt, negative, clip_skip=1, sdxl=False)

    edited = conditioning.encode(pipe, f"[{long}:dog:2]", "", steps=4, clip_skip=1, sdxl=False)
    assert edited.scheduled
    for step, expected in [(0, plain(long)), (2, plain(long)), (3, plain("dog"))]:
        got = edited.at(step)  # A1111: entry i while the 0-based step <= its end_at_step
        assert torch.equal(got.cond, expected.cond) and torch.equal(got.uncond, expected.uncond)
    assert edited.at(0).uncond.shape[1] == 154 and edited.at(3).uncond.shape[1] == 77
    for prompt in ["a (cat:1.2) [dog] \\[x:3\\]", "a BREAK b", "[cat:dog:1.0]"]:
        fixed = conditioning.encode(pipe, prompt, "blurry", steps=4, clip_skip=1, sdxl=False)
        expected = plain(prompt.replace("[cat:dog:1.0]", "cat"), "blurry")
        assert not fixed.scheduled and torch.equal(fixed.first.cond, expected.cond)


async def test_the_negative_prompt_is_edited_per_step_too(backend: DiffusersBackend) -> None:
    plain = await image(backend, prompt="cat", negative_prompt="blurry")
    removed = await image(backend, prompt="cat", negative_prompt="[blurry::0.5]")
    assert not np.array_equal(plain, removed)
    kept = await image(backend, prompt="cat", negative_prompt="[blurry::1.0]")
    assert np.array_equal(kept, plain)


async def test_a_longer_prompt_in_one_edit_step_still_runs(backend: DiffusersBackend) -> None:
    long = ", ".join(["a very detailed cat"] * 8)  # over 75 tokens: two chunks
    made = await image(backend, prompt=f"[{long}:dog:0.5]", negative_prompt="[x|y]")
    assert made.shape == (64, 64, 3)


async def test_prompt_editing_on_sdxl_switches_the_pooled_embedding_too(
    backend: DiffusersBackend,
) -> None:
    cat = await image(backend, prompt="cat", **XL)
    assert np.array_equal(await image(backend, prompt="[cat:dog:1.0]", **XL), cat)
    edited = await image(backend, prompt="[cat:dog:0.5]", negative_prompt="[ugly|bad]", **XL)
    assert edited.shape == (64, 64, 3) and not np.array_equal(edited, cat)


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
async def test_hires_fix_returns_images_at_the_upscaled_size_with_its_infotext(
    backend: DiffusersBackend, upscaler: str
) -> None:
    body = {"prompt": "a cat", "hr_upscaler": upscaler, "batch_size": 2, **HIRES}
    result = await backend.generate("txt2img", {**SMALL, **body})
    info = json.loads(result["info"])
    assert len(result["images"]) == 2 and info["width"] == 64  # A1111 reports the first pass
    for n in range(2):
        png = Image.open(io.BytesIO(base64.b64decode(result["images"][n])))
        assert png.size == (128, 128) and png.text["parameters"] == info["infotexts"][n]
    assert (
        "Size: 64x64, Model hash: " in info["infotexts"][0]
        and f"Denoising strength: 0.5, Hires upscale: 2.0, Hires steps: 2, "
        f"Hires upscaler: {upscaler}, Version: "
        in info["infotexts"][0]
    )
    plain = await image(backend, prompt="a cat")
    lowres = np.asarray(Image.fromarray(pixels(result).astype(np.uint8)).resize((64, 64)))
    assert not np.array_equal(lowres, plain)  # the second pass changed it


async def test_hires_resize_crops_to_the_size_asked_for_on_sdxl(
    backend: DiffusersBackend,
) -> None:
    body = {"prompt": "a [cat:dog:0.5]", "hr_resize_x": 128, "hr_resize_y": 96, **HIRES, **XL}
    result = await backend.generate("txt2img", {**SMALL, **body})
    assert pixels(result).shape == (96, 128, 3)
    assert "Hires resize: 128x96" in infotext(result)
    assert "Hires upscaler" not in infotext(result)  # not sent, not written (as A1111)


async def test_hires_second_pass_takes_its_own_prompt_sampler_and_upscaler(
    backend: DiffusersBackend,
) -> None:
    base = {"prompt": "a cat", "hr_upscaler": "Latent (nearest-exact)", **HIRES}
    same = await backend.generate("txt2img", {**SMALL, **base})
    other = await backend.generate(
        "txt2img",
        {
            **SMALL,
            **base,
            "hr_prompt": "a [dog|cow]",
            "hr_sampler_name": "DPM++ 2M",
            "hr_scale": 1.5,
        },
    )
    assert pixels(same).shape == (128, 128, 3) and pixels(other).shape == (96, 96, 3)
    text = infotext(other)
    assert (  # A1111 names the schedule DPM++ 2M runs, as Euler runs none
        "Hires sampler: DPM++ 2M, Hires prompt: a [dog|cow], Hires schedule type: Karras, "
        "Hires upscale: 1.5" in text
    )


async def test_hires_with_no_denoising_returns_the_first_pass_upscaled(
    backend: DiffusersBackend,
) -> None:
    plain = await image(backend, prompt="a cat")
    body = {**SMALL, "prompt": "a cat", **HIRES, "denoising_strength": 0.0}
    lanczos = await backend.generate("txt2img", {**body, "hr_upscaler": "Lanczos"})
    upscaled = Image.fromarray(plain.astype(np.uint8)).resize((128, 128), Image.Resampling.LANCZOS)
    assert np.array_equal(pixels(lanczos), np.asarray(upscaled, dtype=np.int16))
    latent = await backend.generate("txt2img", {**body, "hr_upscaler": "Latent (bicubic)"})
    assert pixels(latent).shape == (128, 128, 3)


async def test_progress_counts_both_passes_and_interrupt_stops_the_second(
    backend: DiffusersBackend,
) -> None:
    body = {**SMALL, "prompt": "a cat", **HIRES, "steps": 2, "hr_second_pass_steps": 400}
    run = asyncio.create_task(backend.generate("txt2img", body))
    while (await backend.progress()).progress <= 0.5:  # past the first pass: half of the jobs
        assert not run.done(), run
        await asyncio.sleep(0.01)
    await backend.interrupt()
    result = await asyncio.wait_for(run, 60)
    assert pixels(result).shape == (128, 128, 3)  # what the second pass had, upscaled size


async def test_cancel_during_the_second_pass_stops_the_job_and_frees_the_slot(
    backend: DiffusersBackend,
) -> None:
    body = {**SMALL, "prompt": "a cat", **HIRES, "steps": 2, "hr_second_pass_steps": 400}
    run = asyncio.create_task(backend.generate("txt2img", body))
    while (await backend.progress()).progress <= 0.5:
        assert not run.done(), run
        await asyncio.sleep(0.01)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(run, 60)
    assert (await image(backend, prompt="a cat")).shape == (64, 64, 3)
