"""A1111's "Approx cheap" live preview (torch): latent channels mixed straight to RGB.

A 4x3 matrix per model family turns an x0 estimate into a 1/8-size picture in about a
millisecond, with no VAE. A1111 ships these coefficients in `sd_vae_approx.cheap_approximation`.
"""

from __future__ import annotations

import base64

import torch
from PIL import Image

from a1111_proxy.engine.images import encode_png

_SD15 = (
    (0.298, 0.207, 0.208),
    (0.187, 0.286, 0.173),
    (-0.158, 0.189, 0.264),
    (-0.184, -0.271, -0.473),
)
_SDXL = (
    (0.3448, 0.4168, 0.4395),
    (-0.1953, -0.0290, 0.0250),
    (0.1074, 0.0886, -0.0163),
    (-0.3730, -0.2499, -0.2088),
)


def cheap(latent: torch.Tensor, *, sdxl: bool) -> Image.Image:
    """latent: (4, h, w) in the UNet's latent space -> an RGB image of h x w pixels."""
    matrix = torch.tensor(_SDXL if sdxl else _SD15)
    rgb = torch.einsum("lxy,lr->rxy", latent.detach().float().cpu()[:4], matrix)
    pixels = ((rgb + 1) / 2).clamp(0, 1).mul(255).byte().permute(1, 2, 0).numpy()
    return Image.fromarray(pixels)


def cheap_png_base64(latent: torch.Tensor, *, sdxl: bool) -> str:
    return base64.b64encode(encode_png(cheap(latent, sdxl=sdxl), None)).decode("ascii")
