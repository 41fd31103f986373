"""FakeBackend, the scripted in-process backend: it answers as A1111 does. Its catalogue in the
database is in tests/integration, and BACKEND=fake running a real `serve` + `worker` with no A1111
at all in tests/processes (test_fake_backend.py)."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from a1111_proxy.backends import (
    BackendError,
    BackendProtocolError,
    BackendRejected,
    BackendUnavailable,
)
from a1111_proxy.backends.fake import Call, FakeBackend
from a1111_proxy.catalogue import ENTRIES

pytestmark = pytest.mark.anyio


async def until(check: Callable[[], object | Awaitable[object]], timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while True:
            value = check()
            if isinstance(value, Awaitable):
                value = await value
            if value:
                return
            await asyncio.sleep(0.005)


def running(fake: FakeBackend, kind: str, payload: dict[str, Any]) -> asyncio.Task[Any]:
    return asyncio.create_task(fake.generate(kind, payload))


async def test_a_generation_answers_in_a1111s_shape_with_real_pngs_and_is_recorded() -> None:
    fake = FakeBackend("f", service_time=0)
    payload = {"prompt": "a cat", "seed": 7, "batch_size": 2, "steps": 4}
    result = await fake.generate("txt2img", payload)
    assert result["parameters"] == payload
    info = json.loads(result["info"])
    assert info["seed"] == 7 and info["all_seeds"] == [7, 8]
    assert info["sd_model_name"] == fake.options["sd_model_checkpoint"]
    images = [base64.b64decode(image) for image in result["images"]]
    assert len(images) == 2 and all(image.startswith(b"\x89PNG\r\n\x1a\n") for image in images)
    assert b"Seed: 8" in images[1]
    assert fake.generation_requests() == [payload] and fake.completed == 1
    assert list(fake.calls) == [Call("generate", ("txt2img", payload))]


async def test_a_jobs_checkpoint_override_names_the_model_in_its_info() -> None:
    fake = FakeBackend(service_time=0)
    result = await fake.generate(
        "img2img", {"prompt": "x", "override_settings": {"sd_model_checkpoint": "other"}}
    )
    assert json.loads(result["info"])["sd_model_name"] == "other"


async def test_progress_advances_while_a_generation_runs_and_is_idle_after() -> None:
    fake = FakeBackend()
    assert not (await fake.progress()).started
    generation = running(fake, "txt2img", {"prompt": "x", "steps": 10, "fake_seconds": 30})
    await until(lambda: fake.current is not None)
    seen = [await fake.progress()]
    await until(lambda: _progressed(fake, seen))
    first, last = seen[0], seen[-1]
    assert first.started and 0 < first.progress < last.progress < 1 and last.steps == 10
    assert last.eta_relative is not None and last.eta_relative > 0
    assert last.current_image is None
    preview = (await fake.progress(with_image=True)).current_image
    assert preview is not None and base64.b64decode(preview).startswith(b"\x89PNG")
    fake.finish_current()
    await generation
    assert not (await fake.progress()).started


async def _progressed(fake: FakeBackend, seen: list[Any]) -> bool:
    seen.append(await fake.progress())
    return seen[-1].progress > seen[0].progress


async def test_a_request_sets_its_own_service_time_with_fake_seconds() -> None:
    fake = FakeBackend(service_time=3600)
    result = await asyncio.wait_for(fake.generate("txt2img", {"fake_seconds": 0}), 10)
    assert len(result["images"]) == 1


async def test_an_interrupt_ends_the_generation_at_once_with_the_batches_it_has() -> None:
    fake = FakeBackend()
    generation = running(
        fake, "txt2img", {"prompt": "x", "n_iter": 3, "batch_size": 2, "fake_seconds": 300}
    )
    await until(lambda: fake.current is not None)
    await fake.interrupt()
    result = await asyncio.wait_for(generation, 10)
    assert len(result["images"]) == 2  # the running batch, as far as it got; no more
    assert json.loads(result["info"])["all_seeds"] == [1001, 1002, 1003, 1004, 1005, 1006]
    assert fake.interrupts == 1 and fake.completed == 0


async def test_a_skip_ends_the_running_batch_and_the_next_one_runs() -> None:
    fake = FakeBackend()
    generation = running(fake, "txt2img", {"prompt": "x", "n_iter": 2, "fake_seconds": 300})
    await until(lambda: fake.current is not None)
    await fake.skip()
    await until(lambda: fake.current is not None and fake.current.batch == 1)
    assert not generation.done()
    fake.finish_current()
    result = await asyncio.wait_for(generation, 10)
    assert len(result["images"]) == 2 and fake.skips == 1 and fake.completed == 1


async def test_generations_run_one_at_a_time_in_the_order_they_were_asked() -> None:
    fake = FakeBackend()
    first = running(fake, "txt2img", {"prompt": "first", "fake_seconds": 300})
    await until(lambda: fake.current is not None)
    second = running(fake, "txt2img", {"prompt": "second", "fake_seconds": 300})
    await until(lambda: fake.in_flight == 2)
    assert fake.current is not None and fake.current.number == 1
    fake.finish_current()
    await asyncio.wait_for(first, 10)
    await until(lambda: fake.current is not None and fake.current.number == 2)
    fake.finish_current()
    assert json.loads((await second)["info"])["prompt"] == "second"
    assert fake.max_in_flight == 2 and list(fake.timeline) == ["txt2img", "txt2img"]


@pytest.mark.parametrize(
    ("kind", "error", "code", "status"),
    [
        ("unavailable", BackendUnavailable, "backend_unavailable", 503),
        ("rejected", BackendRejected, "backend_rejected", 422),
        ("bad_response", BackendProtocolError, "backend_bad_response", 200),
    ],
)
async def test_scripted_failures_raise_the_error_class_the_worker_acts_on(
    kind: Any, error: type[BackendError], code: str, status: int
) -> None:
    fake = FakeBackend("f1", service_time=0)
    fake.fail_next(2, kind)
    for _ in range(2):
        with pytest.raises(error) as raised:
            await fake.generate("txt2img", {"prompt": "x"})
        assert raised.value.code == code and raised.value.status == status
        assert "f1" in raised.value.message
    assert len((await fake.generate("txt2img", {"prompt": "x"}))["images"]) == 1
    assert fake.completed == 1 and len(fake.generation_requests()) == 3


async def test_a_scripted_rejection_carries_the_body_and_its_detail() -> None:
    fake = FakeBackend()
    body = {"error": "HTTPException", "detail": "Script 'nope' not found", "body": "", "errors": ""}
    fake.fail_next(kind="rejected", status=404, body=body)
    with pytest.raises(BackendRejected) as raised:
        await fake.generate("txt2img", {"script_name": "nope"})
    assert raised.value.body == body and raised.value.status == 404
    assert "Script 'nope' not found" in raised.value.message


async def test_a_hung_generation_never_answers_and_never_shows_as_running() -> None:
    fake = FakeBackend(service_time=0)
    fake.hang_next()
    generation = running(fake, "txt2img", {"prompt": "x"})
    await until(lambda: len(fake.generation_requests()) == 1)
    await asyncio.sleep(0.05)  # it is not going to answer: look once more after a while
    assert not generation.done() and not (await fake.progress()).started
    generation.cancel()
    assert len((await fake.generate("txt2img", {"prompt": "x"}))["images"]) == 1


async def test_a_fake_that_is_down_refuses_every_call_as_unavailable() -> None:
    fake = FakeBackend("gone")
    fake.down = True
    calls: list[Callable[[], Awaitable[Any]]] = [
        lambda: fake.generate("txt2img", {}),
        fake.progress,
        fake.interrupt,
        fake.skip,
        lambda: fake.catalogue_entry("sd-models"),
        lambda: fake.apply_options({}),
        lambda: fake.refresh("loras"),
        fake.unload_checkpoint,
        lambda: fake.reload_checkpoint(None),
    ]
    for call in calls:
        with pytest.raises(BackendUnavailable, match="gone is down"):
            await call()
    fake.down = False
    assert not (await fake.progress()).started


async def test_other_job_kinds_answer_as_a1111_and_an_unknown_kind_is_rejected() -> None:
    fake = FakeBackend()
    assert "caption" in await fake.generate("interrogate", {"image": "x"})
    batch = await fake.generate("extra-batch-images", {"imageList": [{}, {}]})
    assert len(batch["images"]) == 2
    assert base64.b64decode((await fake.generate("extra-single-image", {}))["image"])
    assert (await fake.generate("controlnet-detect", {}))["info"] == "Success"
    with pytest.raises(BackendRejected, match="does not run 'upscale'"):
        await fake.generate("upscale", {})


async def test_the_catalogue_answers_by_name_and_applied_options_show_in_it() -> None:
    fake = FakeBackend()
    [model] = await fake.catalogue_entry("sd-models")
    options = await fake.catalogue_entry("options")
    assert options["sd_model_checkpoint"] == model["title"]
    assert {s["name"] for s in await fake.catalogue_entry("samplers")} >= {"Euler a"}
    assert await fake.catalogue_entry("controlnet-model_list") is None  # no such extension
    assert set(ENTRIES) - {
        "controlnet-version",
        "controlnet-model_list",
        "controlnet-module_list",
    } <= set(fake.catalogue) | {"options", "memory"}
    await fake.apply_options({"CLIP_stop_at_last_layers": 2})
    await fake.refresh("checkpoints")
    assert (await fake.catalogue_entry("options"))["CLIP_stop_at_last_layers"] == 2
    assert list(fake.calls) == [
        Call("apply_options", ({"CLIP_stop_at_last_layers": 2},)),
        Call("refresh", ("checkpoints",)),
    ]


async def test_unload_frees_memory_and_the_next_generation_loads_the_model_on_demand() -> None:
    fake = FakeBackend(service_time=0)
    await fake.unload_checkpoint()
    memory = await fake.catalogue_entry("memory")
    assert not fake.loaded and memory["cuda"]["allocated"]["current"] == 0
    await fake.generate("txt2img", {"prompt": "x"})
    await fake.unload_checkpoint()
    await fake.reload_checkpoint("fake-model")
    assert fake.loaded and (await fake.catalogue_entry("memory"))["cuda"]["allocated"]["current"]
    assert list(fake.timeline) == [
        "unload-checkpoint",
        "load",
        "txt2img",
        "unload-checkpoint",
        "reload-checkpoint",
    ]
    assert fake.calls[-1] == Call("reload_checkpoint", ("fake-model",))
    assert fake.checkpoint_calls_while_generating == 0
