"""A1111's prompt syntax, parsed (no torch): attention weights and 75-token chunks.

Written from the documented behaviour of A1111's `prompt_parser.parse_prompt_attention` and its
CLIP chunking (A1111 is AGPL; this is not its code). `(text)` weighs 1.1, `[text]` 1/1.1,
`(text:1.3)` 1.3; `\\(` is a literal bracket; `BREAK` starts a new chunk.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

CHUNK = 75
COMMA_BACKTRACK = 20
_TOKEN = re.compile(r"\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
BREAK = "BREAK"


def parse_attention(text: str) -> list[tuple[str, float]]:
    """'a (b:1.3) [c]' -> [('a ', 1.0), ('b', 1.3), (' ', 1.0), ('c', 0.909...)];
    a BREAK is the pair ('BREAK', -1)."""
    res: list[list[Any]] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for item in res[start:]:
            item[1] *= factor

    for match in _TOKEN.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            res.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(res))
        elif token == "[":
            square_open.append(len(res))
        elif weight is not None and round_open:
            scale(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            scale(round_open.pop(), 1.1)
        elif token == "]" and square_open:
            scale(square_open.pop(), 1 / 1.1)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i:
                    res.append([BREAK, -1])
                res.append([part, 1.0])
    for start in round_open:
        scale(start, 1.1)
    for start in square_open:
        scale(start, 1 / 1.1)
    return _merge(res or [["", 1.0]])


def _merge(res: list[list[Any]]) -> list[tuple[str, float]]:
    merged = [res[0]]
    for text, weight in res[1:]:
        if weight == merged[-1][1]:
            merged[-1][0] += text
        else:
            merged.append([text, weight])
    return [(text, weight) for text, weight in merged]


@dataclass(frozen=True)
class Found:
    """A textual-inversion embedding found in a fragment's tokens (engine/embeddings.py)."""

    name: str
    tokens: int  # how many of the fragment's tokens its name spans
    vectors: int  # how many token positions its vectors take


# (a fragment's token ids, a position in them) -> the embedding whose name starts there
FindEmbedding = Callable[[Sequence[int], int], Found | None]
PLACEHOLDER = 0  # the token id an embedding's positions carry (A1111's), its vectors go over it


@dataclass(frozen=True)
class Chunk:
    ids: list[int]  # BOS + 75 tokens + EOS = 77
    weights: list[float]
    # (offset among the 75 tokens, embedding name): its vectors go at offset + 1 (after BOS)
    fixes: tuple[tuple[int, str], ...] = ()


def chunks(
    parsed: Sequence[tuple[str, float]],
    token_ids: Sequence[Sequence[int]],
    *,
    bos: int,
    eos: int,
    comma: int | None,
    find: FindEmbedding | None = None,
) -> list[Chunk]:
    """Pack each fragment's token ids into 75-token chunks as A1111 does: a BREAK closes a
    chunk; a full chunk moves the words after its last comma (within 20 tokens) to the next.
    An embedding's k vectors take k positions, all in one chunk: one that does not fit in what
    is left of a chunk starts the next."""
    out: list[Chunk] = []
    ids: list[int] = []
    weights: list[float] = []
    fixes: list[tuple[int, str]] = []
    last_comma = -1

    def close() -> None:
        nonlocal ids, weights, fixes, last_comma
        pad = CHUNK - len(ids)
        out.append(
            Chunk(
                [bos, *ids, *[eos] * (pad + 1)],
                [1.0, *weights, *[1.0] * (pad + 1)],
                tuple(fixes),
            )
        )
        ids, weights, fixes, last_comma = [], [], [], -1

    for (text, weight), tokens in zip(parsed, token_ids, strict=True):
        if weight == -1 and text == BREAK:
            close()
            continue
        position = 0
        while position < len(tokens):
            token = tokens[position]
            if token == comma:
                last_comma = len(ids)
            elif (
                len(ids) == CHUNK and last_comma != -1 and len(ids) - last_comma <= COMMA_BACKTRACK
            ):
                # A1111 moves the tokens but leaves an embedding's fix in the closed chunk
                # (where its vectors then overwrite padding); done alike for the same result.
                cut = last_comma + 1
                moved_ids, moved_weights = ids[cut:], weights[cut:]
                ids, weights = ids[:cut], weights[:cut]
                close()
                ids, weights = moved_ids, moved_weights
            if len(ids) == CHUNK:
                close()
            found = find(tokens, position) if find is not None else None
            if found is None:
                ids.append(token)
                weights.append(weight)
                position += 1
                continue
            if len(ids) + found.vectors > CHUNK:
                close()
            fixes.append((len(ids), found.name))
            ids += [PLACEHOLDER] * found.vectors
            weights += [weight] * found.vectors
            position += found.tokens
    if ids or not out:
        close()
    return out
