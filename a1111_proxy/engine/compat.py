"""Which jobs may share one engine batch: the batch key, stored with each job at submit (plain
Python, no torch: the API computes it).

Two jobs with the same key differ only in what each job of a batch keeps for itself: its prompt
and negative prompt, seeds and subseeds, batch size and init images. Everything else (checkpoint,
size, sampler and schedule, steps, CFG, the LoRA set, override_settings, ...) is in the key, so an
unknown field keeps jobs apart rather than together. Jobs the engine always runs alone (hires
fix, a mask, a noise mask, n_iter > 1, scripts, ControlNet and image prompts, DPM adaptive) get
no key. The engine checks again before it batches (engine/batch.py): the key only picks the
candidates.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from a1111_proxy.engine import lora, samplers
from a1111_proxy.engine.errors import InvalidParams, UnknownSampler

# What each job of a batch keeps for itself (per-row noise, conditioning and inputs), and what
# the engine does not read at all.
OWN_FIELDS = frozenset(
    {
        "prompt",
        "negative_prompt",
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
    try:
        loras = lora.parse_uses(str(body.get("prompt") or ""))
    except InvalidParams:
        return None  # refused when it runs
    shared = {name: value for name, value in body.items() if name not in OWN_FIELDS}
    shared.update(kind=kind, checkpoint=checkpoint, loras=[repr(use) for use in loras])
    text = json.dumps(shared, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _batchable(body: dict[str, Any]) -> bool:
    scripts = body.get("alwayson_scripts") or {}
    return not (
        body.get("enable_hr")
        or body.get("mask")
        or body.get("noise_mask")
        or (body.get("n_iter") or 1) != 1
        or body.get("script_name")
        or (isinstance(scripts, dict) and any(_has_args(v) for v in scripts.values()))
        or _adaptive(body)
    )


def _adaptive(body: dict[str, Any]) -> bool:
    """DPM adaptive sizes its steps over the whole batch: another job's rows would change it."""
    try:
        resolved = samplers.resolve(
            body.get("sampler_name") or body.get("sampler_index"), body.get("scheduler")
        )
    except UnknownSampler:
        return True  # refused when it runs
    return resolved.sampler.adaptive


def _has_args(script: Any) -> bool:
    return bool(script.get("args") if isinstance(script, dict) else script)
