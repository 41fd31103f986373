"""Claim benchmark: what one claim costs with 100,000 queued jobs, on SQLite and PostgreSQL.

For each database: a fresh one is migrated to the revision before fair share (5b1f3c2d9e7a),
filled with N queued jobs of T owners (one big owner with half of them, the rest spread over the
others, in a random order) written as rows of the schema's table metadata, then migrated to the
head (which numbers the jobs' turns on a checkout with fair share). Then, in one process,
through the job store's own `claim` (the whole transaction: the slots' check, the claim, the
look for more):

  - EXPLAIN of the claim's UPDATE and of one submit's INSERT, as they were sent (PostgreSQL:
    EXPLAIN ANALYZE in a transaction rolled back), to show which index each reads;
  - C claims of 1 slot, then C claims of 4 slots (a worker whose own running jobs never block
    its slots), p50 / p99 / max in ms;
  - submits through the job store: 200 one after the other (p50 / p99 ms), and 2,000 at once
    (grouped commits: jobs/s, and the CPU this process spent per job, SQLite's included).

It prints figures and asserts nothing. The code measured is whatever `a1111_proxy` imports, so
the same script measures another checkout (before/after):

    PYTHONPATH=/path/to/checkout python bench/claim.py [--jobs 100000] [--only sqlite]

PostgreSQL: a throwaway database on --pg (default postgresql://root@127.0.0.1:5432/test).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy import event, insert

import a1111_proxy
from a1111_proxy.db.engine import Database
from a1111_proxy.db.tables import job_payloads, jobs
from a1111_proxy.jobs import JobRepository, NewJob
from a1111_proxy.migrate import upgrade

BEFORE_REVISION = "5b1f3c2d9e7a"  # the last revision before fair share
CHUNK = 5000


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=100_000, help="queued jobs")
    parser.add_argument("--owners", type=int, default=50, help="owners (one has half the jobs)")
    parser.add_argument("--claims", type=int, default=500, help="claims per slot count")
    parser.add_argument("--only", default="sqlite,postgres", help="sqlite, postgres or both")
    parser.add_argument("--pg", default="postgresql://root@127.0.0.1:5432/test")
    return parser.parse_args()


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def figures(label: str, seconds: list[float]) -> None:
    ms = [s * 1000 for s in seconds]
    print(
        f"  {label}: p50 {pct(ms, 50):.2f} ms, p99 {pct(ms, 99):.2f} ms, "
        f"max {max(ms):.2f} ms, mean {statistics.fmean(ms):.2f} ms (n={len(ms)})"
    )


# --- the data ----------------------------------------------------------------------------------


def owners_in_order(n: int, owners: int, rng: random.Random) -> list[str]:
    """Who submitted each of `n` jobs, in submit order: "big" half of them, the others the rest."""
    big = n // 2
    others = [f"tenant-{i:02d}" for i in range(owners - 1)]
    order = ["big"] * big + [others[i % len(others)] for i in range(n - big)]
    rng.shuffle(order)
    return order


def job_rows(n: int, owners: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rng = random.Random(7)
    now = time.time() - 3600
    rows, payloads = [], []
    for i, owner in enumerate(owners_in_order(n, owners, rng)):
        seq = i + 1
        body = json.dumps({"prompt": f"a lighthouse at dusk #{seq}", "steps": 20})
        created = now + i * 0.01
        rows.append(
            {
                "seq": seq,
                "id": str(uuid.uuid4()),
                "type": "txt2img",
                "status": "queued",
                "priority": 0,
                "request": body,
                "image_count": 0,
                "progress": 0.0,
                "attempts": 0,
                "max_attempts": 3,
                "run_after": created,
                "created_at": created,
                "updated_at": created,
                "owner": owner,
            }
        )
        payloads.append({"job_seq": seq, "body": body})
    return rows, payloads


async def fill(url: str, n: int, owners: int) -> None:
    rows, payloads = job_rows(n, owners)
    db = Database(url)
    try:
        for start in range(0, n, CHUNK):
            async with db.writing() as conn:
                await conn.execute(insert(jobs), rows[start : start + CHUNK])
                await conn.execute(insert(job_payloads), payloads[start : start + CHUNK])
        if not db.is_sqlite:  # the rows brought their seq: move the sequence past them
            async with db.writing() as conn:
                await conn.exec_driver_sql(
                    "SELECT setval(pg_get_serial_sequence('jobs', 'seq'), max(seq)) FROM jobs"
                )
                await conn.exec_driver_sql("ANALYZE jobs")
    finally:
        await db.dispose()


# --- EXPLAIN -----------------------------------------------------------------------------------


class Captured:
    """The first statement sent on `db`'s write engine that `wanted` picks, with its parameters."""

    def __init__(self, db: Database, wanted: Callable[[str], bool]) -> None:
        self.statement: tuple[str, Any] | None = None

        def listen(_conn: Any, _cursor: Any, statement: str, params: Any, *_: Any) -> None:
            if self.statement is None and wanted(statement):
                self.statement = (statement, params)

        self.listener = listen
        self.engine = db.write_engine.sync_engine
        event.listen(self.engine, "before_cursor_execute", listen)

    def stop(self) -> tuple[str, Any]:
        self.forget()
        assert self.statement is not None, "the statement was not sent"
        return self.statement

    def forget(self) -> None:
        if event.contains(self.engine, "before_cursor_execute", self.listener):
            event.remove(self.engine, "before_cursor_execute", self.listener)


async def explain(
    db: Database, title: str, captured: tuple[str, Any], *, analyze: bool = False
) -> None:
    """The plan of a statement sent before. PostgreSQL: its generic plan (what a prepared
    statement settles on after 5 runs), run with `analyze` in a transaction rolled back."""
    statement, params = captured
    async with db.write_engine.connect() as conn:
        transaction = await conn.begin()
        try:
            if db.is_sqlite:
                result = await conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", params)
            else:
                result = await _generic_plan(conn, statement, params, analyze)
            lines = [_plan_line(db, row) for row in result.all()]
        finally:
            await transaction.rollback()
    print(f"  {title}:")
    for line in lines:
        print(f"    {line}")


async def _generic_plan(conn: Any, statement: str, params: Any, analyze: bool) -> Any:
    await conn.exec_driver_sql(f"PREPARE bench_plan AS {statement}")
    await conn.exec_driver_sql("SET LOCAL plan_cache_mode = force_generic_plan")
    options = "ANALYZE, COSTS OFF, TIMING OFF" if analyze else "COSTS OFF"
    values = ", ".join(_sql_literal(value) for value in params)
    try:
        return await conn.exec_driver_sql(f"EXPLAIN ({options}) EXECUTE bench_plan({values})")
    finally:
        await conn.exec_driver_sql("DEALLOCATE bench_plan")


def _sql_literal(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    if isinstance(value, list):
        return "ARRAY[" + ", ".join(_sql_literal(item) for item in value) + "]"
    return repr(value)


def _reads_turns(sql: str) -> bool:
    return "json_each" in sql or "unnest" in sql


def _plan_line(db: Database, row: Any) -> str:
    return str(row[-1]) if db.is_sqlite else str(row[0])


# --- the measures ------------------------------------------------------------------------------


def new_job(owner: str) -> NewJob:
    body = json.dumps({"prompt": "a lighthouse at dusk", "steps": 20})
    return NewJob("txt2img", request=body, payload=body, owner=owner)


async def claims(repo: JobRepository, slots: int, count: int) -> list[float]:
    backends = [(f"http://bench-{slots}-{n}", None) for n in range(slots)]
    times = []
    for _ in range(count):
        start = time.perf_counter()
        claimed = await repo.claim("bench", backends)
        times.append(time.perf_counter() - start)
        assert len(claimed) == slots
    return times


async def measure(url: str, args: argparse.Namespace) -> None:
    db = Database(url)
    repo = JobRepository(db)
    try:
        capture = Captured(db, lambda sql: sql.lstrip().upper().startswith("WITH"))
        await claims(repo, 1, 1)
        await explain(db, "the claim (1 slot)", capture.stop(), analyze=True)
        capture = Captured(db, _reads_turns)
        await repo.submit(new_job("big"))
        capture.forget()
        if capture.statement is not None:  # fair share: a submit reads its turn first
            await explain(db, "a submit's look for its turn (the big owner)", capture.stop())
        await claims(repo, 1, 20)  # warm-up
        figures("claim, 1 slot ", await claims(repo, 1, args.claims))
        figures("claim, 4 slots", await claims(repo, 4, args.claims))
        await submits(repo)
    finally:
        await db.dispose()


async def submits(repo: JobRepository) -> None:
    times = []
    for n in range(200):
        start = time.perf_counter()
        await repo.submit(new_job(f"tenant-{n % 10:02d}"))
        times.append(time.perf_counter() - start)
    figures("submit, one after the other", times)
    start, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(repo.submit(new_job(f"tenant-{n % 49:02d}")) for n in range(2000)))
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(
        f"  submit, 2,000 at once: {2000 / wall:,.0f} jobs/s, "
        f"{cpu / 2000 * 1e6:.0f} us of this process's CPU per job"
    )


async def run_case(url: str, args: argparse.Namespace) -> None:
    await asyncio.to_thread(upgrade, url, BEFORE_REVISION)
    start = time.perf_counter()
    await fill(url, args.jobs, args.owners)
    filled = time.perf_counter() - start
    start = time.perf_counter()
    await asyncio.to_thread(upgrade, url)
    print(
        f"  {args.jobs:,} queued jobs of {args.owners} owners written in {filled:.1f} s; "
        f"migrated to the head in {time.perf_counter() - start:.1f} s"
    )
    await measure(url, args)


# --- the databases -----------------------------------------------------------------------------


async def admin(dsn: str, statement: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


async def postgres_case(args: argparse.Namespace) -> None:
    name = f"a1111_proxy_claim_{uuid.uuid4().hex[:8]}"
    await admin(args.pg, f'CREATE DATABASE "{name}"')
    host = args.pg.split("://", 1)[1].rsplit("/", 1)[0]
    try:
        conn = await asyncpg.connect(args.pg)
        version = await conn.fetchval("SHOW server_version")
        await conn.close()
        print(f"\nPostgreSQL {version}")
        await run_case(f"postgresql+asyncpg://{host}/{name}", args)
    finally:
        await admin(args.pg, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def sqlite_case(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as folder:
        print(f"\nSQLite {sqlite3.sqlite_version}")
        await run_case(f"sqlite+aiosqlite:///{Path(folder) / 'jobs.db'}", args)


def main() -> int:
    args = parse_args()
    print(
        f"a1111_proxy from {Path(a1111_proxy.__file__).parent.parent}; Python "
        f"{platform.python_version()}, {os.cpu_count()} cores"
    )
    only = set(args.only.split(","))
    if "sqlite" in only:
        asyncio.run(sqlite_case(args))
    if "postgres" in only:
        asyncio.run(postgres_case(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
