"""Prompt editing schedules and hires fix parameters, the engine's plain-Python half: A1111's own
doctest vectors for `get_learned_conditioning_prompt_schedules`, hires sizes and infotext. None of
this needs torch (the API's 422 for an upscaler the engine does not have is in
tests/integration/test_engine_api.py)."""

from __future__ import annotations

import random

import pytest

from a1111_proxy.engine.errors import InvalidParams
from a1111_proxy.engine.hires import IMAGE_UPSCALERS, LATENT_MODES, latent_upscale_modes, upscalers
from a1111_proxy.engine.infotext import Generation, ModelInfo
from a1111_proxy.engine.params import Params
from a1111_proxy.engine.schedule import prompt_schedule

ALTERNATING = [(n, "a" if n % 2 else "(b:1.1)") for n in range(1, 11)]
# A1111's doctests (modules/prompt_parser.py), 10 steps.
A1111_CASES = [
    ("test", [(10, "test")]),
    ("a [b:3]", [(3, "a "), (10, "a b")]),
    ("a [b: 3]", [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", [(10, "a [unbalanced")]),
    ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
    ("a [{b|d{:.5] c", [(5, "a  c"), (10, "a {b|d{ c")]),
    ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", ALTERNATING),
    ("[fe|]male", [(n, "female" if n % 2 else "male") for n in range(1, 11)]),
    ("[fe|||]male", [(n, "female" if n % 4 == 1 else "male") for n in range(1, 11)]),
]


def params(**body: object) -> Params:
    return Params.from_payload("txt2img", {"prompt": "a cat", **body}, rng=random.Random(0))


@pytest.mark.parametrize(("prompt", "expected"), A1111_CASES)
def test_prompt_schedules_match_a1111s_doctests(
    prompt: str, expected: list[tuple[int, str]]
) -> None:
    assert prompt_schedule(prompt, 10) == expected


def test_a1111s_fantasy_landscape_example_switches_at_the_documented_steps() -> None:
    prompt = (
        "fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75]"
        "[ in foreground::0.6][: in background:0.25] [shoddy:masterful:0.5]"
    )
    assert prompt_schedule(prompt, 100) == [
        (25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
        (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
        (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
        (75, "fantasy landscape with a lake and an oak in background masterful"),
        (100, "fantasy landscape with a lake and a christmas tree in background masterful"),
    ]


def test_edits_at_the_ends_collapse_to_one_prompt_and_plain_prompts_stay_as_typed() -> None:
    assert prompt_schedule("[cat:dog:1.0]", 20) == [(20, "cat")]
    assert prompt_schedule("[cat:dog:20]", 20) == [(20, "cat")]
    assert prompt_schedule("[cat:dog:0]", 20) == [(20, "dog")]
    assert prompt_schedule("a [cat::5] b", 10) == [(5, "a cat b"), (10, "a  b")]
    for plain in ["a (word:1.2) [x] \\[y:3\\]", "(a|b) [c:3]", "a BREAK b, <lora:x:1>", ""]:
        assert prompt_schedule(plain, 10) == [(10, plain)]


def test_hires_pass_schedules_count_on_from_the_first_pass() -> None:
    # A1111: in the second pass a fraction F is (F - 1) * hires steps, a step N is N - steps.
    assert prompt_schedule("a [b:.5] c", 10, 10) == [(10, "a b c")]
    assert prompt_schedule("a [b:1.5] c", 10, 10) == [(5, "a  c"), (10, "a b c")]
    assert prompt_schedule("a [b:13] c", 10, 10) == [(3, "a  c"), (10, "a b c")]


def test_hires_fix_is_parsed_with_a1111s_target_size_and_defaults() -> None:
    p = params(enable_hr=True, width=64, height=96, denoising_strength=0.4)
    assert p.hires is not None and p.hires.upscaler == "Latent"
    assert (p.hires.target_width, p.hires.target_height) == (128, 192)
    assert p.hires.prompt == "a cat" and p.hires.steps == 0 and p.denoising_strength == 0.4
    assert params(enable_hr=True).hires.denoising_strength == 0.7  # type: ignore[union-attr]
    assert params(enable_hr=False).hires is None
    one_side = params(enable_hr=True, width=64, height=96, hr_resize_x=128).hires
    assert one_side is not None and (one_side.target_width, one_side.target_height) == (128, 192)
    cropped = params(enable_hr=True, width=64, height=64, hr_resize_x=128, hr_resize_y=96).hires
    assert cropped is not None and cropped.latent_size == (16, 12)


def test_hires_infotext_fields_are_a1111s_in_its_order() -> None:
    p = params(
        enable_hr=True,
        hr_scale=2,
        hr_upscaler="Latent",
        hr_second_pass_steps=10,
        denoising_strength=0.4,
        steps=20,
        seed=1,
        width=64,
        height=64,
    )
    line = Generation(p, ModelInfo("tiny", None), [1], [2]).infotext(0).splitlines()[-1]
    assert line.startswith("Steps: 20, Sampler: Euler, Schedule type: Automatic, CFG scale")
    assert p.hires is not None
    extra = p.hires.infotext(p.prompt, p.negative_prompt)
    assert extra == {"Hires upscale": 2.0, "Hires steps": 10, "Hires upscaler": "Latent"}
    resized = params(enable_hr=True, hr_resize_x=1024, hr_resize_y=768, hr_prompt="a dog").hires
    assert resized is not None
    assert resized.infotext("a cat", "") == {"Hires prompt": "a dog", "Hires resize": "1024x768"}


def test_bad_hires_fields_are_refused_naming_the_field_and_the_choices() -> None:
    with pytest.raises(InvalidParams) as raised:
        params(enable_hr=True, hr_upscaler="R-ESRGAN 4x+")
    message = str(raised.value)
    assert "hr_upscaler 'R-ESRGAN 4x+'" in message
    assert all(name in message for name in [*LATENT_MODES, *IMAGE_UPSCALERS])
    for body, words in [
        ({"hr_scale": 0}, "hr_scale must be more than 0"),
        ({"hr_scale": 300}, "each side must be from 64"),
        ({"hr_resize_x": -5}, "hr_resize_x must be 0 or more"),
        ({"hr_checkpoint_name": "other.safetensors"}, "hr_checkpoint_name"),
        ({"hr_sampler_name": "Bogus"}, "hr_sampler_name/hr_scheduler: unknown sampler"),
    ]:
        with pytest.raises(InvalidParams, match=words):
            params(enable_hr=True, **body)
    params(enable_hr=False, hr_upscaler="R-ESRGAN 4x+")  # ignored when hires fix is off


def test_the_engines_upscaler_lists_have_a1111s_shape() -> None:
    assert [u["name"] for u in upscalers()] == ["None", "Lanczos", "Nearest"]
    assert set(upscalers()[0]) == {"name", "model_name", "model_path", "model_url", "scale"}
    assert latent_upscale_modes()[0] == {"name": "Latent"} and len(latent_upscale_modes()) == 6
