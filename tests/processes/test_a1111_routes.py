"""A1111 v1.10's whole route table against real API and worker processes in front of a fake
A1111, and text-generation-webui's `sd_api_pictures` sequence (unload-checkpoint and
reload-checkpoint around txt2img, to share the GPU with its language model)."""

from __future__ import annotations

import base64
import contextlib
import io
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from PIL import Image

from a1111_proxy.routes.a1111 import NOT_OFFERED
from tests.fakes.a1111 import FakeA1111, tiny_png
from tests.servers import Proc, free_port, wait_for, wait_http
from tests.stack import Stack

pytestmark = pytest.mark.slow

PNG = base64.b64encode(tiny_png("a picture", 16)).decode()
# modules/api/api.py of A1111 v1.10.1 (add_api_route) plus the Lora extension's two routes, each
# with a body it accepts.
A1111_ROUTES: list[tuple[str, str, Any]] = [
    ("POST", "/sdapi/v1/txt2img", {"prompt": "a cat", "steps": 2}),
    ("POST", "/sdapi/v1/img2img", {"prompt": "a cat", "steps": 2, "init_images": [PNG]}),
    ("POST", "/sdapi/v1/extra-single-image", {"image": PNG, "upscaling_resize": 2}),
    ("POST", "/sdapi/v1/extra-batch-images", {"imageList": [{"data": PNG, "name": "a.png"}]}),
    ("POST", "/sdapi/v1/png-info", {"image": PNG}),
    ("GET", "/sdapi/v1/progress", None),
    ("POST", "/sdapi/v1/interrogate", {"image": PNG, "model": "clip"}),
    ("POST", "/sdapi/v1/interrupt", None),
    ("POST", "/sdapi/v1/skip", None),
    ("GET", "/sdapi/v1/options", None),
    ("POST", "/sdapi/v1/options", {"samples_format": "png"}),
    ("GET", "/sdapi/v1/cmd-flags", None),
    ("GET", "/sdapi/v1/samplers", None),
    ("GET", "/sdapi/v1/schedulers", None),
    ("GET", "/sdapi/v1/upscalers", None),
    ("GET", "/sdapi/v1/latent-upscale-modes", None),
    ("GET", "/sdapi/v1/sd-models", None),
    ("GET", "/sdapi/v1/sd-vae", None),
    ("GET", "/sdapi/v1/hypernetworks", None),
    ("GET", "/sdapi/v1/face-restorers", None),
    ("GET", "/sdapi/v1/realesrgan-models", None),
    ("GET", "/sdapi/v1/prompt-styles", None),
    ("GET", "/sdapi/v1/embeddings", None),
    ("POST", "/sdapi/v1/refresh-embeddings", None),
    ("POST", "/sdapi/v1/refresh-checkpoints", None),
    ("POST", "/sdapi/v1/refresh-vae", None),
    ("POST", "/sdapi/v1/create/embedding", {"name": "x", "num_vectors_per_token": 1}),
    ("POST", "/sdapi/v1/create/hypernetwork", {"name": "x"}),
    ("POST", "/sdapi/v1/train/embedding", {"embedding_name": "x"}),
    ("POST", "/sdapi/v1/train/hypernetwork", {"hypernetwork_name": "x"}),
    ("GET", "/sdapi/v1/memory", None),
    ("POST", "/sdapi/v1/unload-checkpoint", None),
    ("POST", "/sdapi/v1/reload-checkpoint", None),
    ("GET", "/sdapi/v1/scripts", None),
    ("GET", "/sdapi/v1/script-info", None),
    ("GET", "/sdapi/v1/extensions", None),
    ("POST", "/sdapi/v1/server-kill", None),
    ("POST", "/sdapi/v1/server-restart", None),
    ("POST", "/sdapi/v1/server-stop", None),
    ("GET", "/sdapi/v1/loras", None),
    ("POST", "/sdapi/v1/refresh-loras", None),
]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, fake: FakeA1111) -> Iterator[Stack]:
    made = Stack(
        tmp_path_factory.mktemp("routes"),
        [fake.url],  # type: ignore[attr-defined]
        A1111_PROXY_RESPONSE_MODE="wait",
    )
    try:
        api = made.start_api()
        made.start_worker()
        wait_for(
            lambda: "system" in api.get("/sdapi/v1/memory").json()["cuda"],
            what="the backend's memory in the catalogue",
        )
        yield made
    finally:
        made.close()


@contextlib.contextmanager
def another_api(stack: Stack, **env: str) -> Iterator[httpx.Client]:
    """One more API process on the same database, with its own settings."""
    port = free_port()
    proc = Proc(["serve", "--port", str(port)], {**stack.env, **env}, stack.tmp / f"api-{port}.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/ready", proc=proc)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            yield client
    finally:
        proc.stop()


def test_text_generation_webuis_vram_sharing_sequence_reads_what_a1111_would_answer(
    api: httpx.Client, fake: FakeA1111
) -> None:
    """sd_api_pictures with manage_VRAM: 'set' unloads; each picture reloads, generates, then
    unloads again. It sends `json=''`, checks raise_for_status() and reads r['images'];
    it wants the GPU memory free when the unload answers (it loads its LLM next)."""
    mark = len(fake.timeline)
    unloaded = api.post("/sdapi/v1/unload-checkpoint", json="")
    assert unloaded.status_code == 200 and unloaded.json() == {}
    assert not fake.loaded and "x-proxy-note" not in unloaded.headers

    reloaded = api.post("/sdapi/v1/reload-checkpoint", json="")
    assert reloaded.status_code == 200 and reloaded.json() == {} and fake.loaded

    payload = {
        "prompt": "(Masterpiece:1.1), detailed, intricate, colorful(a fox:1)",
        "seed": -1,
        "sampler_name": "DPM++ 2M",
        "enable_hr": False,
        "hr_scale": "1.0",
        "hr_upscaler": "ESRGAN_4x",
        "denoising_strength": 0.61,
        "steps": 32,
        "cfg_scale": 7,
        "width": 512,
        "height": 512,
        "restore_faces": False,
        "override_settings_restore_afterwards": True,
        "negative_prompt": "(worst quality, low quality:1.3)",
    }
    response = api.post("/sdapi/v1/txt2img", json=payload)
    response.raise_for_status()
    for img_str in response.json()["images"]:
        Image.open(io.BytesIO(base64.b64decode(img_str.split(",", 1)[0]))).verify()

    again = api.post("/sdapi/v1/unload-checkpoint", json="")
    assert again.status_code == 200 and again.json() == {} and not fake.loaded
    assert fake.timeline[mark:] == [
        "unload-checkpoint",
        "reload-checkpoint",
        "txt2img",
        "unload-checkpoint",
    ]
    assert fake.checkpoint_calls_while_generating == 0
    wait_for(
        lambda: api.get("/sdapi/v1/memory").json()["cuda"]["allocated"]["current"] == 0,
        what="/memory to show the freed GPU memory",
    )


def test_an_unload_during_a_running_job_answers_once_that_job_ended_and_the_memory_is_free(
    api: httpx.Client, stack: Stack, fake: FakeA1111
) -> None:
    api.post("/sdapi/v1/reload-checkpoint")
    mark = len(fake.timeline)
    job_id = api.post(
        "/sdapi/v1/txt2img",
        json={"prompt": "slow", "fake_seconds": 1.0},
        headers={"Prefer": "respond-async"},
    ).json()["id"]
    stack.wait_status(job_id, "processing")
    response = api.post("/sdapi/v1/unload-checkpoint")
    assert response.status_code == 200 and response.json() == {}
    assert "x-proxy-note" not in response.headers and not fake.loaded
    assert stack.job(job_id)["status"] == "completed"
    assert fake.timeline[mark:] == ["txt2img", "unload-checkpoint"]
    assert fake.checkpoint_calls_while_generating == 0


def test_a_backend_still_busy_at_the_bound_gets_it_after_its_job_and_the_answer_says_so(
    stack: Stack, fake: FakeA1111
) -> None:
    with another_api(stack, A1111_PROXY_CHECKPOINT_WAIT_SECONDS="0.2") as api:
        before = len(fake.timeline)
        api.post("/sdapi/v1/reload-checkpoint")  # it may answer at the bound, before A1111 has it
        wait_for(lambda: "reload-checkpoint" in fake.timeline[before:], what="the reload")
        mark = len(fake.timeline)
        job_id = api.post(
            "/sdapi/v1/txt2img",
            json={"prompt": "slow", "fake_seconds": 2.0},
            headers={"Prefer": "respond-async"},
        ).json()["id"]
        wait_for(
            lambda: api.get(f"/sdapi/v1/jobs/{job_id}").json()["status"] == "processing",
            what="the job to run",
        )
        response = api.post("/sdapi/v1/unload-checkpoint")
        assert response.status_code == 200 and response.json() == {}
        note = response.headers["x-proxy-note"]
        assert fake.url in note and "running job" in note  # type: ignore[attr-defined]
        assert fake.loaded  # not during the job
        wait_for(
            lambda: fake.timeline[mark:] == ["txt2img", "unload-checkpoint"],
            what="the unload after the job",
        )
        assert fake.checkpoint_calls_while_generating == 0


def test_every_a1111_route_works_or_answers_a_404_that_names_it_and_the_alternative(
    api: httpx.Client,
) -> None:
    for method, path, body in A1111_ROUTES:
        response = api.request(method, path, json=body)
        if path in NOT_OFFERED:
            assert response.status_code == 404, (path, response.text)
            detail = response.json()["detail"]
            assert detail == f"a1111-proxy does not offer {method} {path}: {NOT_OFFERED[path]}"
        else:
            assert response.status_code == 200, (path, response.text)
            assert response.headers["content-type"] == "application/json"
    for path, reason in NOT_OFFERED.items():  # each says what to do instead
        assert "/sdapi/v1/" in reason or "a1111-proxy serve" in reason, path


def test_without_a_worker_unload_answers_at_once_and_memory_is_the_apis_own(
    tmp_path: Any, fake: FakeA1111
) -> None:
    alone = Stack(tmp_path, [fake.url])  # type: ignore[attr-defined]
    try:
        api = alone.start_api()
        mark = len(fake.timeline)
        response = api.post("/sdapi/v1/unload-checkpoint", json="")
        assert response.status_code == 200 and response.json() == {}
        assert "no worker is running" in response.headers["x-proxy-note"]
        assert fake.timeline[mark:] == []
        memory = api.get("/sdapi/v1/memory").json()
        assert set(memory["ram"]) == {"free", "used", "total"}
        assert 0 < memory["ram"]["used"] < memory["ram"]["total"]
        assert "no backend has reported its memory yet" in memory["cuda"]["error"]
    finally:
        alone.close()
