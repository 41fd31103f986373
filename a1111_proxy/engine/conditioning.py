"""Prompt editing and alternation during sampling (torch): the conditioning changes per step.

Each distinct text of the prompt's and the negative prompt's schedules (engine/schedule.py) is
encoded once. The pipeline starts with step 0's embeddings; after each step the step callback
puts in those of the next step. Diffusers' SD and SDXL pipelines read `prompt_embeds` (with
classifier-free guidance: cat([uncond, cond])) and SDXL's pooled `add_text_embeds` back from
the callback's return value. Per step, the cond and uncond pair is padded to one length: with
empty-prompt chunks under A1111's pad_cond_uncond, else with zero chunks that cross-attention
leaves out (engine/attention.py). A prompt without editing is encoded exactly as before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from a1111_proxy.engine import attention, schedule, schedulers, text
from a1111_proxy.engine.embeddings import ANY, SDXL_KEYS, Vocabulary
from a1111_proxy.engine.samplers import Resolved

Encoded = tuple[torch.Tensor, torch.Tensor | None]  # (1, 77*k, C) and SDXL's pooled (1, P)


def total_steps(sampler: Resolved, steps: int) -> int:
    """Model evaluations in a run of `steps`: A1111 schedules prompts over these, and a second
    order sampler (Heun, DPM2, DPM2 a, DPM++ 2S a, DPM++ SDE) makes 2 * steps - 1 of them, in
    diffusers too (Restart, second order to A1111, as many; its restarts make more)."""
    cls = schedulers.scheduler_class(sampler.sampler.scheduler_class)
    second_order = getattr(cls, "order", 1) == 2 or getattr(cls, "second_order", False)
    return steps * 2 - 1 if second_order else steps


class Conditioning:
    """The embeddings of one pass: fixed (`first` only) or changing per step."""

    def __init__(
        self,
        first: text.Embeds,
        pick: Callable[[int], text.Embeds] | None = None,
    ) -> None:
        self.first = first
        self._pick = pick

    @property
    def scheduled(self) -> bool:
        return self._pick is not None

    @property
    def padded(self) -> bool:
        """Whether cross-attention must leave out zero padding (engine/attention.py): a prompt
        and a negative prompt of different lengths; with prompt editing, always."""
        return self.scheduled or attention.padded(self.first.cond, self.first.uncond)

    def at(self, step: int) -> text.Embeds:
        """The embeddings for the 0-based sampling step."""
        return self.first if self._pick is None else self._pick(step)

    def attach(self, kwargs: dict[str, Any], size: int, dtype: torch.dtype) -> None:
        """Make the pipeline call's step callback switch the conditioning (no-op if fixed)."""
        if self._pick is None:
            return
        inner = kwargs["callback_on_step_end"]
        names = [*kwargs.get("callback_on_step_end_tensor_inputs", ["latents"]), "prompt_embeds"]
        if self.first.pooled is not None:
            names.append("add_text_embeds")

        def on_step_end(pipe: Any, i: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            tensors = inner(pipe, i, t, tensors)
            embeds = self.at(i + 1)  # what the next step uses
            guided = pipe.do_classifier_free_guidance
            tensors["prompt_embeds"] = _batch(embeds.uncond, embeds.cond, size, dtype, guided)
            if "add_text_embeds" in tensors and embeds.pooled is not None:
                assert embeds.uncond_pooled is not None
                tensors["add_text_embeds"] = _batch(
                    embeds.uncond_pooled, embeds.pooled, size, dtype, guided
                ).to(tensors["add_text_embeds"].dtype)
            return tensors

        kwargs["callback_on_step_end"] = on_step_end
        kwargs["callback_on_step_end_tensor_inputs"] = list(dict.fromkeys(names))


def _batch(
    uncond: torch.Tensor, cond: torch.Tensor, size: int, dtype: torch.dtype, guided: bool
) -> torch.Tensor:
    def expand(z: torch.Tensor) -> torch.Tensor:
        return z.expand(size, *z.shape[1:]).to(dtype)

    return torch.cat([expand(uncond), expand(cond)]) if guided else expand(cond)


def encode(
    pipe: Any,
    prompt: str,
    negative: str,
    *,
    steps: int,
    clip_skip: int,
    sdxl: bool,
    hires_steps: int | None = None,
    pad_cond_uncond: bool = False,
    vocabulary: Vocabulary | None = None,
) -> Conditioning:
    """steps: the first pass's total steps; hires_steps: the second pass's, when encoding for
    hires fix (A1111 counts its edits on from the first pass). `vocabulary`: the embeddings the
    prompts may name; it records those used for the infotext's TI hashes."""
    cond = schedule.prompt_schedule(prompt, steps, hires_steps)
    uncond = schedule.prompt_schedule(negative, steps, hires_steps)
    if len(cond) == 1 and len(uncond) == 1:  # the common case: exactly the unscheduled path
        fixed = text.encode(
            pipe,
            cond[0][1],
            uncond[0][1],
            clip_skip=clip_skip,
            sdxl=sdxl,
            pad_cond_uncond=pad_cond_uncond,
            vocabulary=vocabulary,
        )
        _record(vocabulary, sdxl, cond, uncond)
        return Conditioning(fixed)
    encoded: dict[tuple[str, bool], Encoded] = {}

    # A1111 zeroes an SDXL negative only when every text of its schedule is empty.
    zero_negative = all(words == "" for _, words in uncond)

    def embed(words: str, negative: bool = False) -> Encoded:
        key = (words, negative and zero_negative)
        if key not in encoded:
            encoded[key] = text.encode_one(
                pipe, words, clip_skip=clip_skip, sdxl=sdxl, negative=key[1], vocabulary=vocabulary
            )
        return encoded[key]

    pairs: dict[tuple[str, str], text.Embeds] = {}

    def pick(step: int) -> text.Embeds:
        key = (_text_at(cond, step), _text_at(uncond, step))
        if key not in pairs:
            (c, pooled), (u, u_pooled) = embed(key[0]), embed(key[1], negative=True)
            if c.shape[1] != u.shape[1]:  # empty-prompt chunks or masked zero chunks
                empty = embed("")[0] if pad_cond_uncond else text.zero_chunk(c)
                c, u = text.pad(c, empty, u.shape[1]), text.pad(u, empty, c.shape[1])
            pairs[key] = text.Embeds(c, u, pooled, u_pooled)
        return pairs[key]

    for _, words in cond:  # every text now (each is used by some step): TI hashes need all
        embed(words)
    for _, words in uncond:
        embed(words, negative=True)
    _record(vocabulary, sdxl, cond, uncond)
    return Conditioning(pick(0), pick)


def _record(
    vocabulary: Vocabulary | None,
    sdxl: bool,
    cond: list[tuple[int, str]],
    uncond: list[tuple[int, str]],
) -> None:
    """TI hashes in A1111's order: it encodes the negative side, then the prompt's, each side's
    texts in one call per text encoder."""
    if vocabulary is not None:
        keys = SDXL_KEYS if sdxl else (ANY,)
        vocabulary.record([words for _, words in uncond], keys)
        vocabulary.record([words for _, words in cond], keys)


def _text_at(entries: list[tuple[int, str]], step: int) -> str:
    """A1111's reconstruct_cond_batch: the first entry whose end_at_step is >= the step."""
    for end, words in entries:
        if step <= end:
            return words
    return entries[-1][1]
