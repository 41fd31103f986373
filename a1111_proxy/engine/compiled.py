"""ENGINE_COMPILE: one compiled UNet per (height, width, batch rows) bucket, kept for later jobs
(torch).

`torch.compile(dynamic=False)` specialises a graph to its input shapes, and the shapes a UNet
sees are fixed by the image size and the number of rows (the batch, doubled for CFG inside the
pipeline). Each bucket gets its own compiled wrapper the first time a job needs it; later jobs
of the same bucket reuse it and compile nothing. The loaded model's own UNet stays eager: the
compiled wrappers share its weights (LoRA fused into them, attention processors set on it), and
a job outside every bucket (a hires fix's second pass at a new size) gets a bucket of its own.

Dynamo keeps at most `torch._dynamo.config.recompile_limit` (8 by default) compiled versions of
one code object, and every bucket's wrapper compiles the same UNet code (with our attention
processors adding variants); past the limit it runs the UNet eagerly. The engine raises the limit
to RECOMPILE_LIMIT when it compiles, so that the buckets of a server's usual sizes all fit.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("a1111_proxy.engine")

Bucket = tuple[int, int, int]  # height, width, batch rows
Compiler = Callable[[Any], Any]  # an eager UNet -> its compiled stand-in
RECOMPILE_LIMIT = 64  # compiled versions dynamo keeps per code object (its default is 8)


def compile_unet(unet: Any, mode: str = "default") -> Any:
    """torch.compile with static shapes (one graph per bucket, no dynamic-shape guards), in
    ENGINE_COMPILE_MODE's mode."""
    import torch
    import torch._dynamo.config

    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = max(limit, RECOMPILE_LIMIT)
    return torch.compile(unet, dynamic=False, mode=None if mode == "default" else mode)


def unet_compiler(mode: str) -> Compiler:
    """The compiler for ENGINE_COMPILE_MODE `mode`."""
    return functools.partial(compile_unet, mode=mode)


class Buckets:
    """The compiled UNets of one loaded model, by bucket. Used from the engine thread only."""

    def __init__(self, compiler: Compiler = compile_unet) -> None:
        self.compiler = compiler
        self._compiled: dict[Bucket, Any] = {}

    def unet(self, unet: Any, bucket: Bucket) -> Any:
        """The compiled UNet for `bucket`, compiling it the first time."""
        if bucket not in self._compiled:
            log.info("compiling the UNet for %dx%d, %d rows (first use of this size)", *bucket)
            self._compiled[bucket] = self.compiler(unet)
        return self._compiled[bucket]

    @property
    def buckets(self) -> list[Bucket]:
        """The buckets compiled so far, in the order they were first used."""
        return list(self._compiled)


def eager(unet: Any) -> Any:
    """The module under a compiled wrapper (its own names, processors and parameters)."""
    return getattr(unet, "_orig_mod", unet)
