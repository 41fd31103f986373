"""The API of a proxy whose backend is the bundled engine (BACKEND=diffusers), in this process
over a SQLite file: it answers 422 for what the engine cannot run, without torch and without
models. The checks themselves are in tests/unit (test_engine_params.py, test_engine_schedule.py)."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest


@pytest.fixture
def engine_api(make_api: Callable[..., httpx.Client]) -> httpx.Client:
    return make_api(backend="diffusers")


def test_the_api_answers_422_for_what_the_engine_cannot_run(engine_api: httpx.Client) -> None:
    r = engine_api.post("/sdapi/v1/txt2img", json={"prompt": "x", "width": 500})
    assert r.status_code == 422
    assert "width must be a multiple of 8" in r.json()["detail"][0]["msg"]
    r = engine_api.post("/sdapi/v1/txt2img", json={"prompt": "x", "sampler_name": "Bogus"})
    assert r.status_code == 422 and "Euler a" in r.json()["detail"][0]["msg"]
    assert (
        engine_api.post("/sdapi/v1/txt2img", json={"prompt": "x", "width": 504}).status_code == 202
    )


def test_the_api_answers_422_for_an_unknown_upscaler_and_takes_hires_fix(
    engine_api: httpx.Client,
) -> None:
    body = {"prompt": "[cat:dog:0.5]", "enable_hr": True, "denoising_strength": 0.5}
    refused = engine_api.post("/sdapi/v1/txt2img", json={**body, "hr_upscaler": "4x-UltraSharp"})
    assert refused.status_code == 422
    assert "Latent (bicubic antialiased)" in refused.json()["detail"][0]["msg"]
    accepted = engine_api.post("/sdapi/v1/txt2img", json={**body, "hr_upscaler": "Lanczos"})
    assert accepted.status_code == 202
