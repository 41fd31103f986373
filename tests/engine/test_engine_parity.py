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
