"""The engine's /sdapi/v1/memory answer, in A1111's shape (torch)."""

from __future__ import annotations

from typing import Any

import torch

from a1111_proxy.memory import process_ram


def report(device: torch.device) -> dict[str, Any]:
    """`ram` of the worker process that runs the engine; `cuda` of its device, as A1111's
    `get_memory` reads it, or `{"error": "unavailable"}` off CUDA (as A1111 answers)."""
    return {"ram": process_ram(), "cuda": _cuda(device)}


def _cuda(device: torch.device) -> dict[str, Any]:
    if device.type != "cuda" or not torch.cuda.is_available():
        return {"error": f"unavailable (the engine runs on {device.type})"}
    try:
        free, total = torch.cuda.mem_get_info(device)
        stats = torch.cuda.memory_stats(device)
    except RuntimeError as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}

    def pair(name: str) -> dict[str, int]:
        return {
            "current": stats.get(f"{name}.all.current", 0),
            "peak": stats.get(f"{name}.all.peak", 0),
        }

    return {
        "system": {"free": free, "used": total - free, "total": total},
        "active": pair("active_bytes"),
        "allocated": pair("allocated_bytes"),
        "reserved": pair("reserved_bytes"),
        "inactive": pair("inactive_split_bytes"),
        "events": {"retries": stats.get("num_alloc_retries", 0), "oom": stats.get("num_ooms", 0)},
    }
