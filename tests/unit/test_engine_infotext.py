"""The infotext's schedule type, ENSD and inpainting fields against what A1111 v1.10's code
writes: its sampler options, `get_sigmas` (sd_samplers_kdiffusion.py),
`is_sampler_using_eta_noise_seed_delta` (sd_samplers_common.py) and img2img's `init`
(processing.py), ported below as small reference functions. Plain Python, no torch."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from a1111_proxy.engine.errors import UnknownSampler
from a1111_proxy.engine.infotext import Generation, ModelInfo, inpaint_fields
from a1111_proxy.engine.params import Params
from a1111_proxy.engine.samplers import SAMPLERS, SCHEDULES, resolve

# A1111 v1.10's sampler options that matter here (samplers_k_diffusion, samplers_timesteps,
# samplers_data_lcm).
A1111_OPTIONS: dict[str, dict[str, Any]] = {
    "DPM++ 2M": {"scheduler": "karras"},
    "DPM++ SDE": {"scheduler": "karras"},
    "DPM++ 2M SDE": {"scheduler": "exponential"},
    "DPM++ 2M SDE Heun": {"scheduler": "exponential"},
    "DPM++ 2S a": {"scheduler": "karras", "uses_ensd": True},
    "DPM++ 3M SDE": {"scheduler": "exponential"},
    "Euler a": {"uses_ensd": True},
    "Euler": {},
    "LMS": {},
    "Heun": {},
    "DPM2": {"scheduler": "karras"},
    "DPM2 a": {"scheduler": "karras", "uses_ensd": True},
    "DPM fast": {"uses_ensd": True},
    "DPM adaptive": {"uses_ensd": True},
    "Restart": {"scheduler": "karras"},
    "LCM": {},
}
A1111_TIMESTEPS = {"DDIM": {}, "PLMS": {}, "UniPC": {}}
# sd_schedulers.schedulers_map: name and label -> label; "Automatic" has no function.
A1111_SCHEDULERS = {
    **{key: label for key, label in SCHEDULES.items()},
    **{label: label for label in SCHEDULES.values()},
}


def a1111_schedule_type(sampler: str, scheduler: str) -> tuple[str, str | None]:
    """(the infotext's "Schedule type", extra_generation_params' one) for p.scheduler as
    fix_p_invalid_sampler_and_scheduler leaves it (a label; "Automatic" stays)."""
    if sampler in A1111_TIMESTEPS:  # get_timesteps: no schedule function, nothing recorded
        return scheduler, None
    name = scheduler if scheduler != "Automatic" else A1111_OPTIONS[sampler].get("scheduler")
    label = A1111_SCHEDULERS.get(name) if name is not None else None
    if label is None or label == "Automatic":  # model_wrap.get_sigmas; p.scheduler written
        return scheduler, None
    return label, label  # extra_generation_params["Schedule type"] overrides p.scheduler


def a1111_uses_ensd(sampler: str, eta: float | None, ensd: int) -> bool:
    options = {**A1111_OPTIONS, **A1111_TIMESTEPS}[sampler]
    if ensd == 0:
        return False
    if eta is None:  # the sampler's eta: opts.eta_ancestral (1) or eta_ddim (0)
        eta = 0.0 if sampler in A1111_TIMESTEPS else 1.0
    return eta != 0 and bool(options.get("uses_ensd", False))


def params(kind: str = "txt2img", **body: object) -> Params:
    return Params.from_payload(kind, {"prompt": "a cat", **body}, rng=random.Random(0))


def fields(text: str) -> dict[str, str]:
    line = text.split("\n")[-1]
    return dict(part.split(": ", 1) for part in line.split(", "))


def generation(p: Params) -> Generation:
    return Generation(p, ModelInfo("m", None), [1], [2])


def _cases() -> list[tuple[str, str]]:
    cases = []
    for sampler in SAMPLERS:
        labels = ["Automatic"]
        for key, label in SCHEDULES.items():
            if key == "automatic":
                continue
            try:
                resolve(sampler.name, label)
            except UnknownSampler:
                continue  # the engine refuses these
            labels.append(label)
        cases += [(sampler.name, label) for label in labels]
    return cases


@pytest.mark.parametrize(("sampler", "scheduler"), _cases())
def test_the_schedule_type_is_the_one_a1111_writes(sampler: str, scheduler: str) -> None:
    gen = generation(params(sampler_name=sampler, scheduler=scheduler, seed=1))
    written, recorded = a1111_schedule_type(sampler, scheduler)
    assert fields(gen.infotext(0))["Schedule type"] == written
    extra = json.loads(gen.info(1))["extra_generation_params"]
    assert extra.get("Schedule type") == recorded


def test_automatic_names_the_samplers_own_schedule_as_a1111_does() -> None:
    text = generation(params(sampler_name="DPM++ 2M", seed=1)).infotext(0)
    assert "Sampler: DPM++ 2M, Schedule type: Karras, CFG scale" in text
    text = generation(params(sampler_name="DPM++ 2M Karras", seed=1)).infotext(0)
    assert "Sampler: DPM++ 2M, Schedule type: Karras, CFG scale" in text
    text = generation(params(sampler_name="Euler a", seed=1)).infotext(0)
    assert "Sampler: Euler a, Schedule type: Automatic, CFG scale" in text


@pytest.mark.parametrize("sampler", [s.name for s in SAMPLERS])
@pytest.mark.parametrize("eta", [None, 0.0, 0.5])
def test_ensd_is_written_only_for_samplers_that_use_it(sampler: str, eta: float | None) -> None:
    body: dict[str, Any] = {"sampler_name": sampler, "seed": 1, "eta": eta}
    body["override_settings"] = {"eta_noise_seed_delta": 31337}
    text = generation(params(**body)).infotext(0)
    assert ("ENSD" in fields(text)) == a1111_uses_ensd(sampler, eta, 31337)
    if a1111_uses_ensd(sampler, eta, 31337):
        assert fields(text)["ENSD"] == "31337"


def test_euler_a_writes_ensd_and_euler_does_not() -> None:
    settings = {"eta_noise_seed_delta": 31337}
    ancestral = generation(params(sampler_name="Euler a", override_settings=settings))
    plain = generation(params(sampler_name="Euler", override_settings=settings))
    assert ", ENSD: 31337, " in ancestral.infotext(0)
    assert "ENSD" not in plain.infotext(0)


def a1111_inpaint_extra(
    invert: bool, blur_x: int, blur_y: int, only_masked: bool, padding: int, fill: int
) -> dict[str, Any]:
    """StableDiffusionProcessingImg2Img.init's extra_generation_params for a mask (v1.10)."""
    extra: dict[str, Any] = {}
    if invert:
        extra["Mask mode"] = "Inpaint not masked"
    if blur_x > 0 or blur_y > 0:
        extra["Mask blur"] = blur_x if blur_x == blur_y else None
    if only_masked:
        extra["Inpaint area"] = "Only masked"
        extra["Masked area padding"] = padding
    if fill == 0:
        extra["Masked content"] = "fill"
    elif fill == 2:
        extra["Masked content"] = "latent noise"
    elif fill == 3:
        extra["Masked content"] = "latent nothing"
    return {key: value for key, value in extra.items() if value is not None}


@pytest.mark.parametrize("fill", [0, 1, 2, 3])
@pytest.mark.parametrize("invert", [False, True])
@pytest.mark.parametrize(("blur_x", "blur_y"), [(4, 4), (0, 0), (2, 6)])
@pytest.mark.parametrize("only_masked", [False, True])
def test_inpainting_fields_are_a1111s_in_its_order(
    fill: int, invert: bool, blur_x: int, blur_y: int, only_masked: bool
) -> None:
    p = params(
        "img2img",
        init_images=["aGk="],
        mask="aGk=",
        inpainting_fill=fill,
        inpainting_mask_invert=int(invert),
        mask_blur_x=blur_x,
        mask_blur_y=blur_y,
        inpaint_full_res=only_masked,
        inpaint_full_res_padding=32,
    )
    got = inpaint_fields(p, only_masked=only_masked)
    want = a1111_inpaint_extra(invert, blur_x, blur_y, only_masked, 32, fill)
    assert list(got.items()) == list(want.items())


def test_an_inverted_filled_mask_writes_a1111s_infotext() -> None:
    p = params(
        "img2img",
        init_images=["aGk="],
        mask="aGk=",
        seed=5,
        steps=20,
        sampler_name="Euler a",
        inpainting_fill=0,
        inpainting_mask_invert=1,
        inpaint_full_res=True,
        inpaint_full_res_padding=32,
        denoising_strength=0.75,
    )
    gen = generation(p)
    gen.extra.update(inpaint_fields(p, only_masked=True))
    assert gen.infotext(0) == (
        "a cat\nSteps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7.0, "
        "Seed: 1, Size: 512x512, Model: m, Denoising strength: 0.75, "
        "Mask mode: Inpaint not masked, Mask blur: 4, Inpaint area: Only masked, "
        "Masked area padding: 32, Masked content: fill, Version: a1111-proxy-0.1.0"
    )


@pytest.mark.parametrize(
    ("sampler", "hr_sampler", "hr_scheduler", "written"),
    [
        ("Euler a", "DPM++ 2M", None, "Karras"),  # A1111: Karras differs from no schedule
        ("DPM++ 2M", "Euler", None, None),  # Euler runs no schedule function
        ("DPM++ 2M", "DPM++ 2M SDE", None, "Exponential"),
        ("DPM++ 2M", "DPM2", None, None),  # both Karras
        ("Euler", None, "Karras", "Karras"),
    ],
)
def test_the_hires_schedule_type_is_written_where_a1111_writes_it(
    sampler: str, hr_sampler: str | None, hr_scheduler: str | None, written: str | None
) -> None:
    p = params(
        sampler_name=sampler,
        enable_hr=True,
        hr_sampler_name=hr_sampler,
        hr_scheduler=hr_scheduler,
        denoising_strength=0.5,
    )
    assert p.hires is not None
    assert p.hires.infotext(p.prompt, p.negative_prompt).get("Hires schedule type") == written


@pytest.mark.parametrize(
    ("sampler", "eta", "written"),
    [("DPM fast", 0.5, "0.5"), ("DPM adaptive", 0.0, "0.0"), ("DPM fast", 1.0, None)],
)
def test_the_dpm_solvers_write_a_requests_eta_unless_it_is_a1111s_default(
    sampler: str, eta: float, written: str | None
) -> None:
    gen = generation(params(sampler_name=sampler, eta=eta, seed=1))
    assert fields(gen.infotext(0)).get("Eta") == written
    unset = generation(params(sampler_name=sampler, seed=1))
    assert "Eta" not in fields(unset.infotext(0))
