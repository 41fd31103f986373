"""A tiny random CLIP vision encoder and tiny random IP-Adapters (plain and plus) in A1111's
single-file layout, shaped for a tiny UNet of tests/fakes/tiny_sd.py, built offline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

HIDDEN, PROJECTION = 32, 24  # the encoder's hidden width and image embedding width


def clip_vision(path: Path, seed: int = 0) -> CLIPVisionModelWithProjection:
    """One .safetensors file in transformers' layout (as h94's image_encoder/model.safetensors);
    one attention head, as the engine assumes for an encoder this narrow."""
    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=HIDDEN,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=1,
        image_size=32,
        patch_size=8,
        projection_dim=PROJECTION,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
    )
    model = CLIPVisionModelWithProjection(config).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path))
    return model


def ip_adapter(unet: Any, path: Path, *, plus: bool = False, seed: int = 1) -> None:
    """`image_proj.*` and `ip_adapter.<2k+1>.to_k_ip/to_v_ip.weight` for the UNet's k-th
    cross-attention layer (its attn_processors order), as A1111's ip-adapter_* files."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.3) -> torch.Tensor:
        return torch.randn(shape, generator=generator) * scale

    cross = unet.config.cross_attention_dim
    state = {
        f"image_proj.{k}": v
        for k, v in (_plus(rand, cross) if plus else _plain(rand, cross)).items()
    }
    modules = dict(unet.named_modules())
    names = [n[: -len(".processor")] for n in unet.attn_processors if n.endswith("attn2.processor")]
    for k, name in enumerate(names):
        inner = modules[name].to_k.weight.shape[0]
        state[f"ip_adapter.{2 * k + 1}.to_k_ip.weight"] = rand(inner, cross, scale=1.0)
        state[f"ip_adapter.{2 * k + 1}.to_v_ip.weight"] = rand(inner, cross, scale=1.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))


def _plain(rand: Any, cross: int) -> dict[str, torch.Tensor]:
    return {
        "proj.weight": rand(4 * cross, PROJECTION),
        "proj.bias": rand(4 * cross),
        "norm.weight": 1 + rand(cross),
        "norm.bias": rand(cross),
    }


def _plus(rand: Any, cross: int, dim: int = 64) -> dict[str, torch.Tensor]:
    """The Resampler of IP-Adapter plus: 4 layers, 64-wide heads (diffusers' converter's
    assumptions), over the encoder's HIDDEN-wide hidden states."""
    state = {
        "latents": rand(1, 4, dim),
        "proj_in.weight": rand(dim, HIDDEN),
        "proj_in.bias": rand(dim),
        "proj_out.weight": rand(cross, dim),
        "proj_out.bias": rand(cross),
        "norm_out.weight": 1 + rand(cross),
        "norm_out.bias": rand(cross),
    }
    for n in range(4):
        state |= {
            f"layers.{n}.0.norm1.weight": 1 + rand(dim),
            f"layers.{n}.0.norm1.bias": rand(dim),
            f"layers.{n}.0.norm2.weight": 1 + rand(dim),
            f"layers.{n}.0.norm2.bias": rand(dim),
            f"layers.{n}.0.to_q.weight": rand(64, dim),
            f"layers.{n}.0.to_kv.weight": rand(128, dim),
            f"layers.{n}.0.to_out.weight": rand(dim, 64),
            f"layers.{n}.1.0.weight": 1 + rand(dim),
            f"layers.{n}.1.0.bias": rand(dim),
            f"layers.{n}.1.1.weight": rand(4 * dim, dim),
            f"layers.{n}.1.3.weight": rand(dim, 4 * dim),
        }
    return state
