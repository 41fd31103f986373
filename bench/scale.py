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
import itertools
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from harness import Deployment, Http, clean_environ, deployment, ms, pct, pg_database, ts

SMALL = b'{"prompt": "a lighthouse at dusk", "steps": 4}'


@contextlib.contextmanager
def scaled(
    root: Path, name: str, args: argparse.Namespace, backends: int, s: float
) -> Iterator[Deployment]:
    """`backends` fake A1111s, the API and `args.workers` workers on a fresh database."""
    with (
        pg_database(args.pg) as url,
        deployment(
            root,
            name,
            log_level=args.log_level,
            fakes=backends,
            service_time=s,
            workers=args.workers,
            database_url=url,
        ) as d,
    ):
        yield d


async def warm_up(port: int, backends: int) -> None:
    conns = [Http(port) for _ in range(backends)]
    jobs = [await c.json("POST", "/sdapi/v1/txt2img", SMALL, expect=(202,)) for c in conns]
    poller = Http(port)
    for job in jobs:
        while (await poller.json("GET", f"/sdapi/v1/jobs/{job['id']}"))["status"] != "completed":
            await asyncio.sleep(0.01)
    for conn in [*conns, poller]:
        conn.close()


async def run_throughput(port: int, backends: int, n: int) -> dict[str, Any]:
    await warm_up(port, backends)
    conns = [Http(port) for _ in range(min(n, 32))]
    poller = Http(port)
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
    mine: list[dict[str, Any]] = []
    cursor = ""
    wanted = set(ids)
    while True:
        page = await poller.json("GET", f"/sdapi/v1/jobs?limit=200{cursor}")
        mine += [j for j in page["jobs"] if j["id"] in wanted]
        if not page.get("next_cursor"):
            break
        cursor = f"&cursor={page['next_cursor']}"
    for conn in [*conns, poller]:
        conn.close()
    return {"wall0": wall0, "t0": t0, "end": t_end, "mine": mine}


def throughput_case(root: Path, args: argparse.Namespace, backends: int) -> float:
    s, n = args.service_time, args.jobs_per_backend * backends
    with scaled(root, f"scale{backends}", args, backends, s) as d:
        got = asyncio.run(run_throughput(d.api_port, backends, n))
    mine, wall0 = got["mine"], got["wall0"]
    makespan = got["end"] - got["t0"]
    ideal = backends / s
    rate = n / makespan
    server = max(ts(j["completed_at"]) or 0 for j in mine) - wall0
    statuses = Counter(j["status"] for j in mine)
    per_backend = sorted(Counter(j["backend"] for j in mine).values())
    waits = [(ts(j["started_at"]) or 0) - (ts(j["created_at"]) or 0) for j in mine]
    print(
        f"  {backends} backend(s), {args.workers} worker(s), {n} jobs, S={s} s: "
        f"{rate:.2f} jobs/s (ideal {ideal:.2f}); efficiency {rate / ideal:.3f} "
        f"(server-side {n / server / ideal:.3f})"
    )
    print(
        f"    statuses {dict(statuses)}; jobs per backend {per_backend}; "
        f"retried {sum(j['attempts'] > 1 for j in mine)}; makespan {makespan:.2f} s"
    )
    gaps, overruns = [], []
    for backend in {j["backend"] for j in mine}:
        ran = sorted(
            (ts(j["started_at"]) or 0, ts(j["completed_at"]) or 0)
            for j in mine
            if j["backend"] == backend
        )
        overruns += [end - start - s for start, end in ran]
        gaps += [nxt[0] - prev[1] for prev, nxt in itertools.pairwise(ran)]
    print(
        f"    per job: started -> completed minus S p50 {ms(pct(overruns, 50)):.1f} ms; "
        f"completed -> next start on the backend p50 {ms(pct(gaps, 50)):.1f} ms, "
        f"max {ms(max(gaps, default=0)):.1f} ms"
    )
    lost = ms((makespan - n * s / backends) / (n / backends))
    print(f"    per job lost per backend: {lost:.1f} ms; queue wait p50 {pct(waits, 50):.2f} s")
    return float(rate / ideal)


def part_throughput(root: Path, args: argparse.Namespace) -> None:
    print(f"throughput through PostgreSQL ({args.workers} worker(s) sharing every backend)")
    effs = {b: throughput_case(root, args, b) for b in (1, 2, 4)}
    print(
        "  summary: "
        + ", ".join(f"{b} backend(s) {e:.3f}" for b, e in effs.items())
        + "  (target >= 0.95)"
    )


async def run_pickups(port: int, count: int) -> list[float]:
    await warm_up(port, 1)
    conn = Http(port)
    waits = []
    for _ in range(count):
        await asyncio.sleep(0.2)  # idle: the worker waits on LISTEN
        job = await conn.json("POST", "/sdapi/v1/txt2img", SMALL, expect=(202,))
        while (done := await conn.json("GET", f"/sdapi/v1/jobs/{job['id']}"))[
            "status"
        ] != "completed":
            await asyncio.sleep(0.005)
        waits.append((ts(done["started_at"]) or 0) - (ts(done["created_at"]) or 0))
    conn.close()
    return waits


def part_pickup(root: Path, args: argparse.Namespace) -> None:
    one_worker = argparse.Namespace(**{**vars(args), "workers": 1})
    with scaled(root, "pickup", one_worker, 1, 0.01) as d:
        waits = asyncio.run(run_pickups(d.api_port, args.pickups))
    print(
        f"pickup by an idle worker on PostgreSQL ({len(waits)} jobs, created -> started): "
        f"p50 {ms(pct(waits, 50)):.1f} ms, p95 {ms(pct(waits, 95)):.1f} ms, "
        f"max {ms(max(waits)):.1f} ms (target < 50 ms)"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--only", default="throughput,pickup")
    add(
        "--pg",
        default="postgresql://root@127.0.0.1:5432/test",
        help="an admin connection that may create and drop databases",
    )
    add("-S", "--service-time", type=float, default=0.5, help="fake A1111 seconds per job")
    add("--jobs-per-backend", type=int, default=20)
    add("--workers", type=int, default=2)
    add("--pickups", type=int, default=30)
    add("--log-level", default="warning")
    return parser.parse_args(argv)


def main() -> int:
    args = parse_args()
    clean_environ()
    parts = {"throughput": part_throughput, "pickup": part_pickup}
    with tempfile.TemporaryDirectory(prefix="a1111-proxy-scale-") as tmp:
        for name in args.only.split(","):
            parts[name](Path(tmp), args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
