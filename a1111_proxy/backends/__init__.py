"""Generation backends: where a claimed job actually runs."""

from __future__ import annotations

from a1111_proxy.backends.base import (
    Backend,
    BackendError,
    BackendProtocolError,
    BackendRejected,
    BackendUnavailable,
    Progress,
)

__all__ = [
    "Backend",
    "BackendError",
    "BackendProtocolError",
    "BackendRejected",
    "BackendUnavailable",
    "Progress",
]
