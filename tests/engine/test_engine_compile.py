"""ENGINE_COMPILE on the tiny models, on the CPU: one compiled UNet per (height, width, batch
rows) bucket, reused by later jobs of the bucket. The compiler is torch.compile with dynamo's
"eager" backend (it traces the UNet as it would for inductor, then runs the captured graphs
as they are), wrapped to count what it compiles."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

torch = pytest.importorskip("torch", reason="the engine tests need the engine extra (torch)")
pytest.importorskip("diffusers", reason="the engine tests need the engine extra (diffusers)")

from a1111_proxy.backends.diffusers import DiffusersBackend  # noqa: E402
from tests.engine.test_engine import make_backend, models_dir, pixels  # noqa: E402, F401

if TYPE_CHECKING:
    from tests.engine.conftest import TinyModels

pytestmark = [pytest.mark.anyio, pytest.mark.engine]
SMALL = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "seed": 7}
HIRES = {"enable_hr": True, "hr_scale": 2, "denoising_strength": 0.5, "hr_second_pass_steps": 1}


class CountingCompiler:
    """torch.compile on dynamo's eager backend; counts the compiled wrappers it makes and the
    graphs dynamo hands the backend (a new graph means dynamo traced again)."""

    def __init__(self) -> None:
        self.wrappers = 0
        self.graphs = 0

    def __call__(self, unet: Any) -> Any:
        self.wrappers += 1

        def backend(graph: Any, example_inputs: Any) -> Any:
            self.graphs += 1
            return graph.forward

        return torch.compile(unet, backend=backend, dynamic=False)


@pytest.fixture
async def compiling(models_dir: Path) -> AsyncIterator[tuple[DiffusersBackend, CountingCompiler]]:  # noqa: F811
    made = make_backend(models_dir, compile=True)
    compiler = made.models.compiler = CountingCompiler()
    yield made, compiler
    await made.aclose()
    torch._dynamo.reset()


async def test_a_bucket_compiles_once_and_later_jobs_of_it_compile_nothing(
    compiling: tuple[DiffusersBackend, CountingCompiler],
) -> None:
    backend, compiler = compiling
    first = await backend.generate("txt2img", SMALL)
    wrappers, graphs = compiler.wrappers, compiler.graphs
    again = await backend.generate("txt2img", {**SMALL, "prompt": "a dog", "seed": 8})
    assert (wrappers, compiler.wrappers, compiler.graphs) == (1, 1, graphs) and graphs > 0
    await backend.generate("txt2img", {**SMALL, "width": 72})  # another size: its own bucket
    assert compiler.wrappers == 2 and compiler.graphs > graphs
    await backend.generate("txt2img", {**SMALL, "batch_size": 2})  # other rows: its own too
    await backend.generate("txt2img", {**SMALL, **HIRES})  # the second pass at 128x128
    buckets = backend.models.get(None).buckets
    assert buckets is not None
    assert buckets.buckets == [(64, 64, 1), (64, 72, 1), (64, 64, 2), (128, 128, 1)]
    assert pixels(first).shape == pixels(again).shape == (64, 64, 3)


async def test_a_compiled_unet_makes_the_image_the_eager_one_makes(
    compiling: tuple[DiffusersBackend, CountingCompiler],
    models_dir: Path,  # noqa: F811
) -> None:
    backend, _ = compiling
    plain = make_backend(models_dir)
    try:
        eager = await plain.generate("txt2img", SMALL)
    finally:
        await plain.aclose()
    compiled = await backend.generate("txt2img", SMALL)
    assert abs(pixels(compiled) - pixels(eager)).max() <= 1


async def test_a_compiled_unet_runs_a_jobs_merged_lora_and_the_next_job_is_as_on_a_fresh_engine(
    compiling: tuple[DiffusersBackend, CountingCompiler],
    models_dir: Path,  # noqa: F811
    tiny_models: TinyModels,
) -> None:
    source = tiny_models.sd15(models_dir / "configs" / "sd15")
    tiny_models.kohya_lora(source, models_dir / "models" / "Lora" / "style.safetensors", seed=1)
    backend, compiler = compiling
    fresh = await backend.generate("txt2img", SMALL)
    styled = await backend.generate("txt2img", {**SMALL, "prompt": "a cat <lora:style:1>"})
    after = await backend.generate("txt2img", SMALL)
    assert abs(pixels(styled) - pixels(fresh)).max() > 10
    assert abs(pixels(after) - pixels(fresh)).max() == 0 and compiler.wrappers == 1


async def test_a_batch_of_jobs_compiles_one_bucket_for_its_rows_together(
    models_dir: Path,  # noqa: F811
) -> None:
    backend = make_backend(models_dir, compile=True, max_batch=4)
    compiler = backend.models.compiler = CountingCompiler()
    bodies = [{**SMALL, "seed": 1}, {**SMALL, "prompt": "a dog", "batch_size": 2}]
    try:
        batch = backend.batch([("txt2img", body) for body in bodies])
        runs = [r.generate("txt2img", b) for r, b in zip(batch.runners, bodies, strict=True)]
        results = await asyncio.gather(*runs)
        buckets = backend.models.get(None).buckets
    finally:
        await backend.aclose()
        torch._dynamo.reset()
    assert [len(result["images"]) for result in results] == [1, 2]
    assert buckets is not None and buckets.buckets == [(64, 64, 3)] and compiler.wrappers == 1


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_the_default_compiler_wraps_the_unet_and_lets_dynamo_keep_every_buckets_graphs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch._dynamo.config

    from a1111_proxy.engine import compiled

    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 8)
    unet = torch.nn.Linear(2, 2)
    wrapped = compiled.compile_unet(unet)
    assert compiled.eager(wrapped) is unet and compiled.eager(unet) is unet
    assert torch._dynamo.config.recompile_limit == compiled.RECOMPILE_LIMIT
