"""Scale-out benchmark on PostgreSQL: prints figures, asserts nothing.

Parts (`--only` picks some, comma-separated):

  throughput  For 1, 2 and 4 fake A1111 backends (service time S each, one job at a time like
              A1111): N jobs per backend submitted at once through the API, run by W workers
              that all list every backend. Throughput = jobs / (first submit -> last completion
              seen); ideal = backends / S; efficiency = throughput / ideal (target >= 0.95).
  pickup      An idle worker (waiting on LISTEN) and single jobs submitted one at a time:
              created_at -> started_at per job, p50 / p95 / max (target < 50 ms).

Everything runs as real processes on loopback; each case gets a throwaway database on the
PostgreSQL server (`--pg`, default postgresql://root@127.0.0.1:5432/test), dropped afterwards.
Run: `.venv/bin/python bench/scale.py [--only throughput] [-S 0.5] [--workers 3]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import Http, Stack, kill_all, ms, pct, ts, wait_http  # noqa: E402

SMALL = b'{"prompt": "a lighthouse at dusk", "steps": 4}'


@contextlib.asynccontextmanager
async def pg_database(admin: str) -> AsyncIterator[str]:
    name = f"a1111_proxy_bench_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    host = admin.split("://", 1)[1].rsplit("/", 1)[0]
    try:
        yield f"postgresql+asyncpg://{host}/{name}"
    finally:
        conn = await asyncpg.connect(admin)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


async def start(stack: Stack, backends: int, workers: int, s: float) -> None:
    stack.migrate()
    await stack.start_fakes(backends, s)
    await stack.start_api()
    for i in range(workers):
        worker = stack._start(f"worker{i}", ["-m", "a1111_proxy", "worker"],
                              stack.env(A1111_PROXY_A1111_URLS=",".join(stack.fake_urls)))
        await wait_http(f"{stack.api_url}/health", worker,
                        want=lambda r, n=i + 1: r.status_code == 200 and len(r.json()["workers"]) >= n)


async def warm_up(stack: Stack, backends: int) -> None:
    conns = [Http(stack.api_port) for _ in range(backends)]
    jobs = [await c.json("POST", "/sdapi/v1/txt2img", SMALL, expect=(202,)) for c in conns]
    poller = Http(stack.api_port)
    for job in jobs:
        while (await poller.json("GET", f"/sdapi/v1/jobs/{job['id']}"))["status"] != "completed":
            await asyncio.sleep(0.01)


async def throughput_case(root: Path, args: argparse.Namespace, backends: int) -> float:
    s, n = args.service_time, args.jobs_per_backend * backends
    async with pg_database(args.pg) as url:
        stack = Stack(root, f"scale{backends}", args.log_level)
        stack.db_url = url
        try:
            await start(stack, backends, args.workers, s)
            await warm_up(stack, backends)
            conns = [Http(stack.api_port) for _ in range(min(n, 32))]
            poller = Http(stack.api_port)
            wall0, t0 = time.time(), time.perf_counter()
            ids: list[str] = []

            async def submitter(conn: Http, count: int) -> None:
                for _ in range(count):
                    job = await conn.json("POST", "/sdapi/v1/txt2img", SMALL, expect=(202,))
                    ids.append(job["id"])

            share = [n // len(conns) + (i < n % len(conns)) for i in range(len(conns))]
            await asyncio.gather(*(submitter(c, k) for c, k in zip(conns, share, strict=True)))
            while True:
                await asyncio.sleep(0.02)  # gently: the poller shares the CPU with the stack
                queued = await poller.json("GET", "/sdapi/v1/jobs?status=queued&limit=1")
                running = await poller.json("GET", "/sdapi/v1/jobs?status=processing&limit=1")
                if not queued["jobs"] and not running["jobs"]:
                    break
            t_end = time.perf_counter()
            mine = []
            cursor = ""
            wanted = set(ids)
            while True:
                page = await poller.json("GET", f"/sdapi/v1/jobs?limit=200{cursor}")
                mine += [j for j in page["jobs"] if j["id"] in wanted]
                if not page.get("next_cursor"):
                    break
                cursor = f"&cursor={page['next_cursor']}"
            stack.check_alive()
        finally:
            stack.stop()
    makespan = t_end - t0
    ideal = backends / s
    rate = n / makespan
    server = max(ts(j["completed_at"]) or 0 for j in mine) - wall0
    statuses = Counter(j["status"] for j in mine)
    per_backend = sorted(Counter(j["backend"] for j in mine).values())
    waits = [(ts(j["started_at"]) or 0) - (ts(j["created_at"]) or 0) for j in mine]
    print(f"  {backends} backend(s), {args.workers} worker(s), {n} jobs, S={s} s: "
          f"{rate:.2f} jobs/s (ideal {ideal:.2f}); efficiency {rate / ideal:.3f} "
          f"(server-side {n / server / ideal:.3f})")
    print(f"    statuses {dict(statuses)}; jobs per backend {per_backend}; "
          f"retried {sum(j['attempts'] > 1 for j in mine)}; makespan {makespan:.2f} s")
    gaps, overruns = [], []
    for backend in {j["backend"] for j in mine}:
        ran = sorted((ts(j["started_at"]) or 0, ts(j["completed_at"]) or 0)
                     for j in mine if j["backend"] == backend)
        overruns += [end - start - s for start, end in ran]
        gaps += [nxt[0] - prev[1] for prev, nxt in zip(ran, ran[1:], strict=False)]
    print(f"    per job: started -> completed minus S p50 {ms(pct(overruns, 50)):.1f} ms; "
          f"completed -> next start on the backend p50 {ms(pct(gaps, 50)):.1f} ms, "
          f"max {ms(max(gaps, default=0)):.1f} ms")
    print(f"    per job lost per backend: {ms((makespan - n * s / backends) / (n / backends)):.1f}"
          f" ms; queue wait p50 {pct(waits, 50):.2f} s")
    return rate / ideal


async def part_throughput(root: Path, args: argparse.Namespace) -> None:
    print(f"throughput through PostgreSQL ({args.workers} worker(s) sharing every backend)")
    effs = {b: await throughput_case(root, args, b) for b in (1, 2, 4)}
    print("  summary: " + ", ".join(f"{b} backend(s) {e:.3f}" for b, e in effs.items())
          + "  (target >= 0.95)")


async def part_pickup(root: Path, args: argparse.Namespace) -> None:
    async with pg_database(args.pg) as url:
        stack = Stack(root, "pickup", args.log_level)
        stack.db_url = url
        try:
            await start(stack, 1, 1, 0.01)
            await warm_up(stack, 1)
            conn = Http(stack.api_port)
            waits = []
            for _ in range(args.pickups):
                await asyncio.sleep(0.2)  # idle: the worker waits on LISTEN
                job = await conn.json("POST", "/sdapi/v1/txt2img", SMALL, expect=(202,))
                while (done := await conn.json("GET", f"/sdapi/v1/jobs/{job['id']}"))[
                        "status"] != "completed":
                    await asyncio.sleep(0.005)
                waits.append((ts(done["started_at"]) or 0) - (ts(done["created_at"]) or 0))
            stack.check_alive()
        finally:
            stack.stop()
    print(f"pickup by an idle worker on PostgreSQL ({len(waits)} jobs, created -> started): "
          f"p50 {ms(pct(waits, 50)):.1f} ms, p95 {ms(pct(waits, 95)):.1f} ms, "
          f"max {ms(max(waits)):.1f} ms (target < 50 ms)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="throughput,pickup")
    parser.add_argument("--pg", default="postgresql://root@127.0.0.1:5432/test",
                        help="an admin connection that may create and drop databases")
    parser.add_argument("-S", "--service-time", type=float, default=0.5,
                        help="fake A1111 seconds per job")
    parser.add_argument("--jobs-per-backend", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--pickups", type=int, default=30)
    parser.add_argument("--log-level", default="warning")
    return parser.parse_args(argv)


async def main_async(args: argparse.Namespace) -> None:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="a1111-proxy-scale-") as tmp:
        parts = {"throughput": part_throughput, "pickup": part_pickup}
        for name in args.only.split(","):
            await parts[name](Path(tmp), args)


def main() -> int:
    try:
        asyncio.run(main_async(parse_args()))
    finally:
        kill_all()
    return 0



if __name__ == "__main__":
    raise SystemExit(main())
