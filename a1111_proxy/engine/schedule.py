"""A1111's prompt editing and alternation, as per-step prompt texts (plain Python, no torch).

`[from:to:when]` swaps `from` for `to` after step `when`; `[to:when]` adds and `[from::when]`
removes; `when` with a "." is a fraction of the steps, a whole number is a step. `[a|b|c]`
changes every step. Written from the documented behaviour of A1111's
`prompt_parser.get_learned_conditioning_prompt_schedules` (A1111 is AGPL; this is not its code):
the result is A1111's list of `(end_at_step, text)`, and the text of entry i is used while the
0-based sampling step is <= its end_at_step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union

# A node of the parsed prompt: plain text, or one of the classes below.
Node = Union[str, "Group", "Square", "Alternate", "Scheduled"]
_WHEN = re.compile(r"\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\]")


@dataclass(frozen=True)
class Group:  # "( ... )": kept with its brackets for the attention parser
    nodes: list[Node]


@dataclass(frozen=True)
class Square:  # "[...]" that is neither edit nor alternation: kept as text, brackets and all
    parts: list[list[Node]]
    seps: list[str]


@dataclass(frozen=True)
class Alternate:  # [a|b|c]
    options: list[list[Node]]


@dataclass(frozen=True)
class Scheduled:  # [before:after:when]; before is None for [after:when]
    before: list[Node] | None
    after: list[Node]
    when: str


class _Unparsable(ValueError):
    """Where A1111's grammar fails, it keeps the prompt as it is."""


def prompt_schedule(
    prompt: str, steps: int, hires_steps: int | None = None
) -> list[tuple[int, str]]:
    """-> [(end_at_step, text), ...]. With hires_steps (the hires fix pass), `when` counts on
    from the first pass: a whole number N is step N - steps, a fraction F is
    (F - 1) * hires_steps."""
    try:
        nodes = _parse(prompt)
    except _Unparsable:
        nodes = [prompt]
    total = steps if hires_steps is None else hires_steps
    offsets = (0.0, 0.0) if hires_steps is None else (float(steps), 1.0)
    ends = {total}
    _collect(nodes, total, offsets, ends)
    if ends == {total} and not _dynamic(nodes):
        return [(total, prompt)]  # nothing to schedule: the prompt exactly as given
    return [(end, _render(nodes, end, total, offsets)) for end in sorted(ends)]


def _parse(text: str) -> list[Node]:
    return _sequence(text, 0, "top")[0]


_STOPS = {"top": "", "group": ")", "bracket": "]|:"}


def _sequence(text: str, i: int, mode: str) -> tuple[list[Node], int]:
    """Nodes up to the mode's stop character. In "top" and "group" (inside "( )") a "|" makes
    the prompt unparsable, as in A1111's grammar; in "bracket" ":" and "|" end a part."""
    out: list[Node] = []
    buf = ""
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            buf, i = buf + text[i : i + 2], i + 2
            continue
        if c in _STOPS[mode]:
            break
        if c == "|":
            raise _Unparsable(text)
        node: Node | None = None
        if c == "[":
            node, j = _bracket(text, i + 1)
        elif c == "(":
            inner, j = _sequence(text, i + 1, "group")
            node, j = (Group(inner), j + 1) if j < len(text) else (None, j)
        if node is None:  # an unclosed bracket is a literal character
            buf, i = buf + c, i + 1
            continue
        if buf:
            out.append(buf)
            buf = ""
        out.append(node)
        i = j
    if buf:
        out.append(buf)
    return out, i


def _bracket(text: str, i: int) -> tuple[Node | None, int]:
    """After a "[": an edit, an alternation, a plain "[...]" (emphasis), or None if unclosed."""
    parts: list[list[Node]] = []
    seps: list[str] = []
    while True:
        nodes, i = _sequence(text, i, "bracket")
        parts.append(nodes)
        if i >= len(text):
            return None, i
        c = text[i]
        if c == "]":
            break
        if c == ":":
            when = _WHEN.match(text, i + 1)
            if when and seps.count(":") <= 1:  # "|" before it is plain text, as in A1111
                groups = _join_alternatives(parts, seps)
                before = groups[0] if len(groups) == 2 else None
                return Scheduled(before, groups[-1], when.group(1)), when.end()
        seps.append(c)
        i += 1
    if seps and all(sep == "|" for sep in seps):
        return Alternate(parts), i + 1
    return Square(parts, seps), i + 1


def _join_alternatives(parts: list[list[Node]], seps: list[str]) -> list[list[Node]]:
    groups: list[list[Node]] = [list(parts[0])]
    for sep, part in zip(seps, parts[1:], strict=True):
        if sep == ":":
            groups.append(list(part))
        else:
            groups[-1] += [sep, *part]
    return groups


def _when(when: str, total: int, offsets: tuple[float, float]) -> int:
    steps_offset, fraction_offset = offsets
    value = float(when)
    value = (value - fraction_offset) * total if "." in when else value - steps_offset
    return min(total, int(value))


def _collect(nodes: list[Node], total: int, offsets: tuple[float, float], ends: set[int]) -> None:
    for node in nodes:
        if isinstance(node, Group):
            _collect(node.nodes, total, offsets, ends)
        elif isinstance(node, Square):
            for part in node.parts:
                _collect(part, total, offsets, ends)
        elif isinstance(node, Alternate):
            ends.update(range(1, total + 1))
            for option in node.options:
                _collect(option, total, offsets, ends)
        elif isinstance(node, Scheduled):
            end = _when(node.when, total, offsets)
            if end >= 1:
                ends.add(end)
            _collect(node.before or [], total, offsets, ends)
            _collect(node.after, total, offsets, ends)


def _dynamic(nodes: list[Node]) -> bool:
    """Whether any edit or alternation is in the prompt (even one whose switch never comes)."""
    for node in nodes:
        if isinstance(node, (Alternate, Scheduled)):
            return True
        if isinstance(node, Group) and _dynamic(node.nodes):
            return True
        if isinstance(node, Square) and any(_dynamic(part) for part in node.parts):
            return True
    return False


def _render(nodes: list[Node], step: int, total: int, offsets: tuple[float, float]) -> str:
    out = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, Group):
            out.append("(" + _render(node.nodes, step, total, offsets) + ")")
        elif isinstance(node, Square):
            inner = [_render(part, step, total, offsets) for part in node.parts]
            joined = "".join(s + t for s, t in zip(node.seps, inner[1:], strict=True))
            out.append("[" + inner[0] + joined + "]")
        elif isinstance(node, Alternate):
            out.append(_render(node.options[(step - 1) % len(node.options)], step, total, offsets))
        else:
            chosen = node.before or [] if step <= _when(node.when, total, offsets) else node.after
            out.append(_render(chosen, step, total, offsets))
    return "".join(out)
