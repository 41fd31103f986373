"""The engine against A1111 v1.10's own formulas, on tiny random-weight models on the CPU:
each test ports the reference computation from A1111's source (named in the test) and checks
the engine's values against it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

torch = pytest.importorskip("torch", reason="the engine tests need the engine extra (torch)")
pytest.importorskip("diffusers", reason="the engine tests need the engine extra (diffusers)")

from a1111_proxy.engine import conditioning, text  # noqa: E402

if TYPE_CHECKING:
    from tests.engine.conftest import TinyModels

pytestmark = [pytest.mark.engine]


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
    from PIL import Image

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
