"""Generation backends: where a claimed job actually runs."""

from __future__ import annotations

from a1111_proxy.backends.base import (
    REFRESHES,
    Backend,
    Batch,
    Batching,
    BackendError,
    BackendProtocolError,
    BackendRejected,
    BackendUnavailable,
    Progress,
    Refresh,
    Runner,
)

__all__ = [
    "REFRESHES",
    "Backend",
    "Batch",
    "Batching",
    "BackendError",
    "BackendProtocolError",
    "BackendRejected",
    "BackendUnavailable",
    "Progress",
    "Refresh",
    "Runner",
]
