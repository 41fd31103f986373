"""Hires fix's upscaling between the two passes (torch), as A1111 does it.

Latent modes interpolate the first pass's latents (torch `interpolate`, with A1111's modes and
antialiasing); image upscalers resize the decoded images (Lanczos, Nearest; "None" is a plain
Lanczos resize). Both are then cropped to hr_resize_x x hr_resize_y when that changes the aspect
ratio. The second pass is an img2img run at the new size: `second_pass_params` says with what.
img2img's latent resize mode (3) interpolates an init image's latents the same way.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeGuard

import torch
from PIL import Image

from a1111_proxy.engine import precision
from a1111_proxy.engine.hires import LATENT_FACTOR, Hires
from a1111_proxy.engine.params import Params

Batch = torch.Tensor | list[Image.Image]  # latents (B, 4, h, w), or images
_RESAMPLE = {"Lanczos": Image.Resampling.LANCZOS, "Nearest": Image.Resampling.NEAREST}


@torch.inference_mode()
def upscale(first: list[Any], hires: Hires) -> Batch:
    """first: what the first pass's pipeline returned (latents or images, one per image)."""
    batch = _stacked(first)
    if isinstance(batch, torch.Tensor):
        return _latents(batch, hires)
    return [_image(image, hires) for image in batch]


def _stacked(batch: Batch | list[Any]) -> Batch:
    if _is_latents(batch):
        return torch.stack(batch)
    return batch


def _is_latents(batch: Batch | list[Any]) -> TypeGuard[list[torch.Tensor]]:
    """A pipeline's output_type="latent" list (one tensor per image), not images."""
    return isinstance(batch, list) and bool(batch) and isinstance(batch[0], torch.Tensor)


def _latents(latents: torch.Tensor, hires: Hires) -> torch.Tensor:
    mode, antialias = hires.latent or ("bilinear", False)
    size = (hires.target_height // LATENT_FACTOR, hires.target_width // LATENT_FACTOR)
    scaled = torch.nn.functional.interpolate(
        latents.float(), size=size, mode=mode, antialias=antialias
    ).to(latents.dtype)
    tx, ty = hires.truncate_x, hires.truncate_y
    height, width = scaled.shape[2:]
    return scaled[:, :, ty // 2 : height - (ty + 1) // 2, tx // 2 : width - (tx + 1) // 2]


def _image(image: Image.Image, hires: Hires) -> Image.Image:
    """A1111's resize_image(0, image, w, h, upscaler_name) and its Upscaler.upscale."""
    to = (hires.target_width, hires.target_height)
    if hires.upscaler in _RESAMPLE:
        scale = max(to[0] / image.width, to[1] / image.height)
        if scale > 1.0:
            dest = (int(image.width * scale) // 8 * 8, int(image.height * scale) // 8 * 8)
            image = image.resize(
                (int(image.width * scale), int(image.height * scale)), _RESAMPLE[hires.upscaler]
            )
            if image.size != dest:
                image = image.resize(dest, Image.Resampling.LANCZOS)
    if image.size != to:
        image = image.resize(to, Image.Resampling.LANCZOS)
    # The crop A1111 makes on the latents, in pixels; the size becomes a multiple of 8.
    width, height = hires.latent_size
    left = hires.truncate_x // 2 * LATENT_FACTOR
    top = hires.truncate_y // 2 * LATENT_FACTOR
    return image.crop((left, top, left + width * LATENT_FACTOR, top + height * LATENT_FACTOR))


def second_pass_params(params: Params, hires: Hires) -> Params | None:
    """The second pass as an img2img run of exactly `hr_second_pass_steps` (or `steps`) steps,
    as A1111 runs it: a schedule of int(steps / strength) steps entered at `strength` (the
    strength is nudged so that img2img's t_enc + 1 (engine/pipeline.py) lands on the count).
    None when the strength is 0 (nothing to denoise)."""
    wanted = hires.steps or params.steps
    strength = hires.denoising_strength
    if strength <= 0:
        return None
    schedule = max(int(wanted / min(strength, 0.999)), 1)
    width, height = hires.latent_size
    return dataclasses.replace(
        params,
        kind="img2img",
        prompt=hires.prompt,
        negative_prompt=hires.negative_prompt,
        sampler=hires.sampler,
        steps=schedule,
        denoising_strength=min((wanted - 0.5) / schedule, 1.0),
        width=width * LATENT_FACTOR,
        height=height * LATENT_FACTOR,
        hires=None,
    )


@torch.inference_mode()
def encoded_to_size(
    pipe: Any, images: list[Image.Image], width: int, height: int, generators: list[Any]
) -> torch.Tensor:
    """img2img's resize mode 3, "Just resize (latent upscale)", as A1111's img2img init: each
    image encoded at its own size (rounded down to a multiple of 8, as the pipelines take it),
    then its latents interpolated bilinearly to the job's size."""
    vae = pipe.vae
    made = []
    for image, generator in zip(images, generators, strict=True):
        pixels = pipe.image_processor.preprocess(image).to(device=vae.device, dtype=vae.dtype)
        latents = vae.encode(pixels).latent_dist.sample(generator).float()
        mean = getattr(vae.config, "latents_mean", None)
        std = getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            shape = (1, len(mean), 1, 1)
            latents = latents - torch.tensor(mean).view(shape).to(latents)
            latents = (
                latents * vae.config.scaling_factor / torch.tensor(std).view(shape).to(latents)
            )
        else:
            latents = latents * vae.config.scaling_factor
        size = (height // LATENT_FACTOR, width // LATENT_FACTOR)
        made.append(torch.nn.functional.interpolate(latents, size=size, mode="bilinear"))
    return torch.cat(made)


@torch.inference_mode()
def as_images(pipe: Any, batch: Batch | list[Any]) -> list[Image.Image]:
    """Latents decoded as the SD/SDXL pipelines decode them (images pass through), in the
    VAE's dtype with A1111's fp32 fallback (engine/precision.py)."""
    batch = _stacked(batch)
    if not isinstance(batch, torch.Tensor):
        return list(batch)
    vae = pipe.vae
    latents = batch.to(device=vae.device, dtype=torch.float32)
    mean = getattr(vae.config, "latents_mean", None)
    std = getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        shape = (1, len(mean), 1, 1)
        latents = latents * torch.tensor(std).view(shape).to(latents) / vae.config.scaling_factor
        latents = latents + torch.tensor(mean).view(shape).to(latents)
    else:
        latents = latents / vae.config.scaling_factor
    decoded = precision.decode(vae, latents)
    return list(pipe.image_processor.postprocess(decoded, output_type="pil"))
