"""Which jobs may share one engine batch: the batch key, stored with each job at submit (plain
Python, no torch: the API computes it).

Two jobs with the same key differ only in what each job of a batch keeps for itself: its prompt
and negative prompt (and hires fix's hr_prompt and hr_negative_prompt), seeds and subseeds, batch
size, init images and its ControlNet units' control images. Everything else (checkpoint, size,
sampler and schedule, steps, CFG, the LoRA set, the hires fix settings, the ControlNet units'
layout, override_settings, ...) is in the key, so an unknown field keeps jobs apart rather than
together. Jobs the engine always runs alone (a mask, a noise mask, n_iter > 1, scripts other than
ControlNet, IP-Adapter units, DPM adaptive in either pass) get no key. The engine checks again
before it batches (engine/batch.py): the key only picks the candidates.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from a1111_proxy.engine import controlnet, hires, lora, samplers
from a1111_proxy.engine.errors import InvalidParams, UnknownSampler

# What each job of a batch keeps for itself (per-row noise, conditioning and inputs), and what
# the engine does not read at all.
OWN_FIELDS = frozenset(
    {
        "prompt",
        "negative_prompt",
        "hr_prompt",
        "hr_negative_prompt",
        "seed",
        "subseed",
        "subseed_strength",
        "seed_resize_from_w",
        "seed_resize_from_h",
        "batch_size",
        "init_images",
        "resize_mode",
        "include_init_images",
        "styles",
        "send_images",
        "save_images",
        "do_not_save_samples",
        "do_not_save_grid",
        "force_task_id",
        "infotext",
        "comments",
    }
)


def batch_key(kind: str, body: dict[str, Any], checkpoint: str | None) -> str | None:
    """The job's batch key; None: it always runs alone."""
    if kind not in ("txt2img", "img2img") or not _batchable(body):
        return None
    scripts = _scripts(body.get("alwayson_scripts"))
    if scripts is None:
        return None
    try:
        loras = lora.parse_uses(str(body.get("prompt") or ""))
    except InvalidParams:
        return None  # refused when it runs
    shared = {name: value for name, value in body.items() if name not in OWN_FIELDS}
    shared.update(kind=kind, checkpoint=checkpoint, loras=[repr(use) for use in loras])
    shared["alwayson_scripts"] = scripts
    text = json.dumps(shared, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _batchable(body: dict[str, Any]) -> bool:
    return not (
        body.get("mask")
        or body.get("noise_mask")
        or (body.get("n_iter") or 1) != 1
        or body.get("script_name")
        or _adaptive(body.get("sampler_name") or body.get("sampler_index"), body.get("scheduler"))
        or (body.get("enable_hr") and _adaptive_hires(body))
    )


def _scripts(scripts: Any) -> Any:
    """alwayson_scripts as the key sees it: ControlNet's enabled units without their control
    images (controlnet.layout). None: the job runs alone (another script with args, an
    IP-Adapter unit, a malformed unit)."""
    if not scripts or not isinstance(scripts, dict):
        return scripts or {}
    shared: dict[str, Any] = {}
    for title, value in scripts.items():
        if str(title).lower() == "controlnet":
            units = controlnet.layout({title: value})
            if units is None:
                return None
            shared[title] = units
        elif _has_args(value):
            return None
        else:
            shared[title] = value
    return shared


def _adaptive(name: Any, scheduler: Any) -> bool:
    """DPM adaptive sizes its steps over the whole batch: another job's rows would change it."""
    try:
        resolved = samplers.resolve(name, scheduler)
    except UnknownSampler:
        return True  # refused when it runs
    return resolved.sampler.adaptive


def _adaptive_hires(body: dict[str, Any]) -> bool:
    """Hires fix's second pass with DPM adaptive (hr_sampler_name, or the first pass's)."""
    name = body.get("hr_sampler_name")
    if name in hires.SAME:
        name = body.get("sampler_name") or body.get("sampler_index")
    scheduler = body.get("hr_scheduler")
    return _adaptive(name, body.get("scheduler") if scheduler in hires.SAME else scheduler)


def _has_args(script: Any) -> bool:
    return bool(script.get("args") if isinstance(script, dict) else script)
