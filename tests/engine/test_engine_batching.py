"""Cross-request batching on the tiny models, on the CPU: compatible jobs run as one batch and
each gets the images it gets alone; one job's interrupt, cancel or bad input leaves the others
alone; the real Worker claims compatible jobs together from a real database.

Measured on the CPU: a job's rows in a batch equal its images alone to within 1 of 255 on a few
pixels (oneDNN's convolutions round differently at another batch size; matmuls are exact)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch", reason="the engine tests need the engine extra (torch)")
pytest.importorskip("diffusers", reason="the engine tests need the engine extra (diffusers)")

import numpy as np
import torch

from a1111_proxy.backends import BackendRejected
from a1111_proxy.backends.diffusers import DiffusersBackend
from a1111_proxy.db.engine import Database
from a1111_proxy.engine.batch import Member, generate_batch
from a1111_proxy.engine.compat import batch_key
from a1111_proxy.engine.params import Params
from a1111_proxy.engine.pipeline import RunState, generate
from a1111_proxy.jobs import JobRepository, NewJob
from a1111_proxy.wakeup import make_wakeup
from tests.engine.test_engine import make_backend, models_dir, pixels, png_b64  # noqa: F401
from worker.execute import Timing
from worker.loop import Worker

pytestmark = [pytest.mark.anyio, pytest.mark.engine]
SHARED = {"steps": 4, "width": 64, "height": 64, "sampler_name": "Euler a", "subseed": 11}
JOBS = [
    {"prompt": "a cat", "seed": 7, **SHARED},
    {"prompt": "a dog in a hat", "negative_prompt": "blur", "seed": 100, "batch_size": 2, **SHARED},
    {"prompt": "x", "seed": 5, "subseed_strength": 0.3, **SHARED},
]


@pytest.fixture
async def backend(models_dir: Path) -> AsyncIterator[DiffusersBackend]:  # noqa: F811
    made = make_backend(models_dir, max_batch=4)
    yield made
    await made.aclose()


def assert_same_images(batched: dict[str, Any], alone: dict[str, Any]) -> None:
    assert len(batched["images"]) == len(alone["images"])
    for n in range(len(alone["images"])):
        difference = np.abs(pixels(batched, n) - pixels(alone, n))
        assert difference.max() <= 1 and (difference > 0).mean() < 0.01
    infos = [json.loads(result["info"]) for result in (batched, alone)]
    for info in infos:
        info.pop("job_timestamp")
    assert infos[0] == infos[1]


async def run_batch(backend: DiffusersBackend, bodies: list[dict[str, Any]]) -> list[Any]:
    batch = backend.batch([("txt2img", body) for body in bodies])
    runners = zip(batch.runners, bodies, strict=True)
    runs = [runner.generate("txt2img", body) for runner, body in runners]
    return await asyncio.gather(*runs, return_exceptions=True)


# DPM adaptive runs each job alone (its steps are sized over the whole batch).
@pytest.mark.parametrize("sampler", ["Euler a", "DPM fast", "DPM adaptive", "Restart"])
async def test_each_job_of_a_batch_gets_the_images_it_gets_alone(
    backend: DiffusersBackend, sampler: str
) -> None:
    jobs = [{**body, "sampler_name": sampler} for body in JOBS]
    alone = [await backend.generate("txt2img", body) for body in jobs]
    batched = await run_batch(backend, jobs)
    for one, other in zip(batched, alone, strict=True):
        assert_same_images(one, other)


async def test_img2img_jobs_batch_with_their_own_init_images(backend: DiffusersBackend) -> None:
    from PIL import Image

    images = [png_b64(Image.new("RGB", (64, 64), colour)) for colour in ("red", "blue")]
    bodies = [
        {"prompt": f"p{n}", "seed": n, "init_images": [image], "denoising_strength": 0.6, **SHARED}
        for n, image in enumerate(images)
    ]
    alone = [await backend.generate("img2img", body) for body in bodies]
    batch = backend.batch([("img2img", body) for body in bodies])
    batched = [await r.generate("img2img", b) for r, b in zip(batch.runners, bodies, strict=True)]
    for one, other in zip(batched, alone, strict=True):
        assert_same_images(one, other)


async def test_img2img_jobs_in_latent_resize_mode_run_alone_with_their_latent_start(
    backend: DiffusersBackend,
) -> None:
    from PIL import Image

    rng = np.random.default_rng(1)
    images = [
        png_b64(Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)))
        for _ in range(2)
    ]
    bodies = [
        {"prompt": "p", "seed": n, "init_images": [image], "denoising_strength": 0.3, **SHARED}
        for n, image in enumerate(images)
    ]
    bodies = [{**body, "resize_mode": 3} for body in bodies]
    alone = [await backend.generate("img2img", body) for body in bodies]
    batch = backend.batch([("img2img", body) for body in bodies])
    batched = [await r.generate("img2img", b) for r, b in zip(batch.runners, bodies, strict=True)]
    for one, other in zip(batched, alone, strict=True):
        assert np.array_equal(pixels(one), pixels(other))


async def test_a_bad_init_image_fails_its_own_job_only(backend: DiffusersBackend) -> None:
    from PIL import Image

    good = {"prompt": "p", "seed": 1, "init_images": [png_b64(Image.new("RGB", (64, 64)))]}
    bad = {"prompt": "p", "seed": 2, "init_images": ["bm90IGFuIGltYWdl"]}
    bodies = [{**good, **SHARED}, {**bad, **SHARED}]
    batch = backend.batch([("img2img", body) for body in bodies])
    runners = zip(batch.runners, bodies, strict=True)
    done = await asyncio.gather(
        *(r.generate("img2img", b) for r, b in runners), return_exceptions=True
    )
    assert len(done[0]["images"]) == 1
    assert isinstance(done[1], BackendRejected) and "init_images[0]" in done[1].message


def test_an_interrupted_or_cancelled_job_ends_at_the_next_step_and_the_others_are_as_alone(
    models_dir: Path,  # noqa: F811
) -> None:
    backend = make_backend(models_dir)
    models, config = backend.models, backend.config
    params = [Params.from_payload("txt2img", body) for body in JOBS]
    alone = {n: generate(models, config, p, RunState()) for n, p in enumerate(params)}
    # (job, its step when answered: 0 once answered with images), in the order answered
    answers: list[tuple[int, int, Any]] = []
    members = []
    for n, p in enumerate(params):
        state = RunState()

        def done(value: Any, n: int = n, state: RunState = state) -> None:
            answers.append((n, state.step, value))

        members.append(Member(p, state, done))
    members[0].state.interrupt.set()  # asked before the first step ends: it ends there
    members[2].state.cancel.set()
    generate_batch(models, config, members)
    # Both end in the first step's callback (before the batch goes on), the third at the end.
    assert [(n, step) for n, step, _ in answers] == [(0, 0), (2, 1), (1, 0)]
    interrupted, canceled, finished = (value for _, _, value in answers)
    assert len(interrupted["images"]) == 1 and isinstance(canceled, Exception)
    assert np.abs(pixels(interrupted) - pixels(alone[0])).max() > 1  # one step's estimate
    assert "Canceled" in type(canceled).__name__
    assert_same_images(finished, alone[1])


def test_in_a_batch_only_the_job_someone_watches_gets_live_previews(
    models_dir: Path,  # noqa: F811
) -> None:
    backend = make_backend(models_dir, preview_steps=1)
    params = [Params.from_payload("txt2img", body) for body in JOBS]
    members = [Member(p, RunState(), lambda value: None) for p in params]
    members[1].state.preview_asked_at = time.monotonic()  # its progress was read with its image
    generate_batch(backend.models, backend.config, members)
    assert [m.state.current_image is not None for m in members] == [False, True, False]


def test_jobs_that_differ_in_what_a_batch_shares_get_different_keys() -> None:
    key = batch_key("txt2img", JOBS[0], "tiny15")
    assert key is not None
    assert batch_key("txt2img", {**JOBS[1], "prompt": "other"}, "tiny15") == key
    for changed in ({"steps": 5}, {"cfg_scale": 3}, {"width": 128}, {"sampler_name": "Euler"}):
        assert batch_key("txt2img", {**JOBS[0], **changed}, "tiny15") != key
    assert batch_key("txt2img", {**JOBS[0], "prompt": "a <lora:x:1>"}, "tiny15") != key
    assert batch_key("txt2img", JOBS[0], "other") != key
    assert batch_key("img2img", JOBS[0], "tiny15") != key
    for alone in ({"n_iter": 2}, {"script_name": "x/y/z plot"}, {"mask": "bWFzaw=="}):
        assert batch_key("txt2img", {**JOBS[0], **alone}, "tiny15") is None


async def test_the_worker_runs_compatible_jobs_as_one_batch_and_others_alone(
    models_dir: Path,  # noqa: F811
    sqlite_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    db = Database(sqlite_url)
    repo = JobRepository(db, max_attempts=3, lease_seconds=30, batch_key=batch_key)
    backend = make_backend(models_dir, max_batch=4)
    try:
        alone = [await backend.generate("txt2img", body) for body in JOBS]
        bodies = [JOBS[0], {**JOBS[0], "steps": 3}, JOBS[1], JOBS[2]]
        ids = []
        for body in bodies:
            text = json.dumps(body)
            ids.append((await repo.submit(NewJob("txt2img", request=text, payload=text))).job.id)
        worker = Worker(
            repo=repo,
            backends=[backend],
            wakeup=make_wakeup(sqlite_url, 0.005),
            timing=Timing(progress_seconds=0.02, heartbeat_seconds=0.5),
        )
        with caplog.at_level(logging.INFO, logger="a1111_proxy.worker"):
            await asyncio.wait_for(worker.run_until_empty(), 120)
        batches = [r.getMessage() for r in caplog.records if "one batch" in r.getMessage()]
        assert len(batches) == 1 and all(ids[n] in batches[0] for n in (0, 2, 3))
        assert ids[1] not in batches[0]
        jobs = [await repo.get(job_id) for job_id in ids]
        assert all(job.status == "completed" and job.progress == 1.0 for job in jobs)
        for job, one in zip([jobs[0], jobs[2], jobs[3]], alone, strict=True):
            stored = await repo.images(job.seq)
            result = {**job.result, "images": [base64.b64encode(i) for i in stored]}
            assert_same_images(result, one)
    finally:
        await db.dispose()


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("MPS backend out of memory (MPS allocated: 9.00 GB)"),
    ],
    ids=["OutOfMemoryError", "RuntimeError"],
)
async def test_a_batch_that_runs_out_of_memory_runs_its_jobs_one_at_a_time(
    backend: DiffusersBackend, error: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    alone = [await backend.generate("txt2img", body) for body in JOBS]
    unet = backend.models.get("tiny15").pipe.unet
    too_big: list[int] = []

    def out_of_memory(module: Any, args: tuple[Any, ...]) -> None:
        rows = args[0].shape[0]  # CFG doubles them: each job alone has at most 4
        if rows > 4:
            too_big.append(rows)
            raise error

    hook = unet.register_forward_pre_hook(out_of_memory)
    try:
        with caplog.at_level(logging.WARNING, logger="a1111_proxy.engine"):
            batched = await run_batch(backend, JOBS)
    finally:
        hook.remove()
    assert too_big == [8]  # the batch's first step; then each job alone
    assert "a batch of 3 jobs ran out of memory" in caplog.text
    for one, other in zip(batched, alone, strict=True):
        assert_same_images(one, other)
