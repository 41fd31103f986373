"""The batch key the API stores with each job (a1111_proxy/engine/compat.py): hires fix jobs and
ControlNet jobs share a key when only what each job keeps for itself differs (its prompts, hires
prompts, seeds and control images), and get another key when their settings or units differ."""

from __future__ import annotations

from typing import Any

from a1111_proxy.engine.compat import batch_key

BASE = {"prompt": "a cat", "seed": 7, "steps": 4, "width": 64, "height": 64}
HIRES = {
    "enable_hr": True,
    "hr_scale": 2,
    "hr_upscaler": "Latent",
    "hr_second_pass_steps": 2,
    "denoising_strength": 0.5,
}
UNIT = {"enabled": True, "module": "canny", "model": "tiny_canny", "weight": 1.0, "image": "AAA"}


def key(body: dict[str, Any], kind: str = "txt2img") -> str | None:
    return batch_key(kind, body, "tiny15")


def controlnet(*units: dict[str, Any], title: str = "ControlNet") -> dict[str, Any]:
    return {"alwayson_scripts": {title: {"args": list(units)}}}


def test_hires_jobs_with_the_same_settings_share_a_key_whatever_their_hires_prompts() -> None:
    shared = key({**BASE, **HIRES})
    assert shared is not None and shared != key(BASE)
    other = {**BASE, **HIRES, "prompt": "a dog", "seed": 3, "batch_size": 2}
    assert key({**other, "hr_prompt": "a dog, sharp", "hr_negative_prompt": "blur"}) == shared


def test_hires_jobs_with_other_hires_settings_get_other_keys() -> None:
    shared = key({**BASE, **HIRES})
    for changed in (
        {"hr_scale": 1.5},
        {"hr_resize_x": 128, "hr_resize_y": 96},
        {"hr_upscaler": "Lanczos"},
        {"hr_second_pass_steps": 3},
        {"denoising_strength": 0.6},
        {"hr_sampler_name": "Euler"},
        {"hr_scheduler": "Karras"},
        {"hr_checkpoint_name": "other"},
    ):
        assert key({**BASE, **HIRES, **changed}) not in (shared, None), changed


def test_a_hires_second_pass_with_dpm_adaptive_runs_alone() -> None:
    assert key({**BASE, **HIRES, "hr_sampler_name": "DPM adaptive"}) is None
    assert key({**BASE, **HIRES, "sampler_name": "DPM adaptive"}) is None


def test_controlnet_jobs_with_the_same_units_share_a_key_whatever_their_control_images() -> None:
    shared = key({**BASE, **controlnet(UNIT)})
    assert shared is not None and shared != key(BASE)
    others = [
        {**UNIT, "image": "BBB"},
        {**UNIT, "input_image": "CCC", "image": None},
        {**UNIT, "image": {"image": "DDD", "mask": "EEE"}},
    ]
    for unit in others:
        assert key({**BASE, "prompt": "a dog", **controlnet(unit)}) == shared
    disabled = {**UNIT, "enabled": False, "model": "x"}  # the engine does not read it
    assert key({**BASE, **controlnet(UNIT, disabled)}) == shared


def test_controlnet_jobs_with_another_unit_layout_get_other_keys() -> None:
    shared = key({**BASE, **controlnet(UNIT)})
    layouts: list[dict[str, Any]] = [
        controlnet(UNIT, UNIT),
        controlnet({**UNIT, "model": "tiny_scribble"}),
        controlnet({**UNIT, "module": "invert"}),
        controlnet({**UNIT, "weight": 0.5}),
        controlnet({**UNIT, "guidance_start": 0.2}),
        controlnet({**UNIT, "guidance_end": 0.8}),
        controlnet({**UNIT, "control_mode": 2}),
        controlnet({**UNIT, "resize_mode": 0}),
        controlnet({**UNIT, "pixel_perfect": True}),
        controlnet({**UNIT, "processor_res": 256}),
        controlnet({**UNIT, "threshold_a": 50}),
    ]
    for body in layouts:
        assert key({**BASE, **body}) not in (shared, None), body


def test_ip_adapter_units_other_scripts_and_malformed_units_run_alone() -> None:
    image_prompt = {**UNIT, "module": "ip-adapter_clip_sd15", "model": "ip-adapter_sd15"}
    assert key({**BASE, **controlnet(UNIT, image_prompt)}) is None
    assert key({**BASE, "alwayson_scripts": {"ADetailer": {"args": [True]}}}) is None
    assert key({**BASE, "alwayson_scripts": {"ControlNet": {"args": ["not a unit"]}}}) is None
    assert key({**BASE, "alwayson_scripts": {"ADetailer": {"args": []}}}) is not None
