"""The bundled diffusers engine end to end on tiny random-weight models, on the CPU, offline:
the real diffusers code paths (single-file loading, txt2img, img2img, inpainting, SDXL), A1111's
response shapes and seeds, progress, interrupt, and the real Worker on a real database."""

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

from a1111_proxy.backends import BackendRejected  # noqa: E402
from a1111_proxy.backends.diffusers import DiffusersBackend  # noqa: E402
from a1111_proxy.db.engine import Database  # noqa: E402
from a1111_proxy.engine.config import EngineConfig  # noqa: E402
from a1111_proxy.jobs import JobRepository, NewJob  # noqa: E402
from a1111_proxy.wakeup import make_wakeup  # noqa: E402
from tests.fakes import tiny_sd  # noqa: E402
from worker.execute import Timing  # noqa: E402
from worker.loop import Worker  # noqa: E402

if TYPE_CHECKING:
    from tests.engine.conftest import TinyModels

pytestmark = [pytest.mark.anyio, pytest.mark.engine]
SMALL = {"steps": 4, "width": 64, "height": 64, "seed": 7}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory, tiny_models: TinyModels) -> Iterator[Path]:
    """MODELS_DIR in A1111's layout: SD1.5 and SDXL single-file checkpoints, an SDXL diffusers
    folder, an SD1.5 inpainting folder and a pickled .ckpt; plus the tiny models' config folders
    (the stand-ins for the shipped real-size skeletons)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = tmp_path_factory.mktemp("engine")
    checkpoints = root / "models" / "Stable-diffusion"
    source = tiny_models.sd15(root / "configs" / "sd15")
    tiny_models.write_single_file(source, checkpoints / "tiny15.safetensors")
    tiny_models.write_single_file(
        tiny_models.sdxl(root / "configs" / "sdxl"), checkpoints / "xl1.safetensors"
    )
    tiny_models.sdxl(checkpoints / "tinyxl")
    tiny_models.sd15(checkpoints / "x-inpaint15", inpaint=True)
    (checkpoints / "zz-old.ckpt").write_bytes(b"\x80\x04pickle")
    yield root


def make_backend(models_dir: Path, **options: Any) -> DiffusersBackend:
    config = EngineConfig(
        models_dir=options.pop("folder", models_dir / "models"),
        device="cpu",
        skeletons={kind: models_dir / "configs" / kind for kind in ("sd15", "sdxl")},
        **options,
    )
    return DiffusersBackend(config)


@pytest.fixture
async def backend(models_dir: Path) -> AsyncIterator[DiffusersBackend]:
    made = make_backend(models_dir)
    yield made
    await made.aclose()


def decode(result: dict[str, Any], n: int = 0) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(result["images"][n])))


def pixels(result: dict[str, Any], n: int = 0) -> np.ndarray:
    return np.asarray(decode(result, n).convert("RGB"), dtype=np.int16)


def png_b64(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, "PNG")
    return base64.b64encode(out.getvalue()).decode()


async def test_txt2img_returns_a1111s_response_with_the_infotext_in_each_png(
    backend: DiffusersBackend,
) -> None:
    result = await backend.generate(
        "txt2img", {"prompt": "a (cat:1.2)", "negative_prompt": "dog", "batch_size": 2, **SMALL}
    )
    assert list(result) == ["images", "parameters", "info"] and isinstance(result["info"], str)
    info = json.loads(result["info"])
    assert info["seed"] == 7 and info["all_seeds"] == [7, 8] and len(info["infotexts"]) == 2
    assert info["sd_model_name"] == "tiny15" and len(info["sd_model_hash"]) == 10
    for n in range(2):
        image = decode(result, n)
        assert image.format == "PNG" and image.size == (64, 64)
        assert image.text["parameters"] == info["infotexts"][n]
    assert info["infotexts"][1].startswith(
        "a (cat:1.2)\nNegative prompt: dog\nSteps: 4, Sampler: Euler,"
    )
    assert "Seed: 8, Size: 64x64, Model hash: " in info["infotexts"][1]
    assert (
        result["parameters"]["prompt"] == "a (cat:1.2)"
        and result["parameters"]["sampler_index"] == "Euler"
    )


async def test_the_same_seed_gives_the_same_image_and_another_seed_another(
    backend: DiffusersBackend,
) -> None:
    body = {"prompt": "a cat", "sampler_name": "Euler a", **SMALL}
    first, again = [await backend.generate("txt2img", body) for _ in range(2)]
    other = await backend.generate("txt2img", {**body, "seed": 8})
    assert np.array_equal(pixels(first), pixels(again))
    assert not np.array_equal(pixels(first), pixels(other))


async def test_each_image_gets_seed_plus_its_index_across_batch_size_and_count(
    backend: DiffusersBackend,
) -> None:
    batch = await backend.generate(
        "txt2img",
        {"prompt": "a cat", "batch_size": 2, "n_iter": 2, "sampler_name": "Euler a", **SMALL},
    )
    assert json.loads(batch["info"])["all_seeds"] == [7, 8, 9, 10] and len(batch["images"]) == 4
    alone = await backend.generate(
        "txt2img", {"prompt": "a cat", "sampler_name": "Euler a", **{**SMALL, "seed": 10}}
    )
    # the fourth image is the one seed 10 gives alone (batched maths may differ in the last bit)
    assert np.abs(pixels(batch, 3) - pixels(alone)).max() <= 2
    assert not np.array_equal(pixels(batch, 0), pixels(batch, 3))


async def test_a_variation_seed_keeps_the_seed_and_blends_in_the_subseed(
    backend: DiffusersBackend,
) -> None:
    plain = await backend.generate("txt2img", {"prompt": "a cat", **SMALL})
    varied = await backend.generate(
        "txt2img",
        {"prompt": "a cat", "subseed": 99, "subseed_strength": 0.5, "batch_size": 2, **SMALL},
    )
    info = json.loads(varied["info"])
    assert info["all_seeds"] == [7, 7] and info["all_subseeds"] == [99, 100]
    assert "Variation seed: 99, Variation seed strength: 0.5" in info["infotexts"][0]
    assert not np.array_equal(pixels(plain), pixels(varied))


async def test_every_sampler_and_a_long_weighted_prompt_run(backend: DiffusersBackend) -> None:
    prompt = "a ((very)) [detailed] (photo:1.3) of a cat, " * 12 + "BREAK on a hill"
    for sampler in [
        "DPM++ 2M Karras",
        "DPM++ SDE",
        "DPM++ 2M SDE",
        "LMS",
        "Heun",
        "DPM2 a",
        "DDIM",
        "PLMS",
        "UniPC",
        "Euler a",
    ]:
        result = await backend.generate(
            "txt2img", {"prompt": prompt, "sampler_name": sampler, **{**SMALL, "steps": 3}}
        )
        assert decode(result).size == (64, 64), sampler
        assert (
            f"Sampler: {sampler.replace(' Karras', '')},"
            in json.loads(result["info"])["infotexts"][0]
        )


async def test_clip_skip_changes_the_image_and_is_written_in_the_infotext(
    backend: DiffusersBackend,
) -> None:
    one = await backend.generate("txt2img", {"prompt": "a cat", **SMALL})
    two = await backend.generate(
        "txt2img",
        {"prompt": "a cat", **SMALL, "override_settings": {"CLIP_stop_at_last_layers": 2}},
    )
    assert "Clip skip: 2" in json.loads(two["info"])["infotexts"][0]
    assert not np.array_equal(pixels(one), pixels(two))


async def test_img2img_keeps_the_size_asked_for_and_reports_the_strength(
    backend: DiffusersBackend,
) -> None:
    init = png_b64(Image.new("RGB", (100, 80), (200, 30, 30)))
    result = await backend.generate(
        "img2img",
        {
            "prompt": "a cat",
            "init_images": [init],
            "denoising_strength": 0.5,
            "resize_mode": 1,
            **SMALL,
            "width": 72,
        },
    )
    info = json.loads(result["info"])
    assert decode(result).size == (72, 64) and info["denoising_strength"] == 0.5
    assert "Denoising strength: 0.5" in info["infotexts"][0]
    assert result["parameters"]["init_images"] is None
    again = await backend.generate(
        "img2img",
        {
            "prompt": "a cat",
            "init_images": [init],
            "denoising_strength": 0.5,
            "resize_mode": 1,
            **SMALL,
            "width": 72,
        },
    )
    assert np.array_equal(pixels(result), pixels(again))


async def test_inpainting_changes_only_the_masked_area(backend: DiffusersBackend) -> None:
    original = Image.new("RGB", (64, 64), (20, 160, 60))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (24, 24, 40, 40))
    for full_res in (False, True):
        result = await backend.generate(
            "img2img",
            {
                "prompt": "a cat",
                "init_images": [png_b64(original)],
                "mask": png_b64(mask),
                "mask_blur": 2,
                "inpaint_full_res": full_res,
                "inpaint_full_res_padding": 4,
                "denoising_strength": 0.9,
                **SMALL,
            },
        )
        out = pixels(result)
        assert out.shape == (64, 64, 3)
        assert (out[:16] == (20, 160, 60)).all() and (out[:, 48:] == (20, 160, 60)).all()
        assert (out[28:36, 28:36] != (20, 160, 60)).any()
        assert "Mask blur: 2" in json.loads(result["info"])["infotexts"][0]


async def test_an_inpainting_checkpoint_runs_txt2img_and_inpainting(
    backend: DiffusersBackend,
) -> None:
    choose = {"override_settings": {"sd_model_checkpoint": "x-inpaint15"}}
    result = await backend.generate("txt2img", {"prompt": "a cat", **SMALL, **choose})
    assert decode(result).size == (64, 64)
    assert json.loads(result["info"])["is_using_inpainting_conditioning"] is True
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    painted = await backend.generate(
        "img2img",
        {
            "prompt": "a cat",
            "init_images": [result["images"][0]],
            "mask": png_b64(mask),
            "inpaint_full_res": False,
            "mask_blur": 0,
            **SMALL,
            **choose,
        },
    )
    assert np.array_equal(pixels(painted)[:, 40:], pixels(result)[:, 40:])


@pytest.mark.parametrize("model", ["tinyxl", "xl1"])
async def test_an_sdxl_model_generates_at_the_size_asked_for(
    backend: DiffusersBackend, model: str
) -> None:
    body = {
        "prompt": "a cat",
        "negative_prompt": "a dog",
        **SMALL,
        "height": 96,
        "sampler_name": "DPM++ 2M",
        "scheduler": "Karras",
        "override_settings": {"sd_model_checkpoint": model},
    }
    result = await backend.generate("txt2img", body)
    info = json.loads(result["info"])
    assert decode(result).size == (64, 96) and info["sd_model_name"] == model
    assert f"Model: {model}" in info["infotexts"][0]
    assert (info["sd_model_hash"] is None) == (model == "tinyxl")  # folders have no file hash
    init = await backend.generate("img2img", {**body, "init_images": [result["images"][0]]})
    assert decode(init).size == (64, 96)


async def test_a_single_file_checkpoint_loads_with_exactly_its_weights(
    backend: DiffusersBackend,
    models_dir: Path,
) -> None:
    # the same seed builds the same weights again
    for name, architecture, build, parts in [
        ("tiny15.safetensors", "sd15", tiny_sd.sd15, ("unet", "vae", "text_encoder")),
        (
            "xl1.safetensors",
            "sdxl",
            tiny_sd.sdxl,
            ("unet", "vae", "text_encoder", "text_encoder_2"),
        ),
    ]:
        loaded = backend.models.get(name)
        assert not loaded.checkpoint.folder and loaded.architecture == architecture
        source = build(models_dir / "again" / architecture)
        for part in parts:
            mine = getattr(loaded.pipe, part).state_dict()
            theirs = getattr(source, part).state_dict()
            assert mine.keys() == theirs.keys()
            assert all(torch.equal(mine[k], theirs[k]) for k in mine), f"{name} {part}"


async def test_bad_requests_end_with_a_message_that_says_what_to_fix(
    backend: DiffusersBackend,
) -> None:
    cases = [
        ({"sampler_name": "Bogus"}, "unknown sampler 'Bogus'; the diffusers engine runs: DPM++ 2M"),
        ({"width": 100}, "width must be a multiple of 8 and at least 64 (got 100); try 96 or 104"),
        (
            {"override_settings": {"sd_model_checkpoint": "zz-old"}},
            "zz-old.ckpt is a pickled checkpoint",
        ),
        ({"override_settings": {"sd_model_checkpoint": "nope"}}, "no checkpoint named 'nope'"),
    ]
    for body, message in cases:
        with pytest.raises(BackendRejected) as raised:
            await backend.generate("txt2img", {"prompt": "x", **SMALL, **body})
        assert message in raised.value.message


async def test_progress_advances_with_previews_and_interrupt_stops_at_the_next_step(
    models_dir: Path,
) -> None:
    backend = make_backend(models_dir, preview_steps=2)
    try:
        await backend.generate("txt2img", {"prompt": "warm up", **SMALL})
        idle = await backend.progress()
        assert idle.started is False and idle.progress == 0.0
        run = asyncio.create_task(
            backend.generate("txt2img", {"prompt": "a cat", **SMALL, "steps": 500})
        )
        seen = []
        while len(seen) < 3 or seen[-1].progress <= seen[0].progress or not seen[-1].current_image:
            assert not run.done(), run  # it must still be running (and not have failed)
            progress = await backend.progress(with_image=True)
            if progress.progress > 0:
                seen.append(progress)
            await asyncio.sleep(0.01)
        assert all(p.started for p in seen) and seen[-1].eta_relative is not None
        preview = Image.open(io.BytesIO(base64.b64decode(seen[-1].current_image or "")))
        assert preview.size == (8, 8)  # the latent's size: 1/8 of the image
        await backend.interrupt()
        result = await asyncio.wait_for(run, 30)
        assert decode(result).size == (64, 64)  # A1111 returns what it has
        assert seen[-1].progress < 0.5
    finally:
        await backend.aclose()


async def wait_until(backend: DiffusersBackend, run: asyncio.Task, done: Any) -> Any:
    """Poll the backend's progress (as the worker does) until `done(progress)`."""
    while not done(progress := await backend.progress(with_image=True)):
        assert not run.done(), run  # it must still be running (and not have failed)
        await asyncio.sleep(0.01)
    return progress


async def test_the_engine_makes_live_previews_only_while_someone_asks_for_them(
    models_dir: Path,
) -> None:
    backend = make_backend(models_dir, preview_steps=1)
    try:
        run = asyncio.create_task(
            backend.generate("txt2img", {"prompt": "a cat", **SMALL, "steps": 500})
        )
        while (await backend.progress()).progress < 0.02:  # progress only, as nobody looks
            assert not run.done(), run
            await asyncio.sleep(0.01)
        asked = await backend.progress(with_image=True)
        assert asked.progress >= 0.02 and asked.current_image is None  # none made so far
        progress = await wait_until(backend, run, lambda p: p.current_image)  # now they are
        Image.open(io.BytesIO(base64.b64decode(progress.current_image))).verify()
        await backend.interrupt()
        await asyncio.wait_for(run, 30)
    finally:
        await backend.aclose()


async def test_skip_ends_the_current_batch_with_its_image_and_the_next_batch_runs(
    backend: DiffusersBackend,
) -> None:
    body = {"prompt": "a cat", **SMALL, "steps": 500, "n_iter": 2}
    run = asyncio.create_task(backend.generate("txt2img", body))
    await wait_until(backend, run, lambda p: p.progress > 0)
    await backend.skip()
    second = await wait_until(backend, run, lambda p: p.progress > 0.5)  # batch 2 of 2 runs
    await backend.interrupt()
    result = await asyncio.wait_for(run, 30)
    assert len(result["images"]) == 2 and second.progress < 0.75
    assert json.loads(result["info"])["all_seeds"] == [7, 8]


async def test_previews_are_full_size_when_taesd_weights_are_in_the_models_folder(
    models_dir: Path, tmp_path: Path
) -> None:
    own = tmp_path / "models"
    (own / "Stable-diffusion").mkdir(parents=True)
    (own / "Stable-diffusion" / "tiny15.safetensors").symlink_to(
        models_dir / "models" / "Stable-diffusion" / "tiny15.safetensors"
    )
    tiny_sd.taesd(own / "VAE-approx" / "taesd")
    backend = make_backend(models_dir, preview_steps=1, folder=own)
    try:
        run = asyncio.create_task(
            backend.generate("txt2img", {"prompt": "a cat", **SMALL, "steps": 500})
        )
        progress = await wait_until(backend, run, lambda p: p.current_image)
        await backend.interrupt()
        await asyncio.wait_for(run, 30)
        preview = Image.open(io.BytesIO(base64.b64decode(progress.current_image)))
        assert preview.size == (64, 64)  # TAESD decodes to the image's size, not the latent's
    finally:
        await backend.aclose()


async def test_several_init_images_make_a_batch_with_one_image_each(
    backend: DiffusersBackend,
) -> None:
    red, blue = (png_b64(Image.new("RGB", (64, 64), c)) for c in ((230, 20, 20), (20, 20, 230)))
    body = {"prompt": "a cat", **SMALL, "init_images": [red, blue], "denoising_strength": 0.1}
    result = await backend.generate("img2img", {**body, "batch_size": 2})
    # Image n is what init image n alone gives with seed + n.
    alone = [
        await backend.generate("img2img", {**body, "init_images": [image], "seed": seed})
        for image, seed in ((red, 7), (blue, 8))
    ]
    assert np.abs(pixels(result, 0) - pixels(alone[0])).max() <= 2
    assert np.abs(pixels(result, 1) - pixels(alone[1])).max() <= 2
    assert np.abs(pixels(result, 0) - pixels(result, 1)).max() > 10
    with pytest.raises(BackendRejected) as raised:
        await backend.generate("img2img", body)  # batch_size 1 for two images
    assert "bad number of images passed: 2; expecting 1 or less" in raised.value.message


async def test_img2img_reads_every_format_a1111_reads_as_it_reads_the_same_png(
    backend: DiffusersBackend,
) -> None:
    red = Image.new("RGB", (64, 64), (230, 20, 20))
    red.paste((20, 20, 230), (16, 16, 48, 48))
    encodings = {}
    for fmt, options in (("WEBP", {"lossless": True}), ("BMP", {}), ("TIFF", {})):
        out = io.BytesIO()
        red.save(out, fmt, **options)
        encodings[fmt] = base64.b64encode(out.getvalue()).decode()
    gif = io.BytesIO()  # two frames: A1111 (Pillow) reads the first
    red.save(gif, "GIF", save_all=True, append_images=[Image.new("RGB", (64, 64), (0, 200, 0))])
    encodings["GIF"] = "data:image/gif;base64," + base64.b64encode(gif.getvalue()).decode()
    body = {"prompt": "a cat", **SMALL, "denoising_strength": 0.3}
    expected = await backend.generate("img2img", {**body, "init_images": [png_b64(red)]})
    for fmt, image in encodings.items():
        result = await backend.generate("img2img", {**body, "init_images": [image]})
        assert np.abs(pixels(result) - pixels(expected)).max() <= 2, fmt


async def test_cancelling_a_running_generate_frees_the_slot_for_the_next_job(
    backend: DiffusersBackend,
) -> None:
    run = asyncio.create_task(
        backend.generate("txt2img", {"prompt": "a cat", **SMALL, "steps": 500})
    )
    while (await backend.progress()).progress <= 0:
        assert not run.done(), run  # it must still be running (and not have failed)
        await asyncio.sleep(0.01)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(run, 30)
    result = await asyncio.wait_for(backend.generate("txt2img", {"prompt": "a cat", **SMALL}), 30)
    assert len(result["images"]) == 1


async def test_the_worker_completes_a_submitted_job_on_the_diffusers_backend(
    models_dir: Path,
    sqlite_url: str,
) -> None:
    db = Database(sqlite_url)
    repo = JobRepository(db, max_attempts=3, lease_seconds=30)
    try:
        ids = []
        for body in (
            {"prompt": "a cat", **SMALL, "batch_size": 2},
            {"prompt": "a cat", **SMALL, "sampler_name": "Nope"},
        ):
            text = json.dumps(body)
            ids.append((await repo.submit(NewJob("txt2img", request=text, payload=text))).job.id)
        worker = Worker(
            repo=repo,
            backends=[make_backend(models_dir)],
            wakeup=make_wakeup(sqlite_url, 0.005),
            timing=Timing(progress_seconds=0.02, heartbeat_seconds=0.5),
        )
        await asyncio.wait_for(worker.run_until_empty(), 120)
        done, failed = [await repo.get(job_id) for job_id in ids]
        assert done.status == "completed" and done.progress == 1.0 and done.image_count == 2
        result = done.result
        assert json.loads(result["info"])["all_seeds"] == [7, 8]
        first, second = await repo.images(done.seq)
        assert first.startswith(b"\x89PNG") and b"Seed: 7" in first and b"Seed: 8" in second
        assert failed.status == "error"
        error = failed.error
        assert error["code"] == "backend_rejected" and "unknown sampler 'Nope'" in error["message"]
    finally:
        await db.dispose()


def test_the_shipped_config_skeletons_describe_real_sd15_and_sdxl() -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    from a1111_proxy.engine.skeletons import skeleton

    def millions(model: torch.nn.Module) -> float:
        return round(sum(p.numel() for p in model.parameters()) / 1e6, 1)

    sd15, sdxl = skeleton("sd15"), skeleton("sdxl")
    with torch.device("meta"):
        assert (
            millions(
                UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(sd15 / "unet"))
            )
            == 859.5
        )
        assert (
            millions(
                UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(sdxl / "unet"))
            )
            == 2567.5
        )
        assert millions(AutoencoderKL.from_config(AutoencoderKL.load_config(sd15 / "vae"))) == 83.7
        assert (
            millions(CLIPTextModel(CLIPTextConfig.from_pretrained(sd15 / "text_encoder"))) == 123.1
        )
        assert (
            millions(
                CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(sdxl / "text_encoder_2"))
            )
            == 694.7
        )
    assert (
        json.loads((skeleton("sd15_inpaint") / "unet" / "config.json").read_text())["in_channels"]
        == 9
    )
    tokenizer = CLIPTokenizer.from_pretrained(sd15 / "tokenizer")
    assert tokenizer("a photo of a cat, masterpiece").input_ids == [
        49406,
        320,
        1125,
        539,
        320,
        2368,
        267,
        12066,
        49407,
    ]
    assert CLIPTokenizer.from_pretrained(sdxl / "tokenizer_2").pad_token_id == 0


def test_initial_noise_is_a1111s_per_seed_randn_and_its_variation_blend() -> None:
    from a1111_proxy.engine import noise

    made = noise.make(
        [5, 6],
        [9, 10],
        subseed_strength=0.0,
        shape=(4, 8, 8),
        device=torch.device("cpu"),
        source="CPU",
    )
    for i, seed in enumerate([5, 6]):
        assert torch.equal(
            made.latents[i], torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(seed))
        )
    varied = noise.make(
        [5], [9], subseed_strength=0.3, shape=(4, 8, 8), device=torch.device("cpu"), source="CPU"
    )
    low = torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(5))
    high = torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(9))
    assert torch.allclose(varied.latents[0], noise.slerp(0.3, low, high))
    resized = noise.make(
        [5],
        [9],
        subseed_strength=0.0,
        shape=(4, 8, 8),
        device=torch.device("cpu"),
        source="CPU",
        resize_from=(32, 32),
    )
    assert torch.equal(
        resized.latents[0, :, 2:6, 2:6],
        torch.randn((4, 4, 4), generator=torch.Generator().manual_seed(5)),
    )
