"""The engine against A1111 v1.10's own formulas, on tiny random-weight models on the CPU:
each test ports the reference computation from A1111's source (named in the test) and checks
the engine's values against it."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

torch = pytest.importorskip("torch", reason="the engine tests need the engine extra (torch)")
pytest.importorskip("diffusers", reason="the engine tests need the engine extra (diffusers)")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from a1111_proxy.backends.diffusers import DiffusersBackend  # noqa: E402
from a1111_proxy.engine import conditioning, text  # noqa: E402

if TYPE_CHECKING:
    from tests.engine.conftest import TinyModels

from tests.engine.conftest import cpu_backend  # noqa: E402
from tests.engine.results import pixels  # noqa: E402

pytestmark = [pytest.mark.engine]
SMALL = {"steps": 3, "width": 64, "height": 64, "seed": 7}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory, tiny_models: TinyModels) -> Path:
    """MODELS_DIR with the tiny SD1.5 as a single file (and its config skeleton)."""
    root = tmp_path_factory.mktemp("parity")
    source = tiny_models.sd15(root / "configs" / "sd15")
    tiny_models.write_single_file(
        source, root / "models" / "Stable-diffusion" / "tiny15.safetensors"
    )
    return root


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"  # module-wide, so that one backend (models loaded once) serves every test


@pytest.fixture(scope="module")
async def backend(models_dir: Path) -> AsyncIterator[DiffusersBackend]:
    made = cpu_backend(models_dir, preview_steps=0)
    yield made
    await made.aclose()


@pytest.fixture(scope="module")
def xl(tmp_path_factory: pytest.TempPathFactory, tiny_models: TinyModels) -> Any:
    return tiny_models.sdxl(tmp_path_factory.mktemp("parity-xl") / "tinyxl")


@pytest.fixture(scope="module")
def sd15(tmp_path_factory: pytest.TempPathFactory, tiny_models: TinyModels) -> Any:
    return tiny_models.sd15(tmp_path_factory.mktemp("parity-15") / "tiny15")


def test_an_empty_sdxl_negative_prompt_is_zero_embeddings_and_a_zero_pooled_vector(xl: Any) -> None:
    # A1111 sd_models_xl.py: force_zero_negative_prompt = is_negative_prompt and all texts == "".
    embeds = text.encode(xl, "a cat", "", clip_skip=1, sdxl=True)
    assert embeds.uncond.shape == embeds.cond.shape
    assert embeds.uncond_pooled is not None and embeds.pooled is not None
    assert embeds.uncond_pooled.shape == embeds.pooled.shape
    assert not embeds.uncond.any() and not embeds.uncond_pooled.any()
    edited = conditioning.encode(xl, "a [cat:dog:2]", "", steps=4, clip_skip=1, sdxl=True)
    assert edited.scheduled and not edited.at(3).uncond.any()
    assert edited.at(3).uncond_pooled is not None and not edited.at(3).uncond_pooled.any()


def test_a_non_empty_sdxl_negative_and_an_empty_sd15_negative_are_encoded(
    xl: Any, sd15: Any
) -> None:
    assert text.encode(xl, "a cat", "blurry", clip_skip=1, sdxl=True).uncond.any()
    assert text.encode(sd15, "a cat", "", clip_skip=1, sdxl=False).uncond.any()
    # A negative whose schedule has a non-empty text keeps "" encoded (A1111 checks all texts).
    edited = conditioning.encode(xl, "a cat", "[blurry::2]", steps=4, clip_skip=1, sdxl=True)
    assert edited.at(3).uncond.any()


def a1111_img2img_timesteps(denoising_strength: float, steps: int) -> list[float]:
    """A1111 (sd_samplers_common.setup_img2img_steps, sd_samplers_kdiffusion.sample_img2img,
    img2img_fix_steps off): t_enc = int(min(strength, 0.999) * steps), sigma_sched =
    sigmas[steps - t_enc - 1:]; the Uniform schedule's timesteps are linspace(999, 0, steps)."""
    t_enc = int(min(denoising_strength, 0.999) * steps)
    timesteps = torch.linspace(999, 0, steps, dtype=torch.float64)
    return [round(float(t), 3) for t in timesteps[steps - t_enc - 1 :]]


@pytest.mark.parametrize(("strength", "steps"), [(0.75, 20), (0.5, 7), (0.3, 10), (0.01, 8)])
def test_img2img_runs_a1111s_steps_from_a1111s_starting_sigma(
    sd15: Any, strength: float, steps: int
) -> None:
    import diffusers

    from a1111_proxy.engine import pipeline, samplers, schedulers

    scheduler = schedulers.make(sd15.scheduler.config, samplers.resolve("Euler"))
    img2img = diffusers.StableDiffusionImg2ImgPipeline(
        **{**sd15.components, "scheduler": scheduler}
    )
    seen: list[float] = []

    def record(pipe: Any, i: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        seen.append(round(float(t), 3))
        return tensors

    img2img(
        prompt="a cat",
        image=Image.new("RGB", (64, 64), (90, 120, 200)),
        strength=pipeline.img2img_strength(strength, steps),
        num_inference_steps=steps,
        output_type="latent",
        callback_on_step_end=record,
    )
    assert seen == a1111_img2img_timesteps(strength, steps)


class KDiffusionBrownianTree:
    """k-diffusion's BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed=seeds) as A1111's
    create_noise_sampler builds it: one torchsde.BrownianTree per seed, on the CPU."""

    def __init__(self, x: Any, sigmas: Any, seeds: list[int]) -> None:
        import torchsde

        t0, t1 = sigmas[sigmas > 0].min().cpu(), sigmas.max().cpu()
        w0 = torch.zeros_like(x)[0].cpu()
        self.trees = [torchsde.BrownianTree(t0, w0, t1, entropy=s) for s in seeds]

    def __call__(self, sigma: Any, sigma_next: Any) -> Any:
        t0, t1 = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        sign = 1 if t0 < t1 else -1
        a, b = (t0, t1) if t0 < t1 else (t1, t0)
        with warnings.catch_warnings():  # torchsde's clamping at float32 rounding
            warnings.simplefilter("ignore", UserWarning)
            w = torch.stack([tree(a.cpu().float(), b.cpu().float()) for tree in self.trees])
        return w * sign / (t1 - t0).abs().sqrt()


def run_scheduler(sd15: Any, name: str, seeds: list[int], *, reference: bool) -> Any:
    """Six steps of the sampler on a fixed toy model output; the engine's scheduler (with its
    Tracking) or the same diffusers scheduler fed A1111's tree noise directly."""
    from a1111_proxy.engine import samplers, schedulers

    scheduler = schedulers.make(sd15.scheduler.config, samplers.resolve(name))
    scheduler.set_timesteps(6)
    x = torch.randn((len(seeds), 4, 8, 8), generator=torch.Generator().manual_seed(3))
    tree = KDiffusionBrownianTree(x, scheduler.sigmas, seeds)
    if not reference:
        tracking = schedulers.Tracking(scheduler)
        tracking.generators = [torch.Generator().manual_seed(s) for s in seeds]
        tracking.brownian_seeds = seeds
    elif hasattr(scheduler, "noise_sampler"):
        scheduler.set_timesteps(6)
    for t in scheduler.timesteps:
        extra: dict[str, Any] = {}
        if reference and hasattr(scheduler, "noise_sampler"):
            scheduler.noise_sampler = tree
        elif reference:
            i = scheduler.index_for_timestep(t) if scheduler.step_index is None else None
            i = scheduler.step_index if i is None else i
            extra["variance_noise"] = tree(scheduler.sigmas[i], scheduler.sigmas[i + 1])
        elif "generator" in inspect.signature(scheduler.step).parameters:
            extra["generator"] = None  # as the pipelines pass it; the engine swaps in its own
        model_input = scheduler.scale_model_input(x, t)
        x = scheduler.step(0.3 * model_input + 0.1, t, x, **extra).prev_sample
    return x


@pytest.mark.parametrize("name", ["DPM++ SDE", "DPM++ 2M SDE", "DPM++ 3M SDE"])
def test_sde_samplers_take_their_noise_from_a1111s_brownian_tree_seeded_with_the_image_seeds(
    sd15: Any, name: str
) -> None:
    engine = run_scheduler(sd15, name, [11, 12], reference=False)
    again = run_scheduler(sd15, name, [11, 12], reference=False)
    expected = run_scheduler(sd15, name, [11, 12], reference=True)
    assert torch.equal(engine, again)
    torch.testing.assert_close(engine, expected)
    other = run_scheduler(sd15, name, [11, 99], reference=False)
    assert torch.equal(engine[0], other[0]) and not torch.equal(engine[1], other[1])


@pytest.mark.anyio
async def test_dpm_sde_gives_the_same_image_for_a_seed_alone_or_in_a_batch(
    backend: DiffusersBackend,
) -> None:
    body = {**SMALL, "sampler_name": "DPM++ SDE", "scheduler": "Karras"}
    alone = await backend.generate("txt2img", {**body, "seed": 8})
    batch = await backend.generate("txt2img", {**body, "batch_size": 2})
    again = await backend.generate("txt2img", {**body, "batch_size": 2})
    # seed 8 alone is the batch's second image (batched maths may differ in the last bit)
    assert np.abs(pixels(batch, 1) - pixels(alone)).max() <= 1
    assert np.array_equal(pixels(batch, 0), pixels(again, 0))


LONG = ", ".join(["a red house on a green hill"] * 4)  # over 75 tokens: two chunks


def test_the_shorter_of_prompt_and_negative_is_padded_only_under_pad_cond_uncond(
    sd15: Any,
) -> None:
    plain = text.encode(sd15, LONG, "blurry", clip_skip=1, sdxl=False)
    assert plain.cond.shape[1] == plain.uncond.shape[1] == 154
    assert not plain.uncond[:, 77:].any()  # zero tokens that attention leaves out
    padded = text.encode(sd15, LONG, "blurry", clip_skip=1, sdxl=False, pad_cond_uncond=True)
    empty = text.encode(sd15, "", "", clip_skip=1, sdxl=False).cond
    torch.testing.assert_close(padded.uncond[:, 77:], empty)


def test_unpadded_prompt_and_negative_run_the_unet_as_a1111_runs_them_apart(sd15: Any) -> None:
    # A1111 sd_samplers_cfg_denoiser: lengths differ and pad_cond_uncond is off -> the cond and
    # the uncond batches go through the model separately, each at its own token length.
    import copy

    from a1111_proxy.engine import attention

    embeds = text.encode(sd15, LONG, "blurry", clip_skip=1, sdxl=False)
    unet = copy.deepcopy(sd15.unet)
    x = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(1))
    t = torch.tensor(500)
    with torch.no_grad():
        apart = torch.cat(
            [
                unet(x[:1], t, encoder_hidden_states=embeds.uncond[:, :77]).sample,
                unet(x[1:], t, encoder_hidden_states=embeds.cond).sample,
            ]
        )
        attention.install(unet)
        batched = unet(x, t, encoder_hidden_states=torch.cat([embeds.uncond, embeds.cond])).sample
    torch.testing.assert_close(batched, apart, atol=1e-5, rtol=1e-4)


def test_linked_model_folders_and_files_are_found_and_a_link_loop_is_walked_once(
    tmp_path: Path,
) -> None:
    from a1111_proxy.engine.catalog import Catalog
    from a1111_proxy.engine.controlnet import ControlNetCatalog
    from a1111_proxy.engine.lora import LoraCatalog

    shared = tmp_path / "shared"  # another tool's models folder, linked into MODELS_DIR
    for folder, name in [("checkpoints/xl", "base"), ("loras", "style"), ("cn", "canny")]:
        (shared / folder).mkdir(parents=True)
        (shared / folder / f"{name}.safetensors").write_bytes(b"\x08" + b"\x00" * 7 + b"{}")
    models = tmp_path / "models"
    for sub in ("Stable-diffusion", "Lora", "ControlNet"):
        (models / sub).mkdir(parents=True)
    (models / "Stable-diffusion" / "linked").symlink_to(shared / "checkpoints")
    (models / "Stable-diffusion" / "one.safetensors").symlink_to(
        shared / "checkpoints" / "xl" / "base.safetensors"
    )
    (models / "Stable-diffusion" / "gone.safetensors").symlink_to(tmp_path / "nowhere")
    (shared / "checkpoints" / "xl" / "loop").symlink_to(shared / "checkpoints")
    (models / "Lora" / "styles").symlink_to(shared / "loras")
    (models / "ControlNet" / "canny.safetensors").symlink_to(shared / "cn" / "canny.safetensors")

    names = [c.name for c in Catalog(models).checkpoints]
    assert names == ["linked/xl/base.safetensors", "one.safetensors"]
    assert [f.name for f in LoraCatalog(models).files] == ["style"]
    assert [m.name for m in ControlNetCatalog(models).models] == ["canny"]


def test_unipc_runs_a1111s_bh1_variant_to_the_smallest_trained_sigma_without_nans(
    sd15: Any,
) -> None:
    # A1111: uni_pc_variant "bh1", uni_pc_order 3, skip_type time_uniform from t_T = 1 to
    # t_0 = 1/N (uni_pc.py), i.e. down to the smallest trained sigma, never to sigma 0.
    from a1111_proxy.engine import samplers, schedulers

    scheduler = schedulers.make(sd15.scheduler.config, samplers.resolve("UniPC"))
    assert scheduler.config.solver_type == "bh1" and scheduler.config.solver_order == 3
    scheduler.set_timesteps(5)
    alphas = scheduler.alphas_cumprod
    sigma_min = float(((1 - alphas[0]) / alphas[0]) ** 0.5)
    assert float(scheduler.sigmas[-1]) == pytest.approx(sigma_min, rel=1e-4)
    x = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    for t in scheduler.timesteps:
        with torch.no_grad():
            eps = sd15.unet(x, t, encoder_hidden_states=torch.ones(1, 77, 32)).sample
        x = scheduler.step(eps, t, x).prev_sample
    assert torch.isfinite(x).all()


def test_only_a_prompt_and_negative_of_different_lengths_need_their_padding_masked(
    sd15: Any, xl: Any
) -> None:
    from a1111_proxy.engine import attention

    same = text.encode(sd15, "a red house", "blurry", clip_skip=1, sdxl=False)
    apart = text.encode(sd15, LONG, "blurry", clip_skip=1, sdxl=False)
    zero_negative = text.encode(xl, "a red house", "", clip_skip=1, sdxl=True)
    assert not attention.padded(same.cond, same.uncond)
    assert attention.padded(apart.cond, apart.uncond)
    # SDXL's empty negative prompt is zeros throughout: masking all of it changes nothing.
    assert not attention.padded(zero_negative.cond, zero_negative.uncond)


@pytest.mark.anyio
async def test_a_job_runs_diffusers_own_cross_attention_unless_its_prompts_are_padded(
    backend: DiffusersBackend,
) -> None:
    from diffusers.models.attention_processor import AttnProcessor2_0

    from a1111_proxy.engine.attention import SkipPadding

    def cross_attention() -> set[type]:
        unet = backend.models.get(None).pipe.unet
        return {type(p) for name, p in unet.attn_processors.items() if "attn2" in name}

    padded = await backend.generate("txt2img", {**SMALL, "prompt": LONG, "negative_prompt": "x"})
    assert cross_attention() == {SkipPadding}
    plain = await backend.generate("txt2img", {**SMALL, "prompt": "a red house"})
    assert cross_attention() == {AttnProcessor2_0}
    again = await backend.generate("txt2img", {**SMALL, "prompt": LONG, "negative_prompt": "x"})
    assert cross_attention() == {SkipPadding}
    assert np.array_equal(pixels(padded), pixels(again))
    assert not np.array_equal(pixels(plain), pixels(padded))
