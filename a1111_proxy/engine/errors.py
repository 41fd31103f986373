"""The engine's errors (a leaf: it imports nothing from the engine, so every module can use it).

`InvalidParams` is what the backend turns into a refusal; `UnknownSampler` and `HiresError` are
raised by the plain-data modules and become `InvalidParams` in `params`; `Canceled` ends a run.
"""

from __future__ import annotations


class InvalidParams(ValueError):
    """The request cannot run on this engine; the message says what to change."""


class UnknownSampler(ValueError):
    """A sampler or schedule name the engine cannot run; the message lists the valid ones."""


class HiresError(ValueError):
    """The hires fix fields cannot run; the message names the field and what to send."""


class Canceled(Exception):
    """The job was canceled mid-run; nothing is returned."""
