"""A1111's /sdapi/v1/memory shape: `{"ram": {free, used, total}, "cuda": {...}}`.

A1111 (`modules/api/api.py`, `get_memory`) reports its own process: `used` is the resident set
size, `total` the machine's memory and `free` their difference; `cuda` holds torch's counters, or
`{"error": "..."}` when there is no CUDA. No torch here: the API imports this module.
"""

from __future__ import annotations

import os
import resource
import sys
from typing import Any


def process_ram() -> dict[str, Any]:
    """This process's `ram` as A1111 reports it, or `{"error": ...}` where it cannot be read."""
    try:
        used = _rss()
        total = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (OSError, ValueError, AttributeError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"free": total - used, "used": used, "total": total}


def _rss() -> int:
    try:  # Linux: the current resident set, in pages
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # elsewhere: the peak (kilobytes on Linux, bytes on macOS)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)


def unknown(reason: str) -> dict[str, Any]:
    """The answer when no backend has reported its memory: this process's RAM, and why `cuda`
    is missing."""
    return {"ram": process_ram(), "cuda": {"error": reason}}
