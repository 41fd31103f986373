"""BACKEND=fake: a real `serve` + `worker` with no A1111 at all."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx
import pytest

from tests.servers import free_port
from tests.stack import Stack


@pytest.mark.slow
def test_backend_fake_runs_a_real_serve_and_worker_with_no_a1111(tmp_path: Path) -> None:
    nothing_there = f"http://127.0.0.1:{free_port()}"  # A1111_URLS is not used
    stack = Stack(
        tmp_path,
        [nothing_there],
        A1111_PROXY_BACKEND="fake",
        A1111_PROXY_FAKE_SECONDS="0.05",
        A1111_PROXY_FAKE_SLOTS="2",
    )
    try:
        stack.start_api()
        stack.start_worker()
        # As an A1111 client: no Prefer header, the answer once the image is made.
        response = httpx.post(
            f"{stack.base}/sdapi/v1/txt2img",
            timeout=60,
            json={"prompt": "a cat", "seed": 3, "batch_size": 2},
        )
        assert response.status_code == 200, response.text
        body = response.json()
        images = [base64.b64decode(image) for image in body["images"]]
        assert len(images) == 2 and all(i.startswith(b"\x89PNG") for i in images)
        assert json.loads(body["info"])["all_seeds"] == [3, 4]
        health = httpx.get(f"{stack.base}/health", timeout=10).json()
        names = [slot["backend"] for slot in health["backends"]]
        assert len(names) == 2 and all(name.startswith("fake:") for name in names)
    finally:
        stack.close()
