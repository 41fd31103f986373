"""What people are shown of URLs that may carry credentials.

A backend URL may carry `user:password@` (A1111_URLS=http://user:pass@host:7860, for an A1111
started with --api-auth). The worker connects with it; everything shown (health, metrics, the
job's `backend`, error messages, log lines) names the backend by `backend_name`, the URL
without its user name and password. `scrub` removes them from any text that may echo a URL.
"""

from __future__ import annotations

import re
from typing import Any

# scheme://userinfo@ : the userinfo is everything up to the last "@" before the host ends.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)[^/?#\s@]*(?:@[^/?#\s@]*)*@")


def scrub(text: str) -> str:
    """`text` with the `user:password@` of every URL in it removed."""
    if "@" not in text:
        return text
    return _USERINFO.sub(r"\g<scheme>", text)


def backend_name(url: str) -> str:
    """The name of a backend shown to people: its URL without user name and password, and
    without a trailing slash (`http://user:pass@host:7860/` -> `http://host:7860`). A name that
    is no URL (`diffusers:host:cuda`, `fake0`) is its own name."""
    return scrub(url).rstrip("/")


def scrub_all(value: Any) -> Any:
    """`value` (decoded JSON) with `scrub` applied to every string in it, keys included."""
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {scrub_all(key): scrub_all(item) for key, item in value.items()}
    if isinstance(value, list):
        return [scrub_all(item) for item in value]
    return value
