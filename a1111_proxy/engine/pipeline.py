"""One txt2img/img2img job on a loaded model, with A1111's semantics (torch, diffusers).

`generate()` is blocking; the backend runs it in its one engine thread. It reports steps into a
`RunState` and obeys its interrupt (stop at the next step, keep what was made, as A1111 does),
skip (end the current batch at the next step as interrupt would, then go on with the next batch)
and cancel (stop at the next step, keep nothing).
"""

from __future__ import annotations

import base64
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import diffusers
import torch
from PIL import Image

from a1111_proxy.engine import (
    adapters,
    attention,
    compiled,
    conditioning,
    control,
    ddim,
    embeddings,
    images,
    ip_adapter,
    lora,
    masked_content,
    noise,
    noise_mask,
    precision,
    schedulers,
    text,
    upscale,
    vae,
)
from a1111_proxy.engine.config import EngineConfig
from a1111_proxy.engine.errors import Canceled, InvalidParams
from a1111_proxy.engine.infotext import Generation, inpaint_fields
from a1111_proxy.engine.models import Loaded, Models, assemble
from a1111_proxy.engine.params import Params

_TASKS = {
    (False, "txt2img"): "StableDiffusionPipeline",
    (False, "img2img"): "StableDiffusionImg2ImgPipeline",
    (False, "inpaint"): "StableDiffusionInpaintPipeline",
    (True, "txt2img"): "StableDiffusionXLPipeline",
    (True, "img2img"): "StableDiffusionXLImg2ImgPipeline",
    (True, "inpaint"): "StableDiffusionXLInpaintPipeline",
}


# The engine makes live previews while the last read asking for one is this recent (the worker
# asks every second while someone looks at the job).
PREVIEW_INTEREST_SECONDS = 5.0


@dataclass
class RunState:
    """Shared between the engine thread (writes) and the event loop (reads)."""

    interrupt: threading.Event = field(default_factory=threading.Event)
    cancel: threading.Event = field(default_factory=threading.Event)
    skip: threading.Event = field(default_factory=threading.Event)
    started_at: float = field(default_factory=time.monotonic)
    job_count: int = 1
    job_no: int = 0
    step: int = 0
    steps: int = 0
    current_image: str | None = None
    preview_asked_at: float | None = None  # monotonic: the last progress read with its image
    preview_step: int | None = None  # the step of the last preview made

    def preview_due(self, step: int, every: int) -> bool:
        """Whether to make a live preview at `step` (1-based): `every` steps (0: never), and
        only while someone asks for one (the worker reads it only while someone looks at the
        job): a preview costs a decode, a copy off the device and a PNG. The first after a
        pause in the asks is made at once."""
        asked = self.preview_asked_at
        if not every or asked is None or time.monotonic() - asked > PREVIEW_INTEREST_SECONDS:
            return False
        last = self.preview_step
        if last is None or last > step or step - last >= every:
            self.preview_step = step
            return True
        return False

    @property
    def progress(self) -> float:
        within = self.step / self.steps if self.steps else 0.0
        return min(1.0, (self.job_no + within) / max(self.job_count, 1))

    @property
    def eta(self) -> float | None:
        done = self.progress
        if done <= 0:
            return None
        elapsed = time.monotonic() - self.started_at
        return max(elapsed / done - elapsed, 0.0)


@dataclass
class Inputs:
    """One img2img input image (with its mask), prepared once for all batches."""

    init: Image.Image | None = None  # what the pipeline starts from, at the job's size
    mask: Image.Image | None = None  # blurred, at the job's size
    original: Image.Image | None = None  # for pasting back and the overlay; resize mode 3's
    original_mask: Image.Image | None = None
    crop: tuple[int, int, int, int] | None = None  # "Only masked": where the result goes
    batch: upscale.Batch | None = None  # hires fix: each image's own start (images or latents)
    control: control.Control | None = None  # the ControlNet units' models and images
    image_prompts: ip_adapter.ImagePrompts | None = None  # IP-Adapter units, embedded


def generate(
    models: Models, config: EngineConfig, params: Params, state: RunState
) -> dict[str, Any]:
    loaded = models.get(params.checkpoint)
    # LoRA (engine/adapters.py): every job sets its LoRAs, merged into the weights while it runs.
    with adapters.fused(loaded.pipe, models.config.models_dir, params.loras) as hashes:
        return _generate(models, config, params, state, loaded, hashes)


def _generate(
    models: Models,
    config: EngineConfig,
    params: Params,
    state: RunState,
    loaded: Loaded,
    hashes: str | None,
) -> dict[str, Any]:
    seeds, subseeds = params.all_seeds(), params.all_subseeds()
    generation = Generation(params, loaded.info, seeds, subseeds)
    inputs = [prepare_inputs(params, generation, n) for n in range(len(params.init_images))]
    inputs = inputs or [Inputs()]
    generation.is_using_inpainting_conditioning = loaded.inpainting
    if hashes:
        generation.extra["Lora hashes"] = hashes
    units = inputs[0].control = control.prepare(models, loaded, params)  # engine/control.py
    if units is not None:
        generation.extra.update(units.infotext)
    prompts = inputs[0].image_prompts = ip_adapter.prepare(models, loaded, params)
    if prompts is not None:
        generation.extra.update(prompts.infotext)
    if params.noise_mask is not None:
        generation.extra["Noise mask"] = noise_mask.describe(params.noise_mask)
    words = vae_and_embeddings(models, loaded, params, generation)
    embeds = encode_prompts(loaded, params, words)
    passes = 2 if params.hires else 1  # A1111 counts hires fix's second pass as a job
    if params.hires:
        check_hires(params, loaded, generation)
    state.job_count = params.n_iter * passes
    made: list[Image.Image] = []
    for batch in range(params.n_iter):
        if state.interrupt.is_set():
            break
        state.job_no, state.step = batch * passes, 0
        state.skip.clear()  # a skip ends one batch (A1111 clears it as each batch starts)
        window = slice(batch * params.batch_size, (batch + 1) * params.batch_size)
        first = _run_batch(
            models,
            config,
            loaded,
            params,
            embeds,
            inputs,
            state,
            seeds[window],
            subseeds[window],
            output="latent" if params.hires and params.hires.latent else "pil",
        )
        made += (
            _hires(
                models,
                config,
                loaded,
                params,
                state,
                first,
                seeds[window],
                subseeds[window],
                units,
                prompts,
                words,
            )
            if params.hires
            else first
        )
    state.job_no, state.step = state.job_count, 0
    if words.ti_hashes:
        generation.extra["TI hashes"] = words.ti_hashes
    return answer(params, generation, inputs, made, units)


def answer(
    params: Params,
    generation: Generation,
    inputs: list[Inputs],
    made: list[Image.Image],
    units: control.Control | None = None,
) -> dict[str, Any]:
    """A1111's response body for the images a job made (pasted back, with their infotexts)."""
    made = [_finish_image(image, inputs[i % len(inputs)]) for i, image in enumerate(made)]
    encoded = [images.encode_png(image, generation.infotext(i)) for i, image in enumerate(made)]
    if units is not None and made:  # the extension appends its detected maps
        encoded += [images.encode_png(m, None) for m in units.detected]
    return {
        "images": [base64.b64encode(png).decode("ascii") for png in encoded]
        if params.send_images
        else [],
        "parameters": params.parameters,
        "info": generation.info(len(made)),
    }


def encode_prompts(
    loaded: Loaded, params: Params, words: embeddings.Vocabulary
) -> conditioning.Conditioning:
    """The job's prompt and negative prompt, per step (prompt editing), LoRA tags left out."""
    return conditioning.encode(
        loaded.pipe,
        lora.strip_tags(params.prompt),
        lora.strip_tags(params.negative_prompt),
        steps=conditioning.total_steps(params.sampler, params.steps),
        clip_skip=params.clip_skip,
        sdxl=loaded.sdxl,
        pad_cond_uncond=params.pad_cond_uncond,
        vocabulary=words,
    )


def vae_and_embeddings(
    models: Models, loaded: Loaded, params: Params, generation: Generation
) -> embeddings.Vocabulary:
    """Put the job's sd_vae in place (engine/vae.py); the textual-inversion embeddings its
    prompts may name (engine/embeddings.py)."""
    models_dir = models.config.models_dir
    path = loaded.checkpoint.path
    generation.vae = vae.apply(loaded.pipe, models_dir, params.sd_vae, path)
    words = embeddings.vocabulary(models_dir, loaded.pipe, loaded.sdxl)
    words.warn_skipped([params.prompt, params.negative_prompt])
    return words


def check_hires(params: Params, loaded: Loaded, generation: Generation) -> None:
    """Refuse hires fix on an inpainting checkpoint; write its infotext fields."""
    if loaded.inpainting:
        raise InvalidParams(
            "hires fix (enable_hr) does not run on an inpainting checkpoint; pick a regular "
            "checkpoint in override_settings.sd_model_checkpoint or leave enable_hr unset"
        )
    assert params.hires is not None
    generation.extra.update(params.hires.infotext(params.prompt, params.negative_prompt))


def _hires(
    models: Models,
    config: EngineConfig,
    loaded: Loaded,
    params: Params,
    state: RunState,
    first: Any,
    seeds: list[int],
    subseeds: list[int],
    units: control.Control | None = None,
    prompts: ip_adapter.ImagePrompts | None = None,
    words: embeddings.Vocabulary | None = None,
) -> list[Image.Image]:
    """Hires fix's second pass (engine/hires.py, engine/upscale.py): upscale the first pass,
    then denoise it again at the new size, as img2img with its own noise from the same seeds."""
    hires = params.hires
    assert hires is not None
    if state.interrupt.is_set() or state.skip.is_set():  # no second pass once interrupted
        return upscale.as_images(loaded.pipe, first)
    state.job_no, state.step = state.job_no + 1, 0
    start = upscale.upscale(first, hires)
    second = upscale.second_pass_params(params, hires)
    if second is None:
        return upscale.as_images(loaded.pipe, start)
    embeds = hires_prompts(loaded, params, words)
    # ControlNet steers the second pass too, its control images fitted to the new size.
    steer = control.resized(units, second.width, second.height) if units is not None else None
    inputs = [Inputs(batch=start, control=steer, image_prompts=prompts)]
    return _run_batch(models, config, loaded, second, embeds, inputs, state, seeds, subseeds)


def hires_prompts(
    loaded: Loaded, params: Params, words: embeddings.Vocabulary | None
) -> conditioning.Conditioning:
    """Hires fix's prompt and negative prompt for its second pass, LoRA tags left out."""
    hires = params.hires
    assert hires is not None
    return conditioning.encode(
        loaded.pipe,
        lora.strip_tags(hires.prompt),
        lora.strip_tags(hires.negative_prompt),
        steps=conditioning.total_steps(params.sampler, params.steps),
        hires_steps=conditioning.total_steps(hires.sampler, hires.steps or params.steps),
        clip_skip=params.clip_skip,
        sdxl=loaded.sdxl,
        pad_cond_uncond=params.pad_cond_uncond,
        vocabulary=words,
    )


def prepare_inputs(params: Params, generation: Generation, n: int) -> Inputs:
    """init_images[n]; with several, image n is the n-th of each batch (batch_size is their
    count)."""
    original = images.decode(params.init_images[n], f"init_images[{n}]").convert("RGB")
    if params.mask is None:
        init = images.resize(original, params.resize_mode, params.width, params.height)
        if params.resize_mode == images.LATENT_RESIZE:  # img2img resizes it as latents
            return Inputs(init=init, original=original)
        return Inputs(init=init)
    mask = images.prepare_mask(
        images.decode(params.mask, "mask"),
        invert=params.inpainting_mask_invert,
        blur_x=params.mask_blur_x,
        blur_y=params.mask_blur_y,
    )
    mask = mask.resize(original.size) if mask.size != original.size else mask
    filled = _fill(original, mask, params)
    box = (
        images.mask_box(mask, params.inpaint_full_res_padding) if params.inpaint_full_res else None
    )
    generation.extra.update(inpaint_fields(params, only_masked=box is not None))
    if box is not None:
        box = images.expand_to_ratio(box, params.width, params.height, original.size)
        size = (params.width, params.height)
        return Inputs(
            init=filled.crop(box).resize(size, Image.Resampling.LANCZOS),
            mask=mask.crop(box).resize(size, Image.Resampling.LANCZOS),
            original=original,
            original_mask=mask,
            crop=box,
        )
    mode, w, h = params.resize_mode, params.width, params.height
    return Inputs(
        init=images.resize(filled, mode, w, h),
        mask=images.resize(mask, mode, w, h),
        original=images.resize(original, mode, w, h),
        original_mask=images.doubled(images.resize(mask, mode, w, h)),
    )


def _fill(image: Image.Image, mask: Image.Image, params: Params) -> Image.Image:
    """A1111's "masked content": 0 fill, 1 original, 2 latent noise, 3 latent nothing; A1111
    fills the pixels for all but 1, then 2 and 3 in latents (engine/masked_content.py)."""
    if params.inpainting_fill != 1:
        return images.fill_masked(image, mask)
    return image


def _finish_image(image: Image.Image, inputs: Inputs) -> Image.Image:
    if inputs.original is None or inputs.original_mask is None:
        return image
    if inputs.crop is not None:
        left, top, right, bottom = inputs.crop
        pasted = inputs.original.copy()
        pasted.paste(
            image.resize((right - left, bottom - top), Image.Resampling.LANCZOS), (left, top)
        )
        image = pasted
    return images.overlay(image, inputs.original, inputs.original_mask)


def _run_batch(
    models: Models,
    config: EngineConfig,
    loaded: Loaded,
    params: Params,
    embeds: conditioning.Conditioning,
    inputs: list[Inputs],
    state: RunState,
    seeds: list[int],
    subseeds: list[int],
    output: str = "pil",  # "latent" for hires fix's latent upscalers
) -> list[Any]:
    task = _task(params, loaded, inputs[0])
    scheduler = run_scheduler(loaded, params)
    tracking = schedulers.Tracking(scheduler)
    size = len(seeds)
    pipe = task_pipeline(loaded, task, scheduler, (params.height, params.width, size))
    drawn = initial_noise(models, params, seeds, subseeds)
    tracking.generators = drawn.generators  # step noise continues from A1111's generators
    if params.sampler.sampler.brownian:
        tracking.brownian_seeds = seeds
    kwargs = call_kwargs(pipe, params, embeds.first, size, models.dtype)
    kwargs["output_type"] = "latent"  # decoded below (engine/precision.py's fp32 fallback)
    kwargs["generator"] = throwaway_generators(drawn.generators, seeds)
    # Only img2img has a strength: txt2img bodies carry hires fix's (webuiapi always sends 0.7).
    strength = run_strength(params) if params.kind == "img2img" else None
    if task == "txt2img":
        kwargs["latents"] = drawn.latents  # fp32, as the steps keep them (engine/precision.py)
    elif task == "img2img":
        start = inputs[0].batch if inputs[0].batch is not None else per_image(inputs, size, "init")
        if inputs[0].batch is None and params.resize_mode == images.LATENT_RESIZE:
            start = upscale.encoded_to_size(
                loaded.pipe,
                per_image(inputs, size, "original"),
                params.width,
                params.height,
                kwargs["generator"],
            )
        kwargs.update(image=start, strength=strength)
        tracking.noise = drawn.latents
    else:
        grey = Image.new("RGB", (params.width, params.height), (127, 127, 127))
        white = Image.new("L", (params.width, params.height), 255)
        strength = 1.0 if strength is None else strength
        kwargs.update(
            image=[image or grey for image in per_image(inputs, size, "init")],
            mask_image=[mask or white for mask in per_image(inputs, size, "mask")],
            strength=strength,
            height=params.height,
            width=params.width,
        )
        if strength >= 1.0:
            kwargs["latents"] = drawn.latents
        tracking.noise = drawn.latents
        if inputs[0].mask is not None:
            tracking.fill = masked_content.make(
                params.inpainting_fill,
                per_image(inputs, size, "mask"),
                params.all_seeds()[:size],  # A1111: the first batch's seeds, every batch
                width=params.width,
                height=params.height,
                device=models.device,
                source=params.randn_source,
            )
    kwargs["callback_on_step_end"] = _callback(state, tracking, config, models, loaded.sdxl)
    embeds.attach(kwargs, size, models.dtype)  # prompt editing: the conditioning per step
    if inputs[0].control is not None:
        units = inputs[0].control
        arguments = control.call_kwargs(units, task)
        pipe = steered(pipe, units, kwargs, arguments, masking=embeds.padded)
    # Zero padding of prompt/negative stays out of attention (decided once for the job).
    attention.install(pipe.unet, masking=embeds.padded)
    # Image prompts and the noise mask (engine/ip_adapter.py, engine/noise_mask.py) step first.
    hooks = [
        ip_adapter.install(pipe.unet, inputs[0].image_prompts, cfg=params.cfg_scale > 1, pipe=pipe),
        noise_mask.injector(params, seeds, tracking),
    ]
    kwargs["callback_on_step_end"] = _before(hooks, kwargs["callback_on_step_end"])
    enter_img2img(pipe, params)
    tile_vae(pipe, config, params.width, params.height)
    with torch.inference_mode():
        latents = list(pipe(**kwargs).images)
    return latents if output == "latent" else upscale.as_images(loaded.pipe, latents)


def steered(
    pipe: Any,
    units: control.Control,
    kwargs: dict[str, Any],
    arguments: dict[str, Any],
    *,
    masking: bool,
) -> Any:
    """`pipe` as its ControlNet pipeline steered by `units` (engine/control.py), their call
    `arguments` added to `kwargs`."""
    pipe = control.with_controlnet(pipe, units)
    kwargs.update(arguments)
    attention.install(pipe.controlnet, masking=masking)
    precision.keep_latents_fp32(pipe.controlnet, fp32_output=False)
    return pipe


def throwaway_generators(generators: list[noise.Generator], seeds: list[int]) -> list[Any]:
    """For what a pipeline draws itself (A1111's noise comes from `generators`), on their
    device."""
    return [torch.Generator(noise.device_of(generators[0])).manual_seed(s) for s in seeds]


def enter_img2img(pipe: Any, params: Params) -> None:
    """DDIM and PLMS enter img2img (and hires fix's second pass) as A1111's sample_img2img
    does (engine/ddim.py); the other samplers by the strength."""
    scheduler = pipe.scheduler
    if params.kind != "img2img" or params.denoising_strength is None:
        return
    if isinstance(scheduler, ddim.TimestepsScheduler):
        ddim.enter_img2img(pipe, scheduler, params.denoising_strength, params.steps)


def tile_vae(pipe: Any, config: EngineConfig, width: int, height: int) -> None:
    """Decode in tiles above the engine's vae_tiling_pixels, whole below."""
    if width * height > config.vae_tiling_pixels:
        pipe.vae.enable_tiling()
    else:
        pipe.vae.disable_tiling()


def initial_noise(
    models: Models, params: Params, seeds: list[int], subseeds: list[int]
) -> noise.Noise:
    """A1111's initial noise (and step-noise generators) for these images of the job."""
    resize_from = (
        (params.seed_resize_from_w, params.seed_resize_from_h)
        if params.seed_resize_from_w > 0 and params.seed_resize_from_h > 0
        else None
    )
    return noise.make(
        seeds,
        subseeds,
        subseed_strength=params.subseed_strength,
        shape=(4, params.height // 8, params.width // 8),
        device=models.device,
        source=params.randn_source,
        ensd=params.eta_noise_seed_delta,
        resize_from=resize_from,
    )


def run_strength(params: Params) -> float | None:
    if params.denoising_strength is None:
        return None
    return img2img_strength(params.denoising_strength, params.steps)


def img2img_strength(denoising_strength: float, steps: int) -> float:
    """The strength that makes diffusers run A1111's img2img steps (sd_samplers_common's
    setup_img2img_steps, sample_img2img): t_enc = int(min(strength, 0.999) * steps), then the
    last t_enc + 1 sigmas of the `steps` schedule, so one step more than diffusers' int(steps *
    strength), starting one sigma higher, and at least one step however low the strength."""
    t_enc = int(min(denoising_strength, 0.999) * steps)
    return min((t_enc + 1.5) / steps, 1.0)  # diffusers runs int(steps * strength) = t_enc + 1


def per_image(inputs: list[Inputs], size: int, name: str) -> list[Any]:
    """The batch's `name` images: the one input repeated, or one input per batch position."""
    return [getattr(inputs[i % len(inputs)], name) for i in range(size)]


def _task(params: Params, loaded: Loaded, inputs: Inputs) -> str:
    if loaded.inpainting or inputs.mask is not None:
        return "inpaint"  # an inpainting UNet always takes a mask (all white for txt2img)
    return params.kind


def run_scheduler(loaded: Loaded, params: Params) -> Any:
    """A fresh scheduler for one pipeline call of `params` on `loaded`: its sampler, schedule
    and eta, and whether the call is img2img."""
    return schedulers.make(
        loaded.pipe.scheduler.config,
        params.sampler,
        sdxl=loaded.sdxl,
        eta_value=params.eta_for(params.sampler.sampler),
        img2img=params.kind == "img2img",
    )


def task_pipeline(loaded: Loaded, task: str, scheduler: Any, bucket: compiled.Bucket) -> Any:
    """A pipeline of the task's class sharing the loaded model's weights, with this run's
    scheduler; under ENGINE_COMPILE, with the UNet compiled for `bucket` (engine/compiled.py)."""
    cls = getattr(diffusers, _TASKS[(loaded.sdxl, task)])
    if loaded.buckets is None:
        return assemble(cls, loaded.pipe.components, scheduler=scheduler)
    unet = loaded.buckets.unet(loaded.pipe.unet, bucket)
    return assemble(cls, loaded.pipe.components, scheduler=scheduler, unet=unet)


def call_kwargs(
    pipe: Any, params: Params, embeds: text.Embeds, size: int, dtype: torch.dtype
) -> dict[str, Any]:
    def batch(z: torch.Tensor) -> torch.Tensor:
        return z.expand(size, *z.shape[1:]).to(dtype)

    kwargs: dict[str, Any] = dict(
        prompt_embeds=batch(embeds.cond),
        negative_prompt_embeds=batch(embeds.uncond),
        num_inference_steps=params.steps,
        guidance_scale=params.cfg_scale,
        output_type="pil",
    )
    if params.kind == "txt2img":
        kwargs.update(height=params.height, width=params.width)
    if embeds.pooled is not None and embeds.uncond_pooled is not None:
        kwargs.update(
            pooled_prompt_embeds=batch(embeds.pooled),
            negative_pooled_prompt_embeds=batch(embeds.uncond_pooled),
        )
    eta = params.eta_for(params.sampler.sampler)
    if eta is not None:
        kwargs["eta"] = eta  # what DDIM's step takes (the others' eta is their scheduler's)
    return kwargs


def _before(hooks: list[Any], callback: Any) -> Any:
    """`callback` with the step hooks that are not None run first."""
    hooks = [hook for hook in hooks if hook is not None]
    if not hooks:
        return callback

    def on_step_end(pipe: Any, i: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        for hook in hooks:
            tensors = hook(pipe, i, t, tensors)
        done: dict[str, Any] = callback(pipe, i, t, tensors)
        return done

    return on_step_end


def _callback(
    state: RunState,
    tracking: schedulers.Tracking,
    config: EngineConfig,
    models: Models,
    sdxl: bool,
) -> Any:
    def on_step_end(pipe: Any, i: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        state.step, state.steps = i + 1, getattr(pipe, "num_timesteps", 0) or state.steps
        share = getattr(pipe.scheduler, "share_done", None)
        if share is not None:  # DPM adaptive: its evaluations are not the steps
            state.step = min(state.steps, round(share * state.steps))
        x0 = tracking.last_x0
        if state.preview_due(i + 1, config.preview_steps):
            state.current_image = models.previews.png_base64(
                (x0 if x0 is not None else tensors["latents"])[0], sdxl=sdxl
            )
        if state.cancel.is_set():
            raise Canceled()
        if state.interrupt.is_set() or state.skip.is_set():
            if x0 is not None and x0.shape == tensors["latents"].shape:
                tensors["latents"] = x0  # A1111 keeps the current x0 estimate
            pipe._interrupt = True  # no more UNet steps; the VAE still decodes
        return tensors

    return on_step_end
