"""Model downloads across real processes: a worker SIGKILLed in the middle of a download leaves its
part file; once its lease expires, the next worker resumes from that file with `Range` rather
than from zero, and the file it completes is Civitai's, byte for byte."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fakes.civitai import FakeCivitai, model_bytes
from tests.servers import free_port, serve, wait_for
from tests.stack import Stack

pytestmark = pytest.mark.slow

HELD_AT = (1 << 20) + 4321


@pytest.fixture
def civitai() -> Iterator[tuple[FakeCivitai, str]]:
    fake = FakeCivitai()
    with serve(fake.app) as url:
        try:
            yield fake, url
        finally:
            fake.release()


def test_a_killed_worker_s_download_is_resumed_from_its_part_file_by_the_next_worker(
    tmp_path: Path, civitai: tuple[FakeCivitai, str]
) -> None:
    fake, url = civitai
    listed = fake.add(11, "killed", model_bytes(3 << 20, seed=11))
    fake.hold_next(after=HELD_AT)
    models = tmp_path / "models"
    models.mkdir()
    stack = Stack(
        tmp_path,
        [f"http://127.0.0.1:{free_port()}"],  # not used: BACKEND=fake
        A1111_PROXY_BACKEND="fake",
        A1111_PROXY_MODELS_DIR=str(models),
        A1111_PROXY_CIVITAI_URL=url,
        A1111_PROXY_DOWNLOAD_RESERVE_BYTES="0",
    )
    try:
        api = stack.start_api()
        added = api.post("/sdapi/v1/models/downloads", json={"source": "11"})
        assert added.status_code == 202, added.text
        link = added.headers["location"]
        first = stack.start_worker()
        part = models / "Stable-diffusion/killed.safetensors.part"
        wait_for(lambda: part.exists() and part.stat().st_size == HELD_AT, what="the part file")
        wait_for(lambda: api.get(link).json()["bytes_done"] == HELD_AT, what="the progress")
        first.kill()  # SIGKILL: no chance to give the download back
        fake.release()
        assert part.stat().st_size == HELD_AT
        assert api.get(link).json()["status"] == "running"  # until its lease expires

        stack.start_worker()
        done = wait_for(
            lambda: (shown := api.get(link).json())["status"] in ("completed", "failed") and shown,
            timeout=60,
            what="the download to end",
        )
        assert done["status"] == "completed", done
        assert done["attempts"] == 2
        files = [r for r in fake.file_requests if r.path.startswith("/files/")]
        assert [r.range for r in files] == [None, f"bytes={HELD_AT}-"]
        assert (models / "Stable-diffusion/killed.safetensors").read_bytes() == listed.data
        assert not part.exists()
        shown = httpx.get(f"{stack.base}/sdapi/v1/models/downloads", timeout=10).json()
        assert [d["id"] for d in shown["downloads"]] == [done["id"]]
    finally:
        stack.close()
