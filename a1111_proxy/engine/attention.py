"""Cross-attention that leaves out padding tokens (torch, diffusers).

A1111 runs the prompt and the negative prompt through the UNet at their own lengths when they
differ (unless its pad_cond_uncond option is on). Diffusers' pipelines batch them, so the engine
pads the shorter one with all-zero tokens (engine/text.py) and this processor masks every
all-zero token out of cross-attention: the softmax then spans only the real tokens, as if each
ran at its own length. A real CLIP embedding is never an all-zero vector; SDXL's zero negative
prompt is all zeros throughout, and masking every token of it leaves its output unchanged.

Whether a job needs the mask is decided once per job (`padded`), not per layer and step: the
processor's look at the tokens (`padding.any()`) makes the CPU wait for the device in every
cross-attention layer of every step on a GPU, and under ENGINE_COMPILE it splits the graph. A
job without padding (the usual one: prompt and negative prompt of one length) runs diffusers'
own processor.
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


def padded(*conditionings: torch.Tensor | None) -> bool:
    """Whether any row of these conditionings has zero padding beside real tokens: a prompt
    and a negative prompt of different lengths. A row of zeros only (SDXL's empty negative
    prompt) needs no mask. One look for the whole job."""
    for embeds in conditionings:
        if embeds is None:
            continue
        zero = (embeds == 0).all(dim=-1)  # rows x tokens
        if bool((zero.any(dim=-1) & ~zero.all(dim=-1)).any()):
            return True
    return False


def install(model: Any, masking: bool = True) -> None:
    """Put SkipPadding (`masking`) or diffusers' own processor on every cross-attention layer
    of a UNet or ControlNet(s); nothing changes when they already have it."""
    wanted = SkipPadding if masking else AttnProcessor2_0
    for net in getattr(model, "nets", None) or [model]:
        net = getattr(net, "_orig_mod", net)  # under ENGINE_COMPILE (engine/compiled.py)
        processors = getattr(net, "attn_processors", None)
        if not processors:
            continue
        cross = [name for name in processors if name.endswith("attn2.processor")]
        if all(type(processors[name]) is wanted for name in cross):
            continue
        net.set_attn_processor(
            {
                name: wanted() if name in cross else processor  # type: ignore[no-untyped-call]
                for name, processor in processors.items()
            }
        )
