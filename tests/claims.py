"""Claiming one job at a time, as tests do (the worker claims for all its free slots at once)."""

from __future__ import annotations

from a1111_proxy.jobs import Claim, JobRepository


async def claim_next(repo: JobRepository, owner: str, backend: str) -> Claim | None:
    """Lease the next due job to `owner` for one slot on `backend`; None when none is due (or
    that backend runs another worker's job)."""
    claimed = await repo.claim(owner, [(backend, None)])
    return claimed[0][1] if claimed else None
