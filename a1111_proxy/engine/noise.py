"""Initial noise exactly as A1111 makes it (torch).

One generator per image seeded with that image's seed; `randn((4, H/8, W/8))` in float32 on the
device (A1111's default "GPU" source) or on the CPU ("CPU" source). Variation seeds blend a second
noise in with A1111's slerp; "Seed resize from" draws at the old size and pastes it centred. The
same generators then make the step noise of ancestral samplers, as in A1111 (re-seeded with
seed + ENSD when an eta noise seed delta is set). The SDE samplers (DPM++ SDE, 2M SDE, 3M SDE)
take their step noise from a Brownian tree per image seeded with the image's seed instead.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass

import torch


@dataclass
class Noise:
    latents: torch.Tensor  # (B, 4, h, w) float32
    generators: list[torch.Generator]


def make(
    seeds: list[int],
    subseeds: list[int],
    *,
    subseed_strength: float,
    shape: tuple[int, int, int],
    device: torch.device,
    source: str,
    ensd: int = 0,
    resize_from: tuple[int, int] | None = None,
) -> Noise:
    """shape is (4, height // 8, width // 8); resize_from is (width, height) in pixels."""
    where = torch.device("cpu") if source == "CPU" else device
    xs, generators = [], []
    for seed, subseed in zip(seeds, subseeds, strict=True):
        draw_shape = (
            shape if resize_from is None else (shape[0], resize_from[1] // 8, resize_from[0] // 8)
        )
        generator = torch.Generator(where).manual_seed(int(seed))
        noise = torch.randn(draw_shape, generator=generator, device=where)
        if subseed_strength:
            other = torch.randn(
                draw_shape, generator=torch.Generator(where).manual_seed(int(subseed)), device=where
            )
            noise = slerp(subseed_strength, noise, other)
        if resize_from is not None:
            noise = _paste_centred(noise, shape, generator, where)
        xs.append(noise)
        generators.append(generator)
    if ensd:
        generators = [torch.Generator(where).manual_seed(int(s) + ensd) for s in seeds]
    return Noise(torch.stack(xs).to(device), generators)


def stream(seed: int, name: str) -> torch.Generator:
    """A CPU generator for an extra noise stream of one image (e.g. the noise mask's): seeded
    from the image's seed and the stream's name, so it is reproducible on any device and
    independent of A1111's generators."""
    digest = hashlib.sha256(f"{name}:{int(seed)}".encode()).digest()
    return torch.Generator("cpu").manual_seed(int.from_bytes(digest[:8], "big") >> 1)


def slerp(t: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """A1111's slerp: norms over dim 1 of a (C, H, W) tensor; lerp when nearly parallel."""
    low_n = low / torch.norm(low, dim=1, keepdim=True)
    high_n = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_n * high_n).sum(1)
    if dot.mean() > 0.9995:
        return low * t + high * (1 - t)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - t) * omega) / so).unsqueeze(1) * low + (
        torch.sin(t * omega) / so
    ).unsqueeze(1) * high


def _paste_centred(
    small: torch.Tensor,
    shape: tuple[int, int, int],
    generator: torch.Generator,
    where: torch.device,
) -> torch.Tensor:
    """A1111's seed resize: fresh noise of the new size with the old-size noise in its middle."""
    out = torch.randn(shape, generator=generator, device=where)
    _, h, w = shape
    _, sh, sw = small.shape
    dx, dy = (w - sw) // 2, (h - sh) // 2
    tx, ty = max(-dx, 0), max(-dy, 0)
    dx, dy = max(dx, 0), max(dy, 0)
    cw, ch = min(w - dx, sw - tx), min(h - dy, sh - ty)
    out[:, dy : dy + ch, dx : dx + cw] = small[:, ty : ty + ch, tx : tx + cw]
    return out


class BrownianNoise:
    """k-diffusion's BrownianTreeNoiseSampler as A1111's create_noise_sampler makes it: one
    torchsde Brownian tree per image, seeded with that image's seed (not seed + ENSD), spanning
    the schedule's smallest non-zero sigma to its largest, on the CPU; called with two sigmas it
    gives unit-variance noise for the step between them."""

    def __init__(self, x: torch.Tensor, sigmas: torch.Tensor, seeds: list[int]) -> None:
        import torchsde  # only the SDE samplers need it

        low = torch.as_tensor(sigmas[sigmas > 0].min()).cpu().float()
        high = torch.as_tensor(sigmas.max()).cpu().float()
        w0 = torch.zeros_like(x[0], device="cpu", dtype=torch.float32)
        self.device, self.dtype = x.device, x.dtype
        self.trees = [torchsde.BrownianTree(low, w0, high, entropy=int(s)) for s in seeds]

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        t0 = torch.as_tensor(sigma).cpu().float()
        t1 = torch.as_tensor(sigma_next).cpu().float()
        sign = 1.0 if t0 < t1 else -1.0
        low, high = (t0, t1) if t0 < t1 else (t1, t0)
        with warnings.catch_warnings():  # torchsde warns (and clamps) at float32 rounding
            warnings.simplefilter("ignore", UserWarning)
            w = torch.stack([tree(low, high) for tree in self.trees]) * sign
        return (w / (t1 - t0).abs().sqrt()).to(device=self.device, dtype=self.dtype)
