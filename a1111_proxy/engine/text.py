"""Prompt encoding with A1111's semantics (torch): 75-token chunks, attention weights with
mean restore ("Original" emphasis), clip skip for SD1, SDXL's two encoders and pooled output.

We encode ourselves because diffusers' own `clip_skip` breaks with transformers >= 5.6
(CLIPTextModel lost `.text_model`), and because A1111's weighting and chunking are not diffusers'.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from a1111_proxy.engine.embeddings import ANY, Vocabulary
from a1111_proxy.engine.prompts import Chunk, chunks, parse_attention


@dataclass
class Embeds:
    cond: torch.Tensor  # (1, 77*k, C)
    uncond: torch.Tensor
    pooled: torch.Tensor | None = None  # SDXL only, (1, P)
    uncond_pooled: torch.Tensor | None = None


@torch.no_grad()
def encode(
    pipe: Any,
    prompt: str,
    negative: str,
    *,
    clip_skip: int,
    sdxl: bool,
    pad_cond_uncond: bool = False,
    vocabulary: Vocabulary | None = None,
) -> Embeds:
    """pad_cond_uncond (A1111's option): the shorter of prompt and negative gets empty-prompt
    chunks; without it (A1111's default) zero chunks that attention leaves out
    (engine/attention.py), so each runs at its own length as in A1111. `vocabulary`: the
    textual-inversion embeddings the prompts may name (engine/embeddings.py)."""
    pooled: torch.Tensor | None
    uncond_pooled: torch.Tensor | None
    if sdxl:
        cond, pooled = _encode_sdxl(pipe, prompt, vocabulary=vocabulary)
        uncond, uncond_pooled = _encode_sdxl(pipe, negative, negative=True, vocabulary=vocabulary)
        empty = _encode_sdxl(pipe, "")[0] if cond.shape[1] != uncond.shape[1] else None
        empty = empty if pad_cond_uncond else _zero_chunk(cond)
    else:
        te, tok = pipe.text_encoder, pipe.tokenizer
        cond = _encode_one(tok, te, prompt, clip_skip, vocabulary=vocabulary)[0]
        uncond = _encode_one(tok, te, negative, clip_skip, vocabulary=vocabulary)[0]
        pooled = uncond_pooled = None
        empty = (
            _encode_one(pipe.tokenizer, pipe.text_encoder, "", clip_skip)[0]
            if cond.shape[1] != uncond.shape[1] and pad_cond_uncond
            else _zero_chunk(cond)
        )
    if cond.shape[1] != uncond.shape[1]:
        assert empty is not None
        cond, uncond = _pad(cond, empty, uncond.shape[1]), _pad(uncond, empty, cond.shape[1])
    return Embeds(cond, uncond, pooled, uncond_pooled)


def _zero_chunk(z: torch.Tensor) -> torch.Tensor:
    """77 all-zero tokens: padding that engine/attention.py masks out of cross-attention."""
    return torch.zeros(1, 77, z.shape[-1], device=z.device, dtype=z.dtype)


def _pad(z: torch.Tensor, empty: torch.Tensor, length: int) -> torch.Tensor:
    while z.shape[1] < length:
        z = torch.cat([z, empty], dim=1)
    return z


def _encode_sdxl(
    pipe: Any, prompt: str, *, negative: bool = False, vocabulary: Vocabulary | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    # SDXL: both encoders' penultimate hidden states, no final LayerNorm; A1111 ignores clip skip.
    if negative and prompt == "":
        return _zeros_sdxl(pipe)
    first, _ = _encode_one(
        pipe.tokenizer,
        pipe.text_encoder,
        prompt,
        2,
        final_norm=False,
        vocabulary=vocabulary,
        key="clip_l",
    )
    second, pooled = _encode_one(
        pipe.tokenizer_2,
        pipe.text_encoder_2,
        prompt,
        2,
        final_norm=False,
        pad_after_eos=pipe.tokenizer_2.pad_token_id,
        vocabulary=vocabulary,
        key="clip_g",
    )
    return torch.cat([first, second], dim=-1), pooled


def _zeros_sdxl(pipe: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A1111 (sd_models_xl.py, force_zero_negative_prompt): an empty SDXL negative prompt is
    all-zero cross-attention embeddings and an all-zero pooled vector, not the encoded ""."""
    te1, te2 = pipe.text_encoder, pipe.text_encoder_2
    width = te1.config.hidden_size + te2.config.hidden_size
    pooled = te2.config.projection_dim
    return (
        torch.zeros(1, 77, width, device=te2.device, dtype=te2.dtype),
        torch.zeros(1, pooled, device=te2.device, dtype=te2.dtype),
    )


def _encode_one(
    tokenizer: Any,
    encoder: Any,
    prompt: str,
    clip_skip: int,
    *,
    final_norm: bool = True,
    pad_after_eos: int | None = None,
    vocabulary: Vocabulary | None = None,
    key: str = ANY,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    parts = _chunks(tokenizer, prompt, vocabulary)
    if vocabulary is not None:
        vocabulary.note(key, prompt, [name for chunk in parts for _, name in chunk.fixes])
    zs, pooled = [], None
    for index, chunk in enumerate(parts):
        ids = torch.tensor([chunk.ids], device=encoder.device)
        if pad_after_eos is not None and pad_after_eos != tokenizer.eos_token_id:
            ids[0, chunk.ids.index(tokenizer.eos_token_id) + 1 :] = pad_after_eos
        fixes = (
            [(offset, vocabulary.vectors(name, key)) for offset, name in chunk.fixes]
            if vocabulary is not None
            else []
        )
        with _vectors_placed(encoder, fixes):
            out = encoder(ids, output_hidden_states=clip_skip > 1)
        if clip_skip <= 1:
            z = out.last_hidden_state
        elif final_norm:
            z = getattr(encoder, "text_model", encoder).final_layer_norm(
                out.hidden_states[-clip_skip]
            )
        else:
            z = out.hidden_states[-clip_skip]
        if index == 0 and getattr(out, "text_embeds", None) is not None:
            pooled = out.text_embeds
        zs.append(_emphasis(z, chunk.weights))
    return torch.cat(zs, dim=1), pooled


def _chunks(tokenizer: Any, prompt: str, vocabulary: Vocabulary | None = None) -> list[Chunk]:
    parsed = parse_attention(prompt)
    token_ids = tokenizer(
        [text for text, _ in parsed], add_special_tokens=False, truncation=False
    ).input_ids
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    return chunks(
        parsed,
        token_ids,
        bos=tokenizer.bos_token_id,
        eos=tokenizer.eos_token_id,
        comma=comma if comma != tokenizer.unk_token_id else None,
        find=vocabulary.find if vocabulary is not None else None,
    )


@contextmanager
def _vectors_placed(encoder: Any, fixes: list[tuple[int, torch.Tensor]]) -> Iterator[None]:
    """While the encoder runs on one chunk, its token embeddings at each fix's offset + 1
    (after BOS) are the embedding's vectors, as A1111's EmbeddingsWithFixes puts them in (cut
    where the 77 positions end)."""
    if not fixes:
        yield
        return

    def put(module: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
        row = output[0]
        for offset, vectors in fixes:
            n = min(row.shape[0] - offset - 1, vectors.shape[0])
            placed = vectors[:n].to(device=row.device, dtype=row.dtype)
            row = torch.cat([row[: offset + 1], placed, row[offset + 1 + n :]])
        return row[None]

    handle = encoder.get_input_embeddings().register_forward_hook(put)
    try:
        yield
    finally:
        handle.remove()


def _emphasis(z: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """A1111's "Original" emphasis: scale by the weights, then restore the original mean."""
    if all(w == 1.0 for w in weights):
        return z
    before = z.float().mean()
    z = z * torch.tensor(weights, device=z.device, dtype=z.dtype)[None, :, None]
    after = z.float().mean()
    if after.abs() > 1e-6:  # a tiny random CLIP can have mean ~0: avoid 0/0
        z = z * (before / after).to(z.dtype)
    return z


# Used by engine/conditioning.py (prompt editing: one text at a time, paired per step).
@torch.no_grad()
def encode_one(
    pipe: Any,
    prompt: str,
    *,
    clip_skip: int,
    sdxl: bool,
    negative: bool = False,
    vocabulary: Vocabulary | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One prompt's embeddings (and SDXL's pooled output), unpadded. `negative`: an empty SDXL
    negative prompt is zeros, as in A1111."""
    if sdxl:
        return _encode_sdxl(pipe, prompt, negative=negative, vocabulary=vocabulary)
    te, tok = pipe.text_encoder, pipe.tokenizer
    return _encode_one(tok, te, prompt, clip_skip, vocabulary=vocabulary)[0], None


pad = _pad
zero_chunk = _zero_chunk
