"""Cross-request batching of hires fix and ControlNet jobs on the tiny models, on the CPU: jobs
with the same hires settings run both passes as one batch (each with its own hires prompts and
seeds), jobs with the same ControlNet units run as one batch with their own control images, and
each gets the images it gets alone; a job cancelled in such a batch leaves the others.

That they ran as one batch is seen in the models: the UNet (and ControlNet) is called with every
job's rows at once, more than any job alone has."""

from __future__ import annotations

import base64
import io
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

pytest.importorskip("torch", reason="the engine tests need the engine extra (torch)")
pytest.importorskip("diffusers", reason="the engine tests need the engine extra (diffusers)")

import numpy as np
from PIL import Image, ImageDraw

from a1111_proxy.backends.diffusers import DiffusersBackend
from a1111_proxy.engine.batch import Member, generate_batch
from a1111_proxy.engine.compat import batch_key
from a1111_proxy.engine.params import Params
from a1111_proxy.engine.pipeline import RunState, generate
from tests.engine.results import pixels
from tests.engine.test_engine import make_backend
from tests.engine.test_engine_batching import assert_same_images, run_batch

if TYPE_CHECKING:
    from tests.engine.conftest import TinyModels

pytestmark = [pytest.mark.anyio, pytest.mark.engine]
SHARED = {"steps": 3, "width": 64, "height": 64, "sampler_name": "Euler a", "subseed": 11}
HIRES = {
    "enable_hr": True,
    "hr_scale": 2,
    "hr_upscaler": "Latent",
    "hr_second_pass_steps": 2,
    "denoising_strength": 0.5,
}
# Three jobs, four rows: each alone runs at most 2 rows (4 with CFG), the batch 4 (8 with CFG).
JOBS: list[dict[str, Any]] = [
    {"prompt": "a cat", "seed": 7, **SHARED},
    {
        "prompt": "a dog in a hat",
        "negative_prompt": "blur",
        "hr_prompt": "a dog in a hat, sharp",
        "seed": 100,
        "batch_size": 2,
        **SHARED,
    },
    {"prompt": "x", "seed": 5, "subseed_strength": 0.3, "hr_negative_prompt": "ugly", **SHARED},
]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory, tiny_models: TinyModels) -> Iterator[Path]:
    """MODELS_DIR with the tiny SD1.5 checkpoint and two ControlNets made for it, and the tiny
    SDXL checkpoint with one."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = tmp_path_factory.mktemp("batching-networks")
    models = root / "models"
    sd15 = tiny_models.sd15(root / "configs" / "sd15")
    tiny_models.write_single_file(sd15, models / "Stable-diffusion" / "tiny15.safetensors")
    tiny_models.controlnet(sd15, models / "ControlNet" / "tiny_scribble", seed=1)
    tiny_models.controlnet(sd15, models / "ControlNet" / "tiny_canny", seed=2)
    sdxl = tiny_models.sdxl(root / "configs" / "sdxl")
    tiny_models.write_single_file(sdxl, models / "Stable-diffusion" / "xl.safetensors")
    tiny_models.controlnet(sdxl, models / "ControlNet" / "xl_canny", seed=3)
    yield root


@pytest.fixture
async def backend(models_dir: Path) -> AsyncIterator[DiffusersBackend]:
    made = make_backend(models_dir, max_batch=4)
    yield made
    await made.aclose()


class Rows:
    """The row counts (CFG's halves included) and latent sizes each model was called with."""

    def __init__(
        self, backend: DiffusersBackend, monkeypatch: pytest.MonkeyPatch, checkpoint: str = "tiny15"
    ) -> None:
        from diffusers import ControlNetModel

        self.unet: list[tuple[int, int]] = []
        self.controlnet: list[tuple[int, int]] = []
        unet = backend.models.get(checkpoint).pipe.unet
        self.hook = unet.register_forward_pre_hook(
            lambda module, args: self.unet.append((args[0].shape[0], args[0].shape[-1]))
        )
        forward = ControlNetModel.forward

        def counted(model: Any, sample: Any, *args: Any, **kwargs: Any) -> Any:
            self.controlnet.append((sample.shape[0], sample.shape[-1]))
            return forward(model, sample, *args, **kwargs)

        monkeypatch.setattr(ControlNetModel, "forward", counted)

    def close(self) -> None:
        self.hook.remove()


async def alone_then_batched(
    backend: DiffusersBackend,
    monkeypatch: pytest.MonkeyPatch,
    jobs: list[dict[str, Any]],
    checkpoint: str = "tiny15",
) -> tuple[list[Any], list[Any], Rows]:
    """Each txt2img job's answer run alone, then all of theirs run as one batch, with the rows
    the models were called with in the batch."""
    alone = [await backend.generate("txt2img", body) for body in jobs]
    rows = Rows(backend, monkeypatch, checkpoint)
    try:
        batched = await run_batch(backend, jobs)
    finally:
        rows.close()
    return alone, batched, rows


def sketch(shape: str) -> str:
    image = Image.new("RGB", (96, 64), "white")  # not the job's size: resized by the unit
    draw = ImageDraw.Draw(image)
    if shape == "ellipse":
        draw.ellipse((20, 8, 76, 56), outline="black", width=3)
    elif shape == "box":
        draw.rectangle((10, 10, 60, 50), outline="black", width=3)
    else:
        draw.line((0, 0, 96, 64), fill="black", width=4)
    out = io.BytesIO()
    image.save(out, "PNG")
    return base64.b64encode(out.getvalue()).decode()


SCRIBBLE = {"enabled": True, "module": "invert", "model": "tiny_scribble"}
CANNY = {
    "enabled": True,
    "module": "canny",
    "model": "tiny_canny",
    "threshold_a": 50,
    "threshold_b": 100,
    "weight": 0.8,
    "control_mode": "ControlNet is more important",
}


def with_units(body: dict[str, Any], image: str, *units: dict[str, Any]) -> dict[str, Any]:
    args = [{**unit, "image": image} for unit in units]
    return {**body, "alwayson_scripts": {"ControlNet": {"args": args}}}


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
async def test_hires_jobs_run_both_passes_as_one_batch_each_with_the_images_it_gets_alone(
    backend: DiffusersBackend, monkeypatch: pytest.MonkeyPatch, upscaler: str
) -> None:
    jobs = [{**body, **HIRES, "hr_upscaler": upscaler} for body in JOBS]
    assert len({batch_key("txt2img", body, "tiny15") for body in jobs}) == 1
    alone, batched, rows = await alone_then_batched(backend, monkeypatch, jobs)
    # 3 first-pass steps at 8x8 latents, then 2 second-pass steps at 16x16, all 8 rows at once
    assert rows.unet == [(8, 8)] * 3 + [(8, 16)] * 2
    for one, other in zip(batched, alone, strict=True):
        assert one["images"] and len(one["images"]) == len(other["images"])
        assert_same_images(one, other)


@pytest.mark.parametrize(
    ("units", "hires"),
    [((SCRIBBLE,), False), ((SCRIBBLE, CANNY), False), ((SCRIBBLE,), True)],
    ids=["one unit", "two units", "one unit with hires fix"],
)
async def test_controlnet_jobs_run_as_one_batch_each_steered_by_its_own_control_image(
    backend: DiffusersBackend,
    monkeypatch: pytest.MonkeyPatch,
    units: tuple[dict[str, Any], ...],
    hires: bool,
) -> None:
    shapes = ["ellipse", "box", "line"]
    jobs = [
        with_units({**body, **(HIRES if hires else {})}, sketch(shape), *units)
        for body, shape in zip(JOBS, shapes, strict=True)
    ]
    assert len({batch_key("txt2img", body, "tiny15") for body in jobs}) == 1
    alone, batched, rows = await alone_then_batched(backend, monkeypatch, jobs)
    steps = [(8, 8)] * 3 + ([(8, 16)] * 2 if hires else [])
    assert rows.unet == steps and rows.controlnet == [s for s in steps for _ in units]
    for one, other in zip(batched, alone, strict=True):
        # its images, then its detected maps (compared too: each job's own control images)
        assert len(one["images"]) == len(other["images"])
        assert_same_images(one, other)
    # Each job's own control image steers it: another job's sketch gives another image.
    swapped = await backend.generate("txt2img", with_units(jobs[0], sketch("box"), *units))
    assert np.abs(pixels(swapped) - pixels(alone[0])).max() > 10


async def test_img2img_controlnet_jobs_batch_each_steered_by_its_own_init_image(
    backend: DiffusersBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A unit without an image steers with the job's init image (the extension's img2img)."""
    unit = {**SCRIBBLE, "image": None}
    bodies = [
        {**body, "init_images": [sketch(shape)], "denoising_strength": 0.8}
        for body, shape in zip(JOBS, ["ellipse", "box", "line"], strict=True)
    ]
    jobs = [{**b, "alwayson_scripts": {"ControlNet": {"args": [unit]}}} for b in bodies]
    assert len({batch_key("img2img", body, "tiny15") for body in jobs}) == 1
    alone = [await backend.generate("img2img", body) for body in jobs]
    rows = Rows(backend, monkeypatch)
    try:
        batch = backend.batch([("img2img", body) for body in jobs])
        runners = zip(batch.runners, jobs, strict=True)
        batched = [await runner.generate("img2img", body) for runner, body in runners]
    finally:
        rows.close()
    # A1111 runs int(0.8 * 3) + 1 steps of img2img
    assert rows.unet == rows.controlnet == [(8, 8)] * 3
    for one, other in zip(batched, alone, strict=True):
        assert_same_images(one, other)


async def test_sdxl_hires_controlnet_jobs_batch_with_their_pooled_prompts_and_control_images(
    backend: DiffusersBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    xl = {"override_settings": {"sd_model_checkpoint": "xl"}}
    unit = {**CANNY, "model": "xl_canny"}
    jobs = [
        with_units({**body, **xl, **HIRES}, sketch(shape), unit)
        for body, shape in zip(JOBS[:2], ["ellipse", "box"], strict=True)
    ]
    alone, batched, rows = await alone_then_batched(backend, monkeypatch, jobs, "xl")
    assert rows.unet == rows.controlnet == [(6, 8)] * 3 + [(6, 16)] * 2  # 3 rows, CFG doubled
    for one, other in zip(batched, alone, strict=True):
        assert_same_images(one, other)


def members_of(params: list[Params], answers: dict[int, Any]) -> list[Member]:
    members = []
    for n, p in enumerate(params):

        def done(value: Any, n: int = n) -> None:
            answers[n] = value

        members.append(Member(p, RunState(), done))
    return members


@pytest.mark.parametrize("which", ["hires fix", "ControlNet"])
def test_a_job_cancelled_in_a_hires_or_controlnet_batch_leaves_the_others_as_alone(
    models_dir: Path, monkeypatch: pytest.MonkeyPatch, which: str
) -> None:
    backend = make_backend(models_dir, max_batch=4)
    models, config = backend.models, backend.config
    bodies = [{**body, **HIRES} for body in JOBS]
    if which == "ControlNet":
        shapes = ["ellipse", "box", "line"]
        bodies = [with_units(b, sketch(s), SCRIBBLE) for b, s in zip(JOBS, shapes, strict=True)]
    params = [Params.from_payload("txt2img", body) for body in bodies]
    alone = {n: generate(models, config, p, RunState()) for n, p in enumerate(params)}
    answers: dict[int, Any] = {}
    members = members_of(params, answers)
    members[1].state.cancel.set()  # the job of two rows: it ends at the first step
    rows = Rows(backend, monkeypatch)
    try:
        generate_batch(models, config, members)
    finally:
        rows.close()
    # Its rows stay in the first pass's batch; the second pass runs the others' rows only.
    assert rows.unet == [(8, 8)] * 3 + ([(4, 16)] * 2 if which == "hires fix" else [])
    assert "Canceled" in type(answers[1]).__name__
    for n in (0, 2):
        assert_same_images(answers[n], alone[n])
