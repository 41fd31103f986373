"""JobReads: what the API and the worker read about jobs; never a write.

Job views and listings (as JobRecords), the queue in claim order, one caller's jobs (A1111's
global /progress, /interrupt and /skip act per caller), images and live previews, and the small
snapshots that event streams and wait mode poll (JobState).
"""

from __future__ import annotations

import functools
import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Select, bindparam, func, or_, select, text

from a1111_proxy.db.engine import Database
from a1111_proxy.db.sqlite_driver import (
    Prepared,
    named_rows,
    positional,
    read_on_connection_thread,
)
from a1111_proxy.db.tables import job_images, job_previews, jobs
from a1111_proxy.jobs.clauses import (
    PROMPT_SCAN,
    QUEUE_ORDER,
    QUEUED,
    JobFilter,
    deadline_sweep_due,
    in_status,
    prompt_like,
    prompt_matches,
    queued_ahead_of,
)
from a1111_proxy.jobs.records import (
    JOB_COLUMNS,
    JobPage,
    JobRecord,
    JobState,
    job_record,
    job_state,
)
from a1111_proxy.redaction import backend_name

# What a client polling a job reads, built once (building a statement costs more than running
# it on SQLite): the job by id (and owner), and its images.
_JOB = select(*JOB_COLUMNS).where(jobs.c.id == bindparam("b_id"))
_OWNED_JOB = _JOB.where(jobs.c.owner == bindparam("b_owner"))
_IMAGES = (
    select(job_images.c.data)
    .where(job_images.c.job_seq == bindparam("b_seq"))
    .order_by(job_images.c.n)
)
# How many queued jobs are ahead of a job (binds b_seq, b_priority): a queued job's poll.
_AHEAD = (
    select(func.count())
    .select_from(jobs)
    .where(QUEUED, queued_ahead_of(bindparam("b_seq"), bindparam("b_priority")))
)


# A1111's /progress: a caller's oldest running job, or the running job by id; how many of a
# caller's jobs are queued or running; a job's live preview.
_RUNNING_OF = (
    select(*JOB_COLUMNS)
    .where(jobs.c.owner == bindparam("b_owner"), in_status("processing"))
    .order_by(jobs.c.started_at)
    .limit(1)
)
_RUNNING_JOB = select(*JOB_COLUMNS).where(jobs.c.id == bindparam("b_id"), in_status("processing"))
_ACTIVE_COUNT = (
    select(func.count())
    .select_from(jobs)
    .where(jobs.c.owner == bindparam("b_owner"), or_(QUEUED, in_status("processing")))
)
_PREVIEW = select(job_previews.c.image).where(job_previews.c.job_seq == bindparam("b_seq"))


@functools.cache
def _progress_prepared(by_id: bool) -> tuple[Prepared, Prepared, Prepared]:
    return (
        positional(_RUNNING_JOB if by_id else _RUNNING_OF),
        positional(_ACTIVE_COUNT),
        positional(_PREVIEW),
    )


def _progress_sqlite(
    connection: sqlite3.Connection,
    by_id: bool,
    picked: dict[str, Any],
    owner: str,
    with_preview: bool,
) -> tuple[Any, int, str | None]:
    """On the connection's thread, in one snapshot: JobReads.progress_of."""
    running, active, previews = _progress_prepared(by_id)
    found = named_rows(connection.execute(running.sql, running.args(**picked)))
    [(count,)] = connection.execute(active.sql, active.args(b_owner=owner)).fetchall()
    preview = None
    if found and with_preview:
        image = connection.execute(previews.sql, previews.args(b_seq=found[0].seq)).fetchone()
        preview = None if image is None else image[0]
    return (found[0] if found else None), int(count), preview


@functools.cache
def _shown_prepared(owned: bool) -> tuple[Prepared, Prepared, Prepared]:
    """SQLite: the job (by id, and owner if `owned`), its images and its queue position's
    count, as sqlite3 takes them."""
    return positional(_OWNED_JOB if owned else _JOB), positional(_IMAGES), positional(_AHEAD)


def _shown_sqlite(
    connection: sqlite3.Connection, job_id: str, owner: str | None
) -> tuple[Any, list[bytes] | None, int | None] | None:
    """On the connection's thread, in one snapshot: JobReads.shown."""
    job, images, ahead = _shown_prepared(owner is not None)
    found = named_rows(connection.execute(job.sql, job.args(b_id=job_id, b_owner=owner)))
    if not found:
        return None
    row = found[0]
    if row.status == "queued":
        values = ahead.args(b_seq=row.seq, b_priority=row.priority)
        [(count,)] = connection.execute(ahead.sql, values).fetchall()
        return row, None, int(count) + 1
    if not row.image_count:
        return row, None, None
    data = connection.execute(images.sql, images.args(b_seq=row.seq)).fetchall()
    return row, [image for (image,) in data], None


class JobReads:
    def __init__(self, db: Database, *, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.clock = clock

    # --- one job, and pages of jobs ----------------------------------------------------------

    async def get(self, job_id: str) -> JobRecord | None:
        async with self.db.reading() as conn:
            row = (await conn.execute(_JOB, {"b_id": job_id})).one_or_none()
        return None if row is None else job_record(row)

    async def page(
        self,
        *,
        status: str | None = None,
        type: str | None = None,
        owner: str | None = None,
        before_seq: int | None = None,
        limit: int = 50,
    ) -> list[JobRecord]:
        """Jobs newest first, without their results (`result` is None: a listing never shows
        it); `owner`: only that tenant's; `before_seq` continues from the last job of a
        previous page."""
        found = await self.listing(
            JobFilter(status=status, type=type, owner=owner), before_seq=before_seq, limit=limit
        )
        return found.jobs

    async def listing(
        self, where: JobFilter, *, before_seq: int | None = None, limit: int = 50
    ) -> JobPage:
        """A page of jobs newest first (without results) and where the next page starts.

        With `where.prompt` a page looks at no more than PROMPT_SCAN jobs (those that pass the
        other filters): it may hold fewer than `limit` jobs, even none, and still have a next
        page. The prompt is matched in SQL against the stored request (LIKE over its JSON, so
        only a small window is read), then exactly against the decoded `prompt`."""
        query = select(*JOB_COLUMNS).where(*where.clauses()).order_by(jobs.c.seq.desc())
        if before_seq is not None:
            query = query.where(jobs.c.seq < before_seq)
        if where.prompt is None:
            async with self.db.reading() as conn:
                rows = (await conn.execute(query.limit(limit))).all()
            next_seq = rows[-1].seq if len(rows) == limit else None
            return JobPage([job_record(row, with_result=False) for row in rows], next_seq)
        return await self._prompt_page(query, where.prompt, limit)

    async def _prompt_page(self, query: Select[Any], prompt: str, limit: int) -> JobPage:
        window = query.with_only_columns(jobs.c.seq, prompt_like(prompt)).limit(PROMPT_SCAN)
        async with self.db.reading() as conn:
            scanned = (await conn.execute(window)).all()
            hits = [seq for seq, hit in scanned if hit][:limit]
            rows = (await conn.execute(query.where(jobs.c.seq.in_(hits)))).all() if hits else []
        if len(hits) == limit:
            next_seq: int | None = hits[-1]
        else:
            next_seq = scanned[-1].seq if len(scanned) == PROMPT_SCAN else None
        records = [job_record(row, with_result=False) for row in rows]
        return JobPage([r for r in records if prompt_matches(r, prompt)], next_seq)

    async def images(self, seq: int) -> list[bytes]:
        async with self.db.reading() as conn:
            return list((await conn.execute(_IMAGES, {"b_seq": seq})).scalars())

    async def image(self, seq: int, n: int) -> bytes | None:
        query = select(job_images.c.data).where(job_images.c.job_seq == seq, job_images.c.n == n)
        async with self.db.reading() as conn:
            return (await conn.execute(query)).scalar_one_or_none()

    async def preview(self, seq: int) -> str | None:
        query = select(job_previews.c.image).where(job_previews.c.job_seq == seq)
        async with self.db.reading() as conn:
            return (await conn.execute(query)).scalar_one_or_none()

    async def webhook_secret(self, seq: int) -> str | None:
        """The job's own signing secret, for the webhook sender only; never shown."""
        query = select(jobs.c.webhook_secret).where(jobs.c.seq == seq)
        async with self.db.reading() as conn:
            return (await conn.execute(query)).scalar_one_or_none()

    # --- one caller's jobs (A1111's global /progress, /interrupt, /skip, per caller) ---------

    async def shown(
        self, job_id: str, owner: str | None
    ) -> tuple[JobRecord, list[bytes] | None, int | None] | None:
        """The job (only `owner`'s, if given), its images if it has any, and its queue
        position while queued, in one read: what GET /jobs/{id} shows a client polling it."""
        if self.db.is_sqlite:  # one round trip to the connection's thread, with sqlite3
            async with self.db.reading() as conn:
                found = await read_on_connection_thread(
                    conn, lambda connection: _shown_sqlite(connection, job_id, owner)
                )
            return None if found is None else (job_record(found[0]), found[1], found[2])
        query = _JOB if owner is None else _OWNED_JOB
        async with self.db.reading() as conn:
            row = (await conn.execute(query, {"b_id": job_id, "b_owner": owner})).one_or_none()
            if row is None:
                return None
            images = position = None
            if row.status == "queued":
                values = {"b_seq": row.seq, "b_priority": row.priority}
                position = int((await conn.execute(_AHEAD, values)).scalar_one()) + 1
            elif row.image_count:
                images = list((await conn.execute(_IMAGES, {"b_seq": row.seq})).scalars())
        return job_record(row), images, position

    async def owned(self, owner: str, job_id: str) -> JobRecord | None:
        """The job, if `owner` submitted it."""
        async with self.db.reading() as conn:
            row = (await conn.execute(_OWNED_JOB, {"b_id": job_id, "b_owner": owner})).one_or_none()
        return None if row is None else job_record(row)

    async def progress_of(
        self, owner: str, job_id: str | None, *, with_preview: bool
    ) -> tuple[JobRecord | None, int, str | None]:
        """What A1111's /progress shows a caller, in one read: the job it reports (`owner`'s
        oldest running one, or `job_id` if it runs), how many of `owner`'s jobs are queued or
        running, and (`with_preview`) the job's live preview."""
        by_id = job_id is not None
        picked = {"b_id": job_id} if by_id else {"b_owner": owner}
        if self.db.is_sqlite:  # one round trip to the connection's thread, with sqlite3
            async with self.db.reading() as conn:
                row, count, preview = await read_on_connection_thread(
                    conn,
                    lambda connection: _progress_sqlite(
                        connection, by_id, picked, owner, with_preview
                    ),
                )
        else:
            async with self.db.reading() as conn:
                row = (await conn.execute(_RUNNING_JOB if by_id else _RUNNING_OF, picked)).first()
                count = (await conn.execute(_ACTIVE_COUNT, {"b_owner": owner})).scalar_one()
                preview = None
                if row is not None and with_preview:
                    found = await conn.execute(_PREVIEW, {"b_seq": row.seq})
                    preview = found.scalar_one_or_none()
        return (None if row is None else job_record(row)), int(count), preview

    # --- the queue ---------------------------------------------------------------------------

    async def queued(self, limit: int) -> tuple[list[JobRecord], int]:
        """The first `limit` queued jobs in claim order, and how many are queued in all."""
        query = select(*JOB_COLUMNS).where(QUEUED).order_by(*QUEUE_ORDER).limit(limit)
        total = select(func.count()).select_from(jobs).where(jobs.c.status == "queued")
        async with self.db.reading() as conn:
            rows = (await conn.execute(query)).all()
            count = int((await conn.execute(total)).scalar_one())
        return [job_record(row) for row in rows], count

    async def queue_position(self, job: JobRecord) -> int | None:
        """1 for the job that is claimed next; None unless queued. Jobs waiting out a retry
        backoff keep their place: they are claimed in this order once due."""
        if job.status != "queued":
            return None
        values = {"b_seq": job.seq, "b_priority": job.priority}
        async with self.db.reading() as conn:
            return int((await conn.execute(_AHEAD, values)).scalar_one()) + 1

    async def running(self) -> list[JobRecord]:
        query = (
            select(*JOB_COLUMNS).where(jobs.c.status == "processing").order_by(jobs.c.started_at)
        )
        async with self.db.reading() as conn:
            rows = (await conn.execute(query)).all()
        return [job_record(row) for row in rows]

    async def counts(self) -> dict[str, int]:
        query = select(jobs.c.status, func.count()).group_by(jobs.c.status)
        async with self.db.reading() as conn:
            found: dict[str, int] = {status: n for status, n in (await conn.execute(query)).all()}
        return {status: found.get(status, 0) for status in ("queued", "processing")} | found

    async def recent_durations(self, limit: int = 20, within: float = 86400.0) -> list[float]:
        """How long (started to completed, seconds) the last `limit` completed jobs ran."""
        query = (
            select(jobs.c.completed_at - jobs.c.started_at)
            .where(
                jobs.c.status == "completed",
                jobs.c.started_at.is_not(None),
                jobs.c.completed_at >= self.clock() - within,
            )
            .order_by(jobs.c.completed_at.desc())
            .limit(limit)
        )
        async with self.db.reading() as conn:
            return [float(d) for d in (await conn.execute(query)).scalars() if d is not None]

    # --- the worker's looks (cheap reads before a write) -------------------------------------

    async def has_due_job(self) -> bool:
        query = (
            select(jobs.c.seq)
            .where(jobs.c.status == "queued", jobs.c.run_after <= self.clock())
            .limit(1)
        )
        async with self.db.reading() as conn:
            return (await conn.execute(query)).first() is not None

    async def has_expired_deadline(self) -> bool:
        """A cheap read, so that the deadline sweep writes only when there is something to do."""
        query = select(jobs.c.seq).where(deadline_sweep_due(self.clock())).limit(1)
        async with self.db.reading() as conn:
            return (await conn.execute(query)).first() is not None

    async def busy_elsewhere(self, owner: str, backends: Sequence[str]) -> set[str]:
        """Which of `backends` run a job of another worker now (several workers may share an
        A1111): a control call such as unload-checkpoint must wait for it."""
        query = (
            select(jobs.c.backend)
            .distinct()
            .where(
                jobs.c.status == "processing",
                jobs.c.backend.in_([backend_name(name) for name in backends]),
                jobs.c.lease_owner != owner,
            )
        )
        async with self.db.reading() as conn:
            return set((await conn.execute(query)).scalars())

    # --- watching jobs (event streams, wait mode) --------------------------------------------

    async def snapshots(self, ids: Sequence[str]) -> dict[str, JobState]:
        """What changes while a job runs, for many jobs in one short read: status, attempts,
        progress, eta and when its live preview was last stored (never the image)."""
        query = (
            select(
                jobs.c.id,
                jobs.c.seq,
                jobs.c.status,
                jobs.c.attempts,
                jobs.c.progress,
                jobs.c.eta_relative,
                job_previews.c.updated_at.label("preview_at"),
            )
            .outerjoin(job_previews, job_previews.c.job_seq == jobs.c.seq)
            .where(jobs.c.id.in_(list(ids)))
        )
        async with self.db.reading() as conn:
            rows = (await conn.execute(query)).all()
        return {row.id: job_state(row) for row in rows}

    async def ping(self) -> None:
        async with self.db.reading() as conn:
            await conn.execute(text("SELECT 1"))
