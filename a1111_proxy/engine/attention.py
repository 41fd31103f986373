"""Cross-attention that leaves out padding tokens (torch, diffusers).

A1111 runs the prompt and the negative prompt through the UNet at their own lengths when they
differ (unless its pad_cond_uncond option is on). Diffusers' pipelines batch them, so the engine
pads the shorter one with all-zero tokens (engine/text.py) and this processor masks every
all-zero token out of cross-attention: the softmax then spans only the real tokens, as if each
ran at its own length. A real CLIP embedding is never an all-zero vector; SDXL's zero negative
prompt is all zeros throughout, and masking every token of it leaves its output unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention_processor import AttnProcessor2_0


class SkipPadding(AttnProcessor2_0):
    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None and attention_mask is None:
            padding = (encoder_hidden_states == 0).all(dim=-1)
            if padding.any():
                bias = padding.to(hidden_states.dtype) * -10000.0
                attention_mask = bias[:, None, :]
        out: torch.Tensor = super().__call__(
            attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
        )
        return out


def install(model: Any) -> None:
    """Put SkipPadding on every cross-attention layer of a UNet or ControlNet(s), once."""
    for net in getattr(model, "nets", None) or [model]:
        net = getattr(net, "_orig_mod", net)  # under ENGINE_COMPILE (engine/compiled.py)
        processors = getattr(net, "attn_processors", None)
        if not processors:
            continue
        cross = [name for name in processors if name.endswith("attn2.processor")]
        if all(isinstance(processors[name], SkipPadding) for name in cross):
            continue
        net.set_attn_processor(
            {
                name: SkipPadding() if name in cross else processor
                for name, processor in processors.items()
            }
        )
