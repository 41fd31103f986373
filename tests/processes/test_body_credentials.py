"""Credentials some clients put in the body reach A1111 as sent, and are never shown.

SillyTavern's "auto" source (src/endpoints/stable-diffusion.js, POST /api/sd/generate) forwards
its whole request body to /sdapi/v1/txt2img: the generation fields plus `url` (the A1111 address)
and `auth` (the "user:password" string it also sends as `Authorization: Basic base64(auth)`).
Other clients send `api_key`, `password` or `token`. Real processes: API, worker, a fake A1111
that records what it receives, and a webhook receiver."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.a1111 import FakeA1111
from tests.fakes.webhook_sink import WebhookSink
from tests.servers import serve, wait_for
from tests.stack import Stack

pytestmark = pytest.mark.slow

ST_AUTH = "sillytavern:st-alice-token"  # SillyTavern's auth setting: the proxy token as password
SECRETS = {
    "auth": ST_AUTH,
    "api_key": "sk-api-key-0042",
    "password": "hunter2-pass",
    "token": "tok-0099",
}
NESTED_SECRET = "nested-token-0077"


@pytest.fixture
def stack(tmp_path: Path, database_url: str) -> Iterator[tuple[Stack, FakeA1111, WebhookSink, str]]:
    fake, receiver = FakeA1111(service_time=0.05), WebhookSink()
    with serve(fake.app) as a1111, serve(receiver.app) as hooks:
        made = Stack(
            tmp_path,
            [a1111],
            database_url,
            A1111_PROXY_API_TOKENS="alice:st-alice-token",
            A1111_PROXY_WEBHOOK_ALLOW_PRIVATE="true",
            A1111_PROXY_LOG_LEVEL="debug",
        )
        try:
            yield made, fake, receiver, hooks
        finally:
            made.close()


def sillytavern_body(a1111: str, hooks: str) -> dict[str, Any]:
    """What SillyTavern's /api/sd/generate sends on (its client's body, unchanged), with the
    other clients' credential keys and our webhook fields added."""
    return {
        "url": a1111,
        **SECRETS,
        "prompt": "a lighthouse",
        "negative_prompt": "",
        "sampler_name": "Euler a",
        "scheduler": "automatic",
        "steps": 4,
        "cfg_scale": 7,
        "width": 64,
        "height": 64,
        "restore_faces": False,
        "enable_hr": False,
        "hr_upscaler": "Latent",
        "hr_scale": 2.0,
        "denoising_strength": 0.7,
        "hr_second_pass_steps": 0,
        "override_settings": {"CLIP_stop_at_last_layers": 1},
        "override_settings_restore_afterwards": True,
        "clip_skip": 1,
        "save_images": True,
        "send_images": True,
        "do_not_save_grid": False,
        "do_not_save_samples": False,
        "alwayson_scripts": {"SomeExtension": {"args": [{"Token": NESTED_SECRET, "keep": 1}]}},
        "webhook_url": f"{hooks}/done",
    }


def assert_no_secret(text: str) -> None:
    for secret in (*SECRETS.values(), "st-alice-token", NESTED_SECRET):
        assert secret not in text


def test_credentials_in_the_body_reach_a1111_but_never_job_views_lists_webhooks_or_logs(
    stack: tuple[Stack, FakeA1111, WebhookSink, str],
) -> None:
    made, fake, receiver, hooks = stack
    api = made.start_api()
    made.start_worker()
    fake_url = made.env["A1111_PROXY_A1111_URLS"]
    body = sillytavern_body(fake_url, hooks)
    basic = "Basic " + base64.b64encode(ST_AUTH.encode()).decode()
    api.headers["Authorization"] = basic  # SillyTavern's header: its `auth`, base64
    response = api.post("/sdapi/v1/txt2img", json=body, headers={"Prefer": "respond-async"})
    assert response.status_code == 202, response.text
    assert_no_secret(response.text)
    job = response.json()
    assert job["owner"] == "alice"
    assert not set(SECRETS) & set(job["request"])
    assert job["request"]["url"] == fake_url and job["request"]["prompt"] == "a lighthouse"
    assert job["request"]["alwayson_scripts"] == {"SomeExtension": {"args": [{"keep": 1}]}}

    made.wait_status(job["id"], "completed")
    [sent] = fake.generation_requests()
    expected = {k: v for k, v in body.items() if k != "webhook_url"}
    assert sent.body == expected  # A1111 received every key, nested ones too, as sent

    shown = api.get(f"/sdapi/v1/jobs/{job['id']}")
    assert shown.json()["result"]["images"]  # the detail view, result included
    assert_no_secret(shown.text)
    listed = api.get("/sdapi/v1/jobs")
    assert job["id"] in listed.text
    assert_no_secret(listed.text)
    [hook] = wait_for(lambda: receiver.at("/done"), what="the completed webhook")
    data = json.loads(hook.body)["data"]
    assert data["id"] == job["id"] and data["status"] == "completed"
    assert data["request"]["prompt"] == "a lighthouse"
    assert_no_secret(hook.body.decode())

    for proc in made.procs:
        proc.stop()
    logs = "".join(proc.log_path.read_text() for proc in made.procs)
    assert job["id"] in logs  # the debug log was written
    assert_no_secret(logs)


def test_a1111s_refusal_echoing_the_body_shows_no_credentials_in_the_jobs_error(
    stack: tuple[Stack, FakeA1111, WebhookSink, str],
) -> None:
    made, fake, _, _ = stack
    api = made.start_api()
    api.headers["Authorization"] = "Bearer st-alice-token"
    made.start_worker()
    # A1111's handler for a request it cannot validate answers the body it received in `body`.
    echoed = {"prompt": "x", "steps": "many", **SECRETS}
    fake.fail_next(
        1,
        status=422,
        body={
            "error": "RequestValidationError",
            "detail": "steps",
            "body": echoed,
            "errors": "steps: not an integer",
        },
    )
    job_id = made.submit(**SECRETS)
    failed = made.wait_status(job_id, "error")
    assert failed["error"]["backend_status"] == 422
    assert failed["error"]["backend_body"]["body"] == {"prompt": "x", "steps": "many"}
    assert_no_secret(api.get(f"/sdapi/v1/jobs/{job_id}").text)
