"""Scale-out to many backends on PostgreSQL: prints figures, asserts nothing.

64 fake A1111s in one process (`tests/fakes/a1111_fleet.py`: cheap asyncio responders that
record every generation's interval and how many generation requests each held at once), the API
as `a1111-proxy serve` with SERVE_PROCESSES=2, and 4 `a1111-proxy worker` processes that each
list all 64 URLs, so that only the claim path keeps a second job off a busy backend; on a fresh
database of the real PostgreSQL (`--pg`), dropped afterwards.

After a warm-up (one short job per backend), 32 clients submit a backlog of `--jobs-per-backend`
jobs per backend at once (service time `-S`, 2 s); the run ends when none is left. Printed:

  efficiency     jobs x S / (backends x (first submit -> last completion)): throughput against
                 the ideal backends / S (target >= 0.95); and the backends' own busy share
                 between the moment the last of them started and the first of them ended its
                 last generation (the steady state, without ramp and drain)
  hand-over      on each backend, the end of a generation -> the start of its next one
                 (answer to the worker, its claim, the next POST): p50 / p99 / max
  claim          the claim transaction's duration as the worker timed it (from BEGIN to COMMIT,
                 lock waits included), for every claim that took a job: p50 / p99 / max
                 (target p99 <= 20 ms); per claim transaction; and of the jobs claimed once
                 the last submit was answered (the backlog in, no submits competing for
                 the 2 cores)
  one at a time  the most generation requests any backend held at once (must be 1)
  database       connections to the run's database (pg_stat_activity, sampled every 0.2 s:
                 max, and by state) and transactions per second

Run: `.venv/bin/python bench/scale64.py [-S 2] [--backends 64] [--workers 4]
[--jobs-per-backend 8]`. The machine matters: say what it was, and what else ran on it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import itertools
import json
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import psutil
from harness import (
    Deployment,
    Http,
    Proc,
    bench_env,
    clean_environ,
    cpu_seconds,
    log_problems,
    ms,
    pct,
    pg_database,
    wait_for,
)

from a1111_proxy.backends.a1111 import A1111Backend
from a1111_proxy.backends.fake import tiny_png
from a1111_proxy.cli import skip_missing_sniffio
from a1111_proxy.db.engine import Database
from a1111_proxy.jobs import JobRepository, NewJob
from a1111_proxy.migrate import upgrade
from tests.stack import Stack

SMALL = {"prompt": "a lighthouse at dusk", "steps": 20}
FLEET = "tests.fakes.a1111_fleet"
IMAGE = tiny_png("a result", 64)
PREVIEW = base64.b64encode(tiny_png("a preview", 16)).decode()


@contextlib.contextmanager
def fleet_deployment(root: Path, args: argparse.Namespace) -> Iterator[tuple[Deployment, str]]:
    """The fleet of fakes, the API (2 processes) and the workers on a fresh database; yields the
    deployment and the database's asyncpg DSN."""
    root.mkdir(parents=True)
    ports = root / "fleet.json"
    sizes = ["--count", str(args.backends), "--service-time", str(args.service_time)]
    fleet = Proc([*sizes, "--ports-file", str(ports)], {}, root / "fleet.log", module=FLEET)
    stack: Stack | None = None
    try:
        wait_for(ports.exists, timeout=60, what="the fleet's ports")
        urls = json.loads(ports.read_text())
        with pg_database(args.pg) as url:
            env = {
                "A1111_PROXY_SERVE_PROCESSES": str(args.api_processes),
                "A1111_PROXY_LOG_FORMAT": "json",
            }
            stack = Stack(root, urls, url, **bench_env(args.log_level, **env))
            found = Deployment(root, stack, [fleet], urls)
            stack.start_api()
            found.start_workers(args.workers)
            yield found, url.replace("postgresql+asyncpg", "postgresql")
            found.check_alive()
            stack.close()
            stack = None
    finally:
        if stack is not None:
            stack.close()
        fleet.stop(timeout=5)
        log_problems(root)


async def submit_all(port: int, bodies: list[bytes], clients: int) -> float:
    """Submit `bodies` over `clients` keep-alive connections; the wall time of the first."""
    conns = [Http(port) for _ in range(clients)]
    queue = iter(bodies)
    first = time.time()

    async def client(conn: Http) -> None:
        for body in queue:
            await conn.json("POST", "/sdapi/v1/txt2img", body, expect=(202,))

    await asyncio.gather(*(client(c) for c in conns))
    for conn in conns:
        conn.close()
    return first


async def wait_drained(dsn: str, samples: list[tuple[int, int]]) -> None:
    """Until no job is queued or running; meanwhile sample the database's connections."""
    conn = await asyncpg.connect(dsn)
    try:
        while True:
            rows = await conn.fetch(
                "SELECT state, count(*) AS n FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid() GROUP BY state"
            )
            states = {row["state"]: row["n"] for row in rows}
            samples.append((sum(states.values()), states.get("active", 0)))
            left = await conn.fetchval(
                "SELECT count(*) FROM jobs WHERE status IN ('queued', 'processing')"
            )
            if not left:
                return
            await asyncio.sleep(0.2)
    finally:
        await conn.close()


async def server_pids(dsn: str) -> list[int]:
    """The server processes of this database's connections (the benchmark's own left out)."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT pid FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return [row["pid"] for row in rows]
    finally:
        await conn.close()


async def commits(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(
            await conn.fetchval(
                "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
            )
        )
    finally:
        await conn.close()


async def finished_jobs(dsn: str, since: float) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(
            "SELECT status, backend, attempts, created_at, started_at, completed_at FROM jobs "
            "WHERE created_at >= $1",
            since,
        )
    finally:
        await conn.close()


def fleet_reports(urls: list[str]) -> dict[str, dict[str, Any]]:
    with httpx.Client(timeout=10) as client:
        return {url: client.get(f"{url}/fake/report").json() for url in urls}


def warm_up(port: int, backends: int) -> None:
    """One short job per backend: every worker has claimed, fetched and connected once."""
    body = json.dumps({**SMALL, "fake_seconds": 0.05}).encode()
    asyncio.run(submit_all(port, [body] * backends, min(backends, 32)))


def claim_times(root: Path, since: float) -> tuple[list[float], list[float], Counter[str]]:
    """The claim durations the workers logged from `since` on (the measured run, not the
    warm-up): one per claimed job (a claim of k jobs counted k times), and one per claim
    transaction (each logs `claim_jobs`, and its jobs' lines follow each other); and how many
    jobs each worker claimed."""
    took: list[float] = []
    per_claim: list[float] = []
    per_worker: Counter[str] = Counter()
    for log in sorted(root.glob("worker*.log")):
        rest = 0  # lines left of the claim whose first line was counted
        for line in log.read_text(errors="replace").splitlines():
            if '"claim_ms"' not in line:
                continue
            record = json.loads(line)
            if datetime.fromisoformat(record["time"].replace("Z", "+00:00")).timestamp() < since:
                continue
            took.append(record["claim_ms"] / 1000)
            per_worker[log.stem] += 1
            if rest > 0:
                rest -= 1
            else:
                rest = int(record.get("claim_jobs", 1)) - 1
                per_claim.append(record["claim_ms"] / 1000)
    return took, per_claim, per_worker


def process_cpu(deployment: Deployment, dsn: str) -> dict[str, float]:
    """CPU seconds so far of each kind of process (the API's children included), and of the
    PostgreSQL server processes that serve this database's connections."""
    spent: Counter[str] = Counter()
    for pid in asyncio.run(server_pids(dsn)):
        with contextlib.suppress(psutil.Error):
            spent["postgres"] += cpu_seconds(psutil.Process(pid).cpu_times())
    for proc in [*deployment.fakes, *deployment.stack.procs]:
        kind = proc.log_path.stem.rstrip("0123456789")
        with contextlib.suppress(psutil.NoSuchProcess):
            process = psutil.Process(proc.pid)
            spent[kind] += cpu_seconds(process.cpu_times())
            for child in process.children(recursive=True):
                spent[kind] += cpu_seconds(child.cpu_times())
    return dict(spent)


def run(args: argparse.Namespace, root: Path) -> None:
    backends = args.backends
    n = backends * args.jobs_per_backend
    with fleet_deployment(root, args) as (d, dsn):
        warm_up(d.api_port, backends)
        samples: list[tuple[int, int]] = []
        asyncio.run(wait_drained(dsn, samples))
        bodies = [json.dumps({**SMALL, "seed": i}).encode() for i in range(n)]
        cpu0, commits0, load0 = process_cpu(d, dsn), asyncio.run(commits(dsn)), psutil.getloadavg()

        async def measured() -> tuple[float, float]:
            submitting = asyncio.create_task(submit_all(d.api_port, bodies, args.clients))
            submitting.add_done_callback(lambda _: submitted.append(time.time()))
            samples.clear()
            await asyncio.sleep(0.5)
            await wait_drained(dsn, samples)
            return await submitting, submitted[0]

        submitted: list[float] = []
        first, backlog_in = asyncio.run(measured())
        done_at = time.time()
        cpu1, commits1, load1 = process_cpu(d, dsn), asyncio.run(commits(dsn)), psutil.getloadavg()
        jobs = asyncio.run(finished_jobs(dsn, first - 0.001))
        reports = fleet_reports(d.fake_urls)
        claims, per_claim, per_worker = claim_times(d.dir, first)
        after, _, _ = claim_times(d.dir, backlog_in)
    print_figures(args, first, done_at, jobs, reports, claims, per_worker, samples)
    print(
        f"  claim, each transaction once ({len(per_claim)} claims): "
        f"p50 {ms(pct(per_claim, 50)):.1f} ms, p99 {ms(pct(per_claim, 99)):.1f} ms"
    )
    print(
        f"  claim, once the backlog was submitted ({len(after)} jobs claimed after the last "
        f"202, {backlog_in - first:.2f} s after the first submit): p50 "
        f"{ms(pct(after, 50)):.1f} ms, p99 {ms(pct(after, 99)):.1f} ms"
    )
    print(
        f"  database: {(commits1 - commits0) / (done_at - first):.0f} transactions/s "
        f"({(commits1 - commits0) / len(jobs):.1f} a job); "
        f"load average {load0[0]:.1f} before, {load1[0]:.1f} after"
    )
    spent = {k: cpu1.get(k, 0) - cpu0.get(k, 0) for k in cpu1}
    print(
        "  CPU seconds in the run: "
        + ", ".join(f"{kind} {seconds:.1f}" for kind, seconds in sorted(spent.items()))
        + f" (of {done_at - first:.1f} s wall, {psutil.cpu_count()} cores); "
        + f"{ms(sum(spent.values()) / len(jobs)):.1f} ms a job in all"
    )


def print_figures(
    args: argparse.Namespace,
    first: float,
    done_at: float,
    jobs: list[asyncpg.Record],
    reports: dict[str, dict[str, Any]],
    claims: list[float],
    per_worker: Counter[str],
    samples: list[tuple[int, int]],
) -> None:
    backends, s = args.backends, args.service_time
    n = len(jobs)
    last = max(j["completed_at"] or 0 for j in jobs)
    makespan = last - first
    runs = {url: [r for r in rep["runs"] if r[0] >= first] for url, rep in reports.items()}
    statuses = Counter(j["status"] for j in jobs)
    print(
        f"{backends} backends, {args.workers} workers sharing all of them, "
        f"{args.api_processes} API processes, S = {s} s, {n} jobs"
    )
    print(
        f"  efficiency {n * s / (backends * makespan):.3f} "
        f"({n / makespan:.2f} jobs/s, ideal {backends / s:.2f}; makespan {makespan:.2f} s, "
        f"ideal {n * s / backends:.2f} s)  (target >= 0.95)"
    )
    print(f"    steady state: the backends busy {steady_share(runs):.3f} of the time")
    print(
        f"    statuses {dict(statuses)}; retried {sum(j['attempts'] > 1 for j in jobs)}; "
        f"jobs per backend {min(map(len, runs.values()))}..{max(map(len, runs.values()))}; "
        f"per worker {sorted(per_worker.values())}"
    )
    gaps = [b[0] - a[1] for ran in runs.values() for a, b in itertools.pairwise(sorted(ran))]
    print(
        f"  hand-over (a backend's end -> its next start): p50 {ms(pct(gaps, 50)):.1f} ms, "
        f"p99 {ms(pct(gaps, 99)):.1f} ms, max {ms(max(gaps, default=0)):.1f} ms"
    )
    print(
        f"  claim (worker-timed transaction, {len(claims)} jobs claimed): "
        f"p50 {ms(pct(claims, 50)):.1f} ms, p99 {ms(pct(claims, 99)):.1f} ms, "
        f"max {ms(max(claims, default=0)):.1f} ms  (target p99 <= 20 ms)"
    )
    most = max(rep["max_in_flight"] for rep in reports.values())
    overlapping = sum(
        b[0] < a[1] for ran in runs.values() for a, b in itertools.pairwise(sorted(ran))
    )
    print(
        f"  one at a time: the most generation requests a backend held at once: {most}; "
        f"overlapping generations: {overlapping}  (must be 1 and 0)"
    )
    print(
        f"  database connections: max {max(t for t, _ in samples)} "
        f"(active at once: max {max(a for _, a in samples)}) over {len(samples)} samples"
    )


def steady_share(runs: dict[str, list[list[float]]]) -> float:
    """Busy share of all backends between the last first start and the first last end."""
    start = max(min(r[0] for r in ran) for ran in runs.values() if ran)
    end = min(max(r[1] for r in ran) for ran in runs.values() if ran)
    if end <= start:
        return float("nan")
    busy = sum(max(0.0, min(e, end) - max(b, start)) for ran in runs.values() for b, e in ran)
    return busy / (len(runs) * (end - start))


# --------------------------------------------------------------------------------------------
# costs: what each of a worker's per-job calls costs in CPU
# --------------------------------------------------------------------------------------------


async def cpu_per_call(call: Callable[[], Awaitable[object]], times: int) -> float:
    """CPU seconds of this process per call (one warm-up call first)."""
    await call()
    began = time.process_time()
    for _ in range(times):
        await call()
    return (time.process_time() - began) / times


async def measure_costs(url: str, urls: list[str], times: int) -> dict[str, float]:
    """The worker's calls, made by this process the way a worker makes them: its share of the
    64 backends is one, the 63 others run another worker's jobs."""
    mine, theirs = Database(url), Database(url)
    repo, rival = JobRepository(mine), JobRepository(theirs)
    backend = A1111Backend(urls[0])
    body = json.dumps(SMALL)
    try:
        for _ in range(times + len(urls) + 10):
            await repo.submit(NewJob("txt2img", request=body, payload=body))
        for other in urls[1:]:
            await rival.claim("another-worker", [(other, None)])
        slots: list[tuple[str, str | None]] = [(u, None) for u in urls]

        async def claim_and_store() -> None:
            claimed = await repo.claim("a-worker", slots)
            await repo.complete(claimed[0][1], {"images": []}, [IMAGE])

        running = (await repo.claim("a-worker", slots))[0][1]
        calls: dict[str, Callable[[], Awaitable[object]]] = {
            "claim a job (64 slots, 63 busy elsewhere) and store its result": claim_and_store,
            "store progress (touch)": lambda: repo.touch(running, progress=0.5, eta=1.0),
            "store progress and a preview": lambda: repo.touch(
                running, progress=0.5, eta=1.0, preview=PREVIEW
            ),
            "look for a cancel or skip (requests)": lambda: repo.requests(running),
            "read A1111's progress": lambda: backend.progress(),
            "read A1111's progress with its preview": lambda: backend.progress(with_image=True),
            "A1111 generation (POST and answer; the fake's 10 ms idle)": lambda: backend.generate(
                "txt2img", dict(SMALL)
            ),
        }
        return {label: await cpu_per_call(call, times) for label, call in calls.items()}
    finally:
        await backend.aclose()
        await mine.dispose()
        await theirs.dispose()


def part_costs(args: argparse.Namespace, root: Path) -> None:
    skip_missing_sniffio()  # as `a1111-proxy worker` does
    root.mkdir(parents=True)
    ports = root / "fleet.json"
    sizes = ["--count", str(args.backends), "--service-time", "0.01"]
    fleet = Proc([*sizes, "--ports-file", str(ports)], {}, root / "fleet.log", module=FLEET)
    try:
        wait_for(ports.exists, timeout=60, what="the fleet's ports")
        with pg_database(args.pg) as url:
            upgrade(url)
            costs = asyncio.run(measure_costs(url, json.loads(ports.read_text()), args.calls))
    finally:
        fleet.stop(timeout=5)
    print(f"what a worker's calls cost, CPU of the calling process ({args.calls} calls each):")
    for label, seconds in costs.items():
        print(f"  {label}: {ms(seconds):.2f} ms")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--pg", default="postgresql://root@127.0.0.1:5432/test", help="may create databases")
    add("-S", "--service-time", type=float, default=2.0, help="fake A1111 seconds per job")
    add("--backends", type=int, default=64)
    add("--workers", type=int, default=4)
    add("--api-processes", type=int, default=2)
    add("--jobs-per-backend", type=int, default=8)
    add("--clients", type=int, default=32)
    add("--log-level", default="info", help="info: the workers log each claim's duration")
    add("--set", action="append", default=[], help="NAME=VALUE: a setting of the proxy's processes")
    add("--keep", help="keep the processes' logs in this folder (by default, they are removed)")
    add("--only", default="backlog,costs", help="parts: backlog, costs (comma-separated)")
    add("--calls", type=int, default=200, help="costs: calls of each kind")
    return parser.parse_args(argv)


def main() -> int:
    args = parse_args()
    clean_environ()
    parts = {"backlog": run, "costs": part_costs}
    with tempfile.TemporaryDirectory(prefix="a1111-proxy-scale64-") as tmp:
        root = Path(args.keep or tmp)
        for name in args.only.split(","):
            parts[name](args, root / name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
