"""Generation backends: where a claimed job actually runs."""

from __future__ import annotations

from a1111_proxy.backends.base import (
    REFRESHES,
    Backend,
    BackendError,
    BackendProtocolError,
    BackendRejected,
    BackendUnavailable,
    Batch,
    Batching,
    Progress,
    Refresh,
    Runner,
)

__all__ = [
    "REFRESHES",
    "Backend",
    "BackendError",
    "BackendProtocolError",
    "BackendRejected",
    "BackendUnavailable",
    "Batch",
    "Batching",
    "Progress",
    "Refresh",
    "Runner",
]
