"""Live previews of a running job (torch): TAESD when its weights are on disk, else A1111's
"Approx cheap".

"Approx cheap": a 4x3 matrix per model family turns an x0 estimate into a 1/8-size picture in
about a millisecond, with no VAE (A1111's `sd_vae_approx.cheap_approximation` coefficients).
TAESD (`diffusers.AutoencoderTiny`) decodes the latent to a full-size picture in a few
milliseconds on a GPU; its weights are never downloaded: put the diffusers folders of
madebyollin/taesd and madebyollin/taesdxl at MODELS_DIR/VAE-approx/taesd and .../taesdxl.
"""

from __future__ import annotations

import base64
import logging
import threading
from pathlib import Path
from typing import Any

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


log = logging.getLogger("a1111_proxy.engine")


class Previews:
    """Makes the preview PNGs for one device; loads each TAESD decoder once, on first use."""

    def __init__(self, models_dir: Path, device: torch.device, dtype: torch.dtype) -> None:
        self.folder = models_dir / "VAE-approx"
        self.device, self.dtype = device, dtype
        self._decoders: dict[bool, Any] = {}
        self._lock = threading.Lock()

    def png_base64(self, latent: torch.Tensor, *, sdxl: bool) -> str:
        decoder = self.taesd(sdxl=sdxl)
        image = _decode(decoder, latent) if decoder is not None else cheap(latent, sdxl=sdxl)
        return base64.b64encode(encode_png(image, None)).decode("ascii")

    def taesd(self, *, sdxl: bool) -> Any:
        """The family's TAESD decoder, or None when its folder is absent or unreadable."""
        with self._lock:
            if sdxl not in self._decoders:
                self._decoders[sdxl] = self._load(self.folder / ("taesdxl" if sdxl else "taesd"))
            return self._decoders[sdxl]

    def unload(self) -> None:
        with self._lock:
            self._decoders.clear()

    def _load(self, folder: Path) -> Any:
        if not (folder / "config.json").is_file():
            return None
        from diffusers import AutoencoderTiny

        try:
            model = AutoencoderTiny.from_pretrained(folder, local_files_only=True, dtype=self.dtype)
        except (OSError, ValueError, RuntimeError) as exc:
            log.warning("TAESD previews off: cannot load %s (%s); using Approx cheap", folder, exc)
            return None
        log.info("TAESD previews from %s", folder)
        return model.to(self.device).eval()


@torch.inference_mode()
def _decode(decoder: Any, latent: torch.Tensor) -> Image.Image:
    """TAESD takes the UNet's latent as it is and gives pixels in [-1, 1] at 8x the size."""
    rgb = decoder.decode(latent[None, :4].to(decoder.device, decoder.dtype)).sample[0]
    pixels = ((rgb.float() + 1) / 2).clamp(0, 1).mul(255).byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(pixels)
