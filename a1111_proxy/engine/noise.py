"""Initial noise exactly as A1111 makes it (torch).

One generator per image seeded with that image's seed; `randn((4, H/8, W/8))` in float32 on the
device (A1111's default "GPU" source), on the CPU ("CPU" source), or from `Philox`, torch's CUDA
generator computed on the CPU ("NV" source: an NVIDIA GPU's noise on any device). Variation
seeds blend a second noise in with A1111's slerp; "Seed resize from" draws at the old size and
pastes it centred. The same generators then make the step noise of ancestral samplers, as in
A1111 (re-seeded with seed + ENSD when an eta noise seed delta is set). The SDE samplers (DPM++
SDE, 2M SDE, 3M SDE) take their step noise from a Brownian tree per image seeded with the
image's seed instead.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

_PHILOX_M = (np.uint64(0xD2511F53), np.uint64(0xCD9E8D57))
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)
_TWO_POW32_INV = np.float64(np.float32(2.3283064e-10))
_TWO_POW32_INV_2PI = np.float64(np.float32(2.3283064e-10 * 6.2831855))


class Philox:
    """torch.randn on a CUDA device, computed on the CPU: Philox 4x32 with 10 rounds (keyed by
    the seed, counting the element index and the draw), then Box-Muller, as torch's CUDA kernel
    does it for float32. Each `randn` call is one draw (the counter's offset moves on by one),
    as A1111's "NV" source draws."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self.offset = 0

    def randn(self, shape: tuple[int, ...]) -> torch.Tensor:
        n = math.prod(shape)
        c0 = np.full(n, self.offset, dtype=np.uint32)
        c1 = np.zeros(n, dtype=np.uint32)
        c2 = np.arange(n, dtype=np.uint32)
        c3 = np.zeros(n, dtype=np.uint32)
        k0, k1 = self.seed & 0xFFFFFFFF, (self.seed >> 32) & 0xFFFFFFFF
        self.offset += 1
        for round_ in range(10):
            if round_:
                k0 = (k0 + _PHILOX_W[0]) & 0xFFFFFFFF
                k1 = (k1 + _PHILOX_W[1]) & 0xFFFFFFFF
            p0 = c0.astype(np.uint64) * _PHILOX_M[0]
            p1 = c2.astype(np.uint64) * _PHILOX_M[1]
            c0, c1, c2, c3 = (
                (p1 >> np.uint64(32)).astype(np.uint32) ^ c1 ^ np.uint32(k0),
                p1.astype(np.uint32),
                (p0 >> np.uint64(32)).astype(np.uint32) ^ c3 ^ np.uint32(k1),
                p0.astype(np.uint32),
            )
        u = c0 * _TWO_POW32_INV + _TWO_POW32_INV / 2
        v = c1 * _TWO_POW32_INV_2PI + _TWO_POW32_INV_2PI / 2
        normal = np.sqrt(-2.0 * np.log(u)) * np.sin(v)
        return torch.from_numpy(normal.astype(np.float32).reshape(shape))


Generator = torch.Generator | Philox


def draw(generator: Generator, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """One draw of `shape` from an image's generator, on `device`."""
    if isinstance(generator, Philox):
        return generator.randn(shape).to(device)
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


def device_of(generator: Generator) -> torch.device:
    return torch.device("cpu") if isinstance(generator, Philox) else generator.device


def _generator(seed: int, source: str, where: torch.device) -> Generator:
    if source == "NV":
        return Philox(seed)
    return torch.Generator(where).manual_seed(int(seed))


@dataclass
class Noise:
    latents: torch.Tensor  # (B, 4, h, w) float32
    generators: list[Generator]


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
    draw_shape = (
        shape if resize_from is None else (shape[0], resize_from[1] // 8, resize_from[0] // 8)
    )
    xs, generators = [], []
    for seed, subseed in zip(seeds, subseeds, strict=True):
        generator = _generator(seed, source, where)
        # A seed resize draws the old size from a fresh generator of the seed, then the new
        # size from the image's own, which goes on from there: either way the image's
        # generator has made one draw of the new size.
        first = generator if resize_from is None else _generator(seed, source, where)
        noise = draw(first, draw_shape, where)
        if subseed_strength:
            other = draw(_generator(subseed, source, where), draw_shape, where)
            noise = slerp(subseed_strength, noise, other)
        if resize_from is not None:
            noise = _paste_centred(noise, draw(generator, shape, where))
        xs.append(noise)
        generators.append(generator)
    if ensd:
        generators = [_generator(int(s) + ensd, source, where) for s in seeds]
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


def _paste_centred(small: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """A1111's seed resize: the old-size noise in the middle of the new-size noise `out`; an
    odd difference when shrinking leaves one more row or column of `out` at the far edge."""
    _, h, w = out.shape
    _, sh, sw = small.shape
    dx, dy = (w - sw) // 2, (h - sh) // 2
    cw = sw if dx >= 0 else sw + 2 * dx
    ch = sh if dy >= 0 else sh + 2 * dy
    tx, ty = max(dx, 0), max(dy, 0)
    sx, sy = max(-dx, 0), max(-dy, 0)
    out[:, ty : ty + ch, tx : tx + cw] = small[:, sy : sy + ch, sx : sx + cw]
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
