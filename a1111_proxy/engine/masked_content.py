"""A1111's inpainting "masked content" latent noise (2) and latent nothing (3) (torch).

As StableDiffusionProcessingImg2Img.init makes them: the mask at latent size (PIL's default
resize of the blurred mask, rounded to 0 or 1: A1111's mask_round), then the encoded image's
latents kept outside it and, inside, replaced by the initial noise of the first batch's seeds
(2) or zeros (3). The pixels were filled first (images.fill_masked), as for "fill" (0).
The run's scheduler (schedulers.Tracking) applies it to the encoded latents it noises.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from a1111_proxy.engine import noise

LATENT_NOISE, LATENT_NOTHING = 2, 3


@dataclass(frozen=True)
class LatentFill:
    keep: torch.Tensor  # (B, 1, h, w): 1 outside the mask (A1111's `mask`), 0 inside
    noise: torch.Tensor | None  # (B, 4, h, w) for latent noise; None: latent nothing

    def fits(self, latents: torch.Tensor) -> bool:
        return latents.shape[0] == self.keep.shape[0] and latents.shape[2:] == self.keep.shape[2:]

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        keep = self.keep.to(latents.device, latents.dtype)
        filled = latents * keep
        if self.noise is not None:
            filled = filled + self.noise.to(latents.device, latents.dtype) * (1 - keep)
        return filled


def latent_mask(mask: Image.Image, width: int, height: int) -> torch.Tensor:
    """A1111's latmask: the mask resized to (width // 8, height // 8), 0..1, rounded."""
    small = mask.convert("RGB").resize((width // 8, height // 8))
    return torch.from_numpy(np.around(np.asarray(small, dtype=np.float32)[..., 0] / 255))


def make(
    fill: int,
    masks: list[Image.Image],
    seeds: list[int],
    *,
    width: int,
    height: int,
    device: torch.device,
    source: str,
) -> LatentFill | None:
    """The fill for a batch with these masks (one per image) and the job's first seeds."""
    if fill not in (LATENT_NOISE, LATENT_NOTHING):
        return None
    keep = torch.stack([1 - latent_mask(m, width, height) for m in masks])[:, None]
    drawn = None
    if fill == LATENT_NOISE:
        shape = (4, height // 8, width // 8)
        made = noise.make(
            seeds, seeds, subseed_strength=0.0, shape=shape, device=device, source=source
        )
        drawn = made.latents
    return LatentFill(keep.to(device), drawn)
