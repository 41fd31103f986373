"""Cross-request batching end to end: the API (`a1111-proxy serve`) and a worker process running
the bundled engine (BACKEND=diffusers) on a tiny SD1.5 folder, over one SQLite file. Compatible
jobs submitted together run as one batch (the worker's log line, /metrics' running jobs), each
gets the images it gets alone, and one cancelled through the API ends alone."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.engine.conftest import TinyModels
from tests.engine.test_engine_batching import assert_same_images
from tests.stack import Stack

ADMIN = {"Authorization": "Bearer ops-token"}
# Long enough (about 5 s on two CPU cores) for the test to see the batch run and cancel a job.
SHARED = {"steps": 30, "width": 64, "height": 64, "sampler_name": "Euler a", "subseed": 11}
JOBS = [
    {"prompt": "a cat", "seed": 7, **SHARED},
    {"prompt": "a dog in a hat", "negative_prompt": "blur", "seed": 100, "batch_size": 2, **SHARED},
    {"prompt": "x", "seed": 5, "subseed_strength": 0.3, **SHARED},
]


@pytest.fixture
def stack(tmp_path: Path, tiny_models: TinyModels) -> Iterator[Stack]:
    """The API is running; the worker is not (the test starts it once its jobs are queued)."""
    tiny_models.sd15(tmp_path / "models" / "Stable-diffusion" / "tiny15")
    made = Stack(
        tmp_path,
        [],
        A1111_PROXY_BACKEND="diffusers",
        A1111_PROXY_MODELS_DIR=str(tmp_path / "models"),
        A1111_PROXY_ENGINE_DEVICE="cpu",
        A1111_PROXY_ENGINE_MAX_BATCH="4",
        A1111_PROXY_ADMIN_TOKENS="ops:ops-token",
        A1111_PROXY_LEASE_SECONDS="30",
        HF_HUB_OFFLINE="1",
    )
    try:
        made.start_api().headers.update(ADMIN)  # an operator, who may read /metrics
        yield made
    finally:
        made.close()


def running_jobs(api: httpx.Client) -> float:
    """/metrics' jobs running on the engine now (the most on any backend)."""
    text = api.get("/metrics").text
    name = "a1111_proxy_backend_running_jobs"
    found = [
        s.value for f in text_string_to_metric_families(text) if f.name == name for s in f.samples
    ]
    return max(found, default=0.0)


def test_compatible_jobs_submitted_together_run_as_one_batch_and_a_cancel_ends_one_alone(
    stack: Stack,
) -> None:
    assert stack.api is not None
    ids = [stack.submit(**body) for body in JOBS]  # queued together, before any worker runs
    worker = stack.start_worker()
    for job_id in ids:
        stack.wait_status(job_id, "processing", timeout=120)
    assert running_jobs(stack.api) == 3  # what an operator sees while the batch runs
    assert stack.api.post(f"/sdapi/v1/jobs/{ids[2]}/cancel").status_code == 200
    canceled = stack.wait_status(ids[2], "canceled", "completed", "error", timeout=120)
    done = [stack.wait_status(i, "completed", "error", timeout=120) for i in ids[:2]]
    assert canceled["status"] == "canceled"
    assert [job["status"] for job in done] == ["completed", "completed"]
    batches = [line for line in worker.output().splitlines() if "one batch of 3" in line]
    assert len(batches) == 1 and all(job_id in batches[0] for job_id in ids)

    # The same jobs, each alone (one queued at a time), give the same images.
    for body, batched in zip(JOBS[:2], done, strict=True):
        alone = stack.wait_status(stack.submit(**body), "completed", "error", timeout=120)
        assert alone["status"] == "completed"
        assert_same_images(batched["result"], alone["result"])
    assert worker.output().count("one batch of") == 1
