"""Retention: deleting finished jobs past RETENTION, and giving SQLite's free pages back."""

from __future__ import annotations

from sqlalchemy import delete, select

from a1111_proxy.db.engine import Database
from a1111_proxy.db.tables import job_images, job_payloads, job_previews, jobs
from a1111_proxy.deliveries import DeliveryRepository
from a1111_proxy.jobs.records import TERMINAL


class Retention:
    def __init__(self, db: Database, deliveries: DeliveryRepository) -> None:
        self.db = db
        self.deliveries = deliveries

    async def purge_finished(self, older_than: float, batch: int = 100) -> int:
        """Delete up to `batch` finished jobs that ended before `older_than` (unix time), with
        their payloads, images, previews and webhook deliveries (ON DELETE CASCADE). A job
        whose webhook is still pending or being sent is kept until that delivery ends.
        One short transaction; returns how many jobs went."""
        chosen = (
            select(jobs.c.seq)
            .where(
                jobs.c.completed_at < older_than,
                jobs.c.status.in_(tuple(TERMINAL)),
                ~self.deliveries.undelivered(jobs.c.seq),
            )
            .order_by(jobs.c.completed_at)
            .limit(batch)
        )
        async with self.db.writing() as conn:
            seqs = list((await conn.execute(chosen)).scalars())
            if seqs:
                # Children first: correct even where foreign keys are not enforced.
                for child in (job_payloads, job_images, job_previews):
                    await conn.execute(delete(child).where(child.c.job_seq.in_(seqs)))
                await self.deliveries.delete_for_jobs(conn, seqs)
                await conn.execute(delete(jobs).where(jobs.c.seq.in_(seqs)))
        return len(seqs)

    async def reclaim_space(self, pages: int = 2000) -> int:
        """SQLite: give up to `pages` free pages back to the file system (incremental vacuum;
        the file must have auto_vacuum=INCREMENTAL, which the migrations set). Returns the
        number of free pages left. PostgreSQL: autovacuum does this; nothing to do."""
        if not self.db.is_sqlite:
            return 0
        async with self.db.write_engine.connect() as conn:
            # The pragma frees one page per step, and the driver's execute() steps once: run it
            # as a script, which steps it to the end (its own short write transaction).
            raw = (await conn.get_raw_connection()).driver_connection
            assert raw is not None
            await raw.executescript(f"PRAGMA incremental_vacuum({int(pages)})")
        async with self.db.reading() as conn:
            return int((await conn.exec_driver_sql("PRAGMA freelist_count")).scalar_one())
