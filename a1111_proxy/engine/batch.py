"""Cross-request batching (torch): several compatible jobs run as one pipeline call.

The worker claims up to ENGINE_MAX_BATCH queued jobs with the same batch key (engine/compat.py)
and the backend hands them here together. Each job keeps its own prompt, negative prompt, seeds
and subseeds: its rows of the batch get the initial noise, step noise and conditioning they get
when it runs alone (A1111's seed semantics), so its images are the same. Hires fix runs both
passes batched (each job's rows upscaled in between, its hires prompts in the second pass);
ControlNet units of the same layout steer each job's rows with its own control images. A job
that does not fit the shared call after all (a mask, image prompts, resize mode 3, n_iter > 1,
prompt editing, another LoRA set, size, hires fix or ControlNet layout, an inpainting
checkpoint) runs alone after it; jobs whose conditionings differ in length (a prompt past 75
tokens) run as separate batches.

A job whose inputs fail (a bad init image) fails alone, before the batch starts. A job cancelled
or interrupted during the batch ends at the next step: interrupted (or skipped), it answers with
its rows' current estimate, decoded as when it runs alone; cancelled, with nothing. Its rows stay
in the pipeline call until it ends and are then thrown away: the samplers keep per-row history
(multistep solvers, step noise) that cannot be cut without touching the other jobs' rows. Hires
fix's second pass is a new call: it runs only the jobs still wanted.
A batch that runs out of memory is run again one job at a time (each as it runs alone).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from a1111_proxy.engine import adapters, attention, conditioning, control, schedulers, text, upscale
from a1111_proxy.engine.config import EngineConfig
from a1111_proxy.engine.errors import Canceled
from a1111_proxy.engine.hires import Hires
from a1111_proxy.engine.images import LATENT_RESIZE
from a1111_proxy.engine.infotext import Generation
from a1111_proxy.engine.models import Loaded, Models, free_memory
from a1111_proxy.engine.params import Params
from a1111_proxy.engine.pipeline import (
    Inputs,
    RunState,
    answer,
    call_kwargs,
    check_hires,
    encode_prompts,
    enter_img2img,
    generate,
    hires_prompts,
    initial_noise,
    per_image,
    prepare_inputs,
    run_scheduler,
    run_strength,
    steered,
    task_pipeline,
    throwaway_generators,
    tile_vae,
    vae_and_embeddings,
)

log = logging.getLogger("a1111_proxy.engine")

Answer = Callable[[dict[str, Any] | BaseException], None]


@dataclass
class Member:
    """One job of a batch: `done` is called once, from the engine thread, with its answer."""

    params: Params
    state: RunState
    done: Answer
    answered: bool = False

    def settle(self, value: dict[str, Any] | BaseException) -> None:
        if not self.answered:
            self.answered = True
            self.done(value)


@dataclass
class _Ready:
    """A member whose inputs and conditioning are prepared, and its rows of the batch."""

    member: Member
    generation: Generation
    inputs: list[Inputs]
    embeds: conditioning.Conditioning
    seeds: list[int]
    subseeds: list[int]
    units: control.Control | None = None  # its ControlNet units, with its control images
    hires_embeds: conditioning.Conditioning | None = None  # hires fix's prompts
    start: Any = None  # hires fix: its rows upscaled, the second pass's start
    rows: slice = field(default_factory=lambda: slice(0, 0))


def generate_batch(models: Models, config: EngineConfig, members: list[Member]) -> None:
    """Run `members` (compatible jobs) as few pipeline calls as their inputs allow; every
    member is answered (its result, or the error that ended it)."""
    try:
        _generate(models, config, members)
    except Exception as exc:  # a load or a pipeline failure: every job not yet answered
        for member in members:
            member.settle(exc)


def _generate(models: Models, config: EngineConfig, members: list[Member]) -> None:
    loaded = models.get(members[0].params.checkpoint)
    shared = _shared(members[0].params, loaded)
    together = [m for m in members if shared is not None and _shared(m.params, loaded) == shared]
    alone = [m for m in members if m not in together]
    if len(together) > 1:
        uses = together[0].params.loras  # merged into the weights for the batch (adapters.py)
        with adapters.fused(loaded.pipe, models.config.models_dir, uses) as hashes:
            ready = [r for r in (_prepare(models, loaded, m, hashes) for m in together) if r]
            groups: dict[Any, list[_Ready]] = {}
            for item in ready:
                passes = [item.embeds, item.hires_embeds]
                if any(e is not None and e.scheduled for e in passes):
                    alone.append(item.member)  # prompt editing: its conditioning changes per step
                else:
                    signature = tuple(_signature(e.first) for e in passes if e is not None)
                    groups.setdefault(signature, []).append(item)
            for group in groups.values():
                _run_group(models, config, loaded, group)
    else:
        alone = members
    for member in alone:
        _run_alone(models, config, member)


def _shared(params: Params, loaded: Loaded) -> tuple[Any, ...] | None:
    """What every job of one pipeline call must share; None: this job runs alone."""
    hires = params.hires
    if (
        params.mask is not None
        or params.image_prompts
        or params.resize_mode == LATENT_RESIZE  # its start is encoded per image
        or params.n_iter != 1
        or loaded.inpainting
        or params.sampler.sampler.adaptive  # DPM adaptive
        or (hires is not None and hires.sampler.sampler.adaptive)
    ):
        return None
    return (
        params.kind,
        params.checkpoint,
        params.width,
        params.height,
        params.sampler,
        params.steps,
        params.cfg_scale,
        params.eta,
        params.eta_ancestral,
        params.eta_ddim,
        params.denoising_strength if params.kind == "img2img" or hires else None,
        params.randn_source,
        params.eta_noise_seed_delta,
        params.loras,
        params.sd_vae,
        # hires fix but for its prompts; ControlNet units but for their images (each job's own)
        None if hires is None else dataclasses.replace(hires, prompt="", negative_prompt=""),
        tuple(dataclasses.replace(unit, image=None) for unit in params.controlnet_units),
    )


def _signature(embeds: Any) -> tuple[Any, ...]:
    parts = (embeds.cond, embeds.uncond, embeds.pooled, embeds.uncond_pooled)
    return tuple(None if z is None else tuple(z.shape) for z in parts)


def _prepare(models: Models, loaded: Loaded, member: Member, hashes: str | None) -> _Ready | None:
    """The member's inputs, control images and conditioning, with its infotext fields in the
    order a job alone writes them (engine/pipeline.py); a failure ends this member only."""
    params = member.params
    try:
        seeds, subseeds = params.all_seeds(), params.all_subseeds()
        generation = Generation(params, loaded.info, seeds, subseeds)
        inputs = [prepare_inputs(params, generation, n) for n in range(len(params.init_images))]
        if hashes:
            generation.extra["Lora hashes"] = hashes
        units = control.prepare(models, loaded, params)
        if units is not None:
            generation.extra.update(units.infotext)
        words = vae_and_embeddings(models, loaded, params, generation)
        embeds = encode_prompts(loaded, params, words)
        hires_embeds = None
        if params.hires is not None:
            check_hires(params, loaded, generation)
            hires_embeds = hires_prompts(loaded, params, words)
    except Exception as exc:
        member.settle(exc)
        return None
    if words.ti_hashes:
        generation.extra["TI hashes"] = words.ti_hashes
    member.state.job_count = 2 if params.hires else 1  # A1111 counts the second pass as a job
    return _Ready(
        member, generation, inputs or [Inputs()], embeds, seeds, subseeds, units, hires_embeds
    )


def _run_alone(models: Models, config: EngineConfig, member: Member) -> None:
    if member.state.cancel.is_set():
        member.settle(Canceled())
        return
    try:
        member.settle(generate(models, config, member.params, member.state))
    except Exception as exc:
        member.settle(exc)


def _run_group(models: Models, config: EngineConfig, loaded: Loaded, group: list[_Ready]) -> None:
    """One pipeline call for the group's rows, each member's rows in turn (two with hires fix)."""
    head = group[0].member.params
    starts = None
    if head.kind == "img2img":
        starts = [per_image(i.inputs, len(i.seeds), "init") for i in group]
    passes = [i.member.params for i in group]
    embeds = [i.embeds for i in group]
    first = _call(models, config, loaded, group, passes, embeds, [i.units for i in group], starts)
    if first is None:
        return
    if head.hires is not None:
        _second_pass(models, config, loaded, group, head.hires, first)
        return
    made = upscale.as_images(loaded.pipe, first)
    for item in group:
        _answer(item, made[item.rows])


def _second_pass(
    models: Models,
    config: EngineConfig,
    loaded: Loaded,
    group: list[_Ready],
    hires: Hires,
    first: list[torch.Tensor],
) -> None:
    """Hires fix for the group, as engine/pipeline.py runs it for a job alone: each member's
    rows upscaled, then one img2img call at the new size with each member's hires prompts,
    seeds, subseeds and control images. A member interrupted by now keeps its first pass."""
    decoded = None if hires.latent else upscale.as_images(loaded.pipe, first)
    going = []
    for item in group:
        own = first[item.rows] if decoded is None else decoded[item.rows]
        state = item.member.state
        if item.member.answered:
            continue
        if state.cancel.is_set():
            item.member.settle(Canceled())
        elif state.interrupt.is_set() or state.skip.is_set():
            _answer(item, upscale.as_images(loaded.pipe, own))
        else:
            item.start = upscale.upscale(own, hires)
            going.append(item)
    # Each member's own second pass (its hires prompts; the rest is the same for all).
    passes = [upscale.second_pass_params(i.member.params, _hires(i)) for i in going]
    second = [p for p in passes if p is not None]
    if len(second) < len(going):  # strength 0: nothing to denoise
        for item in going:
            _answer(item, upscale.as_images(loaded.pipe, item.start))
        return
    if not going:
        return
    for item in going:
        item.member.state.job_no, item.member.state.step = 1, 0
    width, height = second[0].width, second[0].height
    units = [None if i.units is None else control.resized(i.units, width, height) for i in going]
    embeds = [i.hires_embeds for i in going if i.hires_embeds is not None]
    starts = [i.start for i in going]
    made = _call(models, config, loaded, going, second, embeds, units, starts)
    if made is None:
        return
    images = upscale.as_images(loaded.pipe, made)
    for item in going:
        _answer(item, images[item.rows])


def _hires(item: _Ready) -> Hires:
    assert item.member.params.hires is not None
    return item.member.params.hires


def _call(
    models: Models,
    config: EngineConfig,
    loaded: Loaded,
    group: list[_Ready],
    passes: list[Params],
    conditionings: list[conditioning.Conditioning],
    units: list[control.Control | None],
    starts: list[Any] | None,
) -> list[torch.Tensor] | None:
    """One pipeline call of the group's rows, each member with its own params of this pass
    (`passes`: what they share is the same), conditioning, control images and img2img start
    (`starts`: images, or hires fix's latents). Its latents, one per row; None when no member
    wants them any more (or the call ran out of memory and its jobs ran one at a time)."""
    rows = 0
    for item in group:
        item.rows = slice(rows, rows + len(item.seeds))
        rows += len(item.seeds)
    head = passes[0]
    scheduler = run_scheduler(loaded, head)
    tracking = schedulers.Tracking(scheduler)
    pipe = task_pipeline(loaded, head.kind, scheduler, (head.height, head.width, rows))
    drawn = [
        initial_noise(models, p, i.seeds, i.subseeds) for i, p in zip(group, passes, strict=True)
    ]
    latents = torch.cat([d.latents for d in drawn])
    tracking.generators = [g for d in drawn for g in d.generators]
    seeds = [s for item in group for s in item.seeds]
    if head.sampler.sampler.brownian:
        tracking.brownian_seeds = seeds
    embeds = [c.first for c in conditionings]
    kwargs = call_kwargs(pipe, head, embeds[0], rows, models.dtype)
    kwargs.update(_stacked(group, embeds, models.dtype))
    kwargs["output_type"] = "latent"  # decoded by the caller (engine/precision.py's fallback)
    kwargs["generator"] = throwaway_generators(tracking.generators, seeds)
    if starts is None:
        kwargs["latents"] = latents  # fp32, as the steps keep them (engine/precision.py)
    else:
        kwargs.update(image=_joined(starts), strength=run_strength(head))
        tracking.noise = latents
    kwargs["callback_on_step_end"] = _callback(group, tracking, config, models, loaded)
    padded = any(c.padded for c in conditionings)
    if units[0] is not None:
        steering = [u for u in units if u is not None]
        counts = [len(item.seeds) for item in group]
        arguments = control.call_kwargs(steering[0], head.kind, control.per_row(steering, counts))
        pipe = steered(pipe, steering[0], kwargs, arguments, masking=padded)
    # Zero padding of prompt/negative stays out of attention (decided once for the batch).
    attention.install(pipe.unet, masking=padded)
    enter_img2img(pipe, head)
    tile_vae(pipe, config, head.width, head.height)
    if all(item.member.answered for item in group):
        return None
    try:
        with torch.inference_mode():
            return list(pipe(**kwargs).images)
    except Exception as exc:
        if not out_of_memory(exc):
            raise
        del exc  # its traceback holds the batch's tensors
        _one_at_a_time(models, config, group)
        return None


def _joined(starts: list[Any]) -> Any:
    """The members' img2img starts as one batch: latents concatenated, or one image list."""
    if isinstance(starts[0], torch.Tensor):
        return torch.cat(starts)
    return [image for start in starts for image in start]


def out_of_memory(exc: BaseException) -> bool:
    """torch's out-of-memory error, or a RuntimeError saying so (MPS, oneDNN, older CUDA)."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


def _one_at_a_time(models: Models, config: EngineConfig, group: list[_Ready]) -> None:
    """The batch did not fit: its jobs not yet answered run alone, one after another (each
    gets the images it gets alone; one that does not fit alone fails alone)."""
    free_memory()
    waiting = [item.member for item in group if not item.member.answered]
    log.warning("a batch of %d jobs ran out of memory; running them one at a time", len(waiting))
    for member in waiting:
        _run_alone(models, config, member)


def _stacked(
    group: list[_Ready], embeds: list[text.Embeds], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Each member's embeddings repeated for its rows, the members one after another."""

    def rows(name: str) -> torch.Tensor:
        parts = [getattr(e, name) for e in embeds]
        return torch.cat(
            [z.expand(len(i.seeds), *z.shape[1:]) for i, z in zip(group, parts, strict=True)]
        ).to(dtype)

    stacked = {"prompt_embeds": rows("cond"), "negative_prompt_embeds": rows("uncond")}
    if embeds[0].pooled is not None:
        stacked["pooled_prompt_embeds"] = rows("pooled")
        stacked["negative_pooled_prompt_embeds"] = rows("uncond_pooled")
    return stacked


def _answer(item: _Ready, made: list[Any]) -> None:
    member = item.member
    if member.answered:
        return
    member.state.job_no, member.state.step = member.state.job_count, 0
    try:
        member.settle(answer(member.params, item.generation, item.inputs, made, item.units))
    except Exception as exc:
        member.settle(exc)


def _callback(
    group: list[_Ready],
    tracking: schedulers.Tracking,
    config: EngineConfig,
    models: Models,
    loaded: Loaded,
) -> Any:
    """Each member's progress and preview; a member cancelled or interrupted ends here."""

    def on_step_end(pipe: Any, i: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        x0 = tracking.last_x0
        latents = tensors["latents"]
        estimate = x0 if x0 is not None and x0.shape == latents.shape else latents
        for item in group:
            state = item.member.state
            if item.member.answered:
                continue
            state.step, state.steps = i + 1, getattr(pipe, "num_timesteps", 0) or state.steps
            if state.preview_due(i + 1, config.preview_steps):
                first = estimate[item.rows.start]
                state.current_image = models.previews.png_base64(first, sdxl=loaded.sdxl)
            if state.cancel.is_set():
                item.member.settle(Canceled())
            elif state.interrupt.is_set() or state.skip.is_set():
                # A1111 keeps the current x0 estimate, as the job would alone.
                _answer(item, upscale.as_images(loaded.pipe, estimate[item.rows]))
        if all(item.member.answered for item in group):
            pipe._interrupt = True  # nobody wants the rest
        return tensors

    return on_step_end
