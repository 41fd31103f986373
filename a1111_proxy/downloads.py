"""DownloadStore: the only code that issues SQL on the `downloads` table (model downloads).

A download's life:

    queued --claim--> running --verified and in place--> completed
      ^                  |----refused, mismatch, no space, not found--> failed
      |                  |----cancel--> canceled (the part file removed)
      +----requeue-------+   (Civitai or the connection failed; the part file is kept)
      +----lease expired (its worker died): claimed again, resumed from the part file
    queued --cancel--> canceled

The API adds and cancels; a worker claims one in a short transaction (a lease, as jobs have, so
that two workers never fetch the same file), renews the lease while it streams (`touch`, which
also tells it a cancel was asked for) and ends it; every write after the claim is fenced by the
lease token. Rows are decoded once into `DownloadRecord`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import Row, and_, insert, or_, select, update

from a1111_proxy.db.engine import Database
from a1111_proxy.db.tables import downloads

TERMINAL = frozenset({"completed", "failed", "canceled"})
ACTIVE = ("queued", "running")
MAX_ATTEMPTS = 5  # claims (worker deaths and requeues included) before a download fails

_d = downloads
_NO_LEASE = {"lease_owner": None, "lease_token": None, "lease_expires_at": None}


@dataclass(frozen=True)
class DownloadRecord:
    seq: int
    id: str
    source: str
    kind: str | None
    file: str | None
    sha256: str | None
    status: str
    requested_by: str | None
    url: str | None
    path: str | None  # inside MODELS_DIR: "<folder>/<file name>"
    version: dict[str, Any] | None  # Civitai's model-version JSON
    bytes_done: int
    bytes_total: int | None
    speed: float | None
    error: str | None
    attempts: int
    cancel_requested_at: float | None
    created_at: float
    started_at: float | None
    completed_at: float | None
    updated_at: float

    @classmethod
    def from_row(cls, row: Row[Any]) -> DownloadRecord:
        values = dict(row._mapping)
        values["version"] = json.loads(values["version"]) if values["version"] else None
        return cls(**{name: values[name] for name in _FIELDS})


_FIELDS = tuple(DownloadRecord.__dataclass_fields__)
_COLUMNS = [_d.c[name] for name in _FIELDS]


@dataclass(frozen=True)
class DownloadClaim:
    """A download this worker holds the lease on."""

    record: DownloadRecord
    token: str

    @property
    def id(self) -> str:
        return self.record.id


@dataclass(frozen=True)
class Plan:
    """What the worker resolved the source to: where the file comes from and where it goes."""

    kind: str
    url: str
    path: str  # inside MODELS_DIR
    sha256: str | None
    bytes_total: int | None
    version: dict[str, Any] | None


@dataclass(frozen=True)
class Touch:
    held: bool  # False: the lease is lost (another worker may hold it): stop at once
    cancel: bool  # a cancel was asked for


class DownloadStore:
    def __init__(
        self,
        db: Database,
        *,
        max_attempts: int = MAX_ATTEMPTS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.max_attempts = max_attempts
        self.clock = clock

    # --- the API's side -------------------------------------------------------------------

    async def add(
        self,
        source: str,
        *,
        kind: str | None,
        file: str | None,
        sha256: str | None,
        requested_by: str | None,
    ) -> DownloadRecord:
        now = self.clock()
        values = {
            "id": str(uuid.uuid4()),
            "source": source,
            "kind": kind,
            "file": file,
            "sha256": sha256,
            "status": "queued",
            "requested_by": requested_by,
            "run_after": now,
            "created_at": now,
            "updated_at": now,
        }
        async with self.db.writing() as conn:
            row = (await conn.execute(insert(_d).values(**values).returning(*_COLUMNS))).one()
        return DownloadRecord.from_row(row)

    async def get(self, download_id: str) -> DownloadRecord | None:
        async with self.db.reading() as conn:
            row = (await conn.execute(select(*_COLUMNS).where(_d.c.id == download_id))).first()
        return None if row is None else DownloadRecord.from_row(row)

    async def page(self, status: str | None, limit: int) -> list[DownloadRecord]:
        """The newest `limit` downloads (with this status)."""
        query = select(*_COLUMNS).order_by(_d.c.seq.desc()).limit(limit)
        if status is not None:
            query = query.where(_d.c.status == status)
        async with self.db.reading() as conn:
            return [DownloadRecord.from_row(row) for row in await conn.execute(query)]

    async def cancel(self, download_id: str) -> DownloadRecord | None:
        """A queued download ends canceled at once; a running one is asked to stop (its worker
        removes the part file and ends it); a finished one stays as it is."""
        now = self.clock()
        queued = and_(_d.c.id == download_id, _d.c.status == "queued")
        running = and_(
            _d.c.id == download_id, _d.c.status == "running", _d.c.cancel_requested_at.is_(None)
        )
        async with self.db.writing() as conn:
            await conn.execute(
                update(_d)
                .where(queued)
                .values(status="canceled", completed_at=now, updated_at=now, speed=None)
            )
            await conn.execute(
                update(_d).where(running).values(cancel_requested_at=now, updated_at=now)
            )
            row = (await conn.execute(select(*_COLUMNS).where(_d.c.id == download_id))).first()
        return None if row is None else DownloadRecord.from_row(row)

    # --- the worker's side ----------------------------------------------------------------

    def _due(self, now: float) -> Any:
        queued = and_(_d.c.status == "queued", _d.c.run_after <= now)
        abandoned = and_(_d.c.status == "running", _d.c.lease_expires_at < now)
        return or_(queued, abandoned)

    async def has_due(self) -> bool:
        query = select(_d.c.seq).where(self._due(self.clock())).limit(1)
        async with self.db.reading() as conn:
            return (await conn.execute(query)).first() is not None

    async def claim(self, owner: str, lease_seconds: float) -> DownloadClaim | None:
        """Lease the oldest due download: a queued one, or one whose worker's lease expired."""
        now = self.clock()
        chosen = (
            select(_d.c.seq)
            .where(self._due(now))
            .order_by(_d.c.seq)
            .limit(1)
            .with_for_update(skip_locked=True, of=_d)
        )
        token = str(uuid.uuid4())
        statement = (
            update(_d)
            .where(_d.c.seq.in_(chosen))
            .values(
                status="running",
                attempts=_d.c.attempts + 1,
                lease_owner=owner,
                lease_token=token,
                lease_expires_at=now + lease_seconds,
                started_at=now,
                updated_at=now,
            )
            .returning(*_COLUMNS)
        )
        async with self.db.writing() as conn:
            row = (await conn.execute(statement)).first()
        return None if row is None else DownloadClaim(DownloadRecord.from_row(row), token)

    async def resolved(self, claim: DownloadClaim, plan: Plan) -> DownloadClaim | None:
        """Keep what the source resolved to; None when the lease is lost."""
        values: dict[str, Any] = {
            "kind": plan.kind,
            "url": plan.url,
            "path": plan.path,
            "sha256": plan.sha256,
            "bytes_total": plan.bytes_total,
        }
        version = None if plan.version is None else json.dumps(plan.version)
        if not await self._fenced(claim, version=version, **values):
            return None
        record = replace(claim.record, version=plan.version, **values)
        return DownloadClaim(record, claim.token)

    async def touch(
        self,
        claim: DownloadClaim,
        lease_seconds: float,
        *,
        bytes_done: int,
        bytes_total: int | None,
        speed: float | None,
    ) -> Touch:
        """Renew the lease and show the progress; says whether a cancel was asked for."""
        now = self.clock()
        statement = (
            update(_d)
            .where(_d.c.id == claim.id, _d.c.lease_token == claim.token)
            .values(
                bytes_done=bytes_done,
                bytes_total=bytes_total,
                speed=speed,
                lease_expires_at=now + lease_seconds,
                updated_at=now,
            )
            .returning(_d.c.cancel_requested_at)
        )
        async with self.db.writing() as conn:
            row = (await conn.execute(statement)).first()
        return Touch(held=row is not None, cancel=row is not None and row[0] is not None)

    async def writer_of(self, claim: DownloadClaim, path: str) -> str | None:
        """The id of another download that is writing `path` now (a live lease), if any."""
        query = select(_d.c.id).where(
            _d.c.path == path,
            _d.c.id != claim.id,
            _d.c.status == "running",
            _d.c.lease_expires_at >= self.clock(),
        )
        async with self.db.reading() as conn:
            return (await conn.execute(query.limit(1))).scalar_one_or_none()

    async def finish(
        self, claim: DownloadClaim, status: str, error: str | None = None, **values: Any
    ) -> bool:
        """End it: completed, failed or canceled. False when the lease was lost."""
        assert status in TERMINAL
        now = self.clock()
        return await self._fenced(
            claim,
            status=status,
            error=error,
            speed=None,
            completed_at=now,
            **_NO_LEASE,
            **values,
        )

    async def requeue(self, claim: DownloadClaim, delay: float, error: str) -> str | None:
        """Give it back to be tried again after `delay` seconds (its part file kept), or end it
        failed once it was claimed MAX_ATTEMPTS times. The status it got; None: lease lost."""
        if claim.record.attempts >= self.max_attempts:
            message = f"{error} (gave up after {claim.record.attempts} attempts)"
            return "failed" if await self.finish(claim, "failed", message) else None
        run_after = self.clock() + delay
        done = await self._fenced(
            claim, status="queued", error=error, run_after=run_after, speed=None, **_NO_LEASE
        )
        return "queued" if done else None

    async def release(self, claim: DownloadClaim) -> bool:
        """Give it back at once, this claim not counted (the worker is stopping)."""
        return await self._fenced(
            claim,
            status="queued",
            run_after=self.clock(),
            attempts=_d.c.attempts - 1,
            speed=None,
            **_NO_LEASE,
        )

    async def _fenced(self, claim: DownloadClaim, **values: Any) -> bool:
        statement = (
            update(_d)
            .where(_d.c.id == claim.id, _d.c.lease_token == claim.token)
            .values(updated_at=self.clock(), **values)
        )
        async with self.db.writing() as conn:
            return (await conn.execute(statement)).rowcount == 1
