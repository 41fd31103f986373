"""Load benchmark for a1111-proxy: prints figures, asserts nothing.

Everything runs as real processes on loopback (ephemeral ports), in a temporary directory, each
part on its own deployment with a fresh SQLite database (`bench/harness.py`: the tests' Stack with
default settings): fake A1111 servers (`tests.fakes.a1111`), the API (`a1111-proxy serve`) and,
where a part needs one, the worker (`a1111-proxy worker`). Async requests send
`Prefer: respond-async`; wait-mode requests send no Prefer header (the default mode holds them).

Parts (`--only` picks some, comma-separated):

  overhead  N sequential jobs (service time S, 1 backend). Each is submitted, then polled with
            GET /sdapi/v1/jobs/{id} every ~2 ms (--poll-ms; issue 16 measures with 10) until
            completed; overhead = (completed seen - submit sent) - S. p50 and max, where the
            time went (from the job's own created/started/completed stamps), and the CPU each
            process spent per job.
  wait      N sequential txt2img answered in the default mode (held until done, A1111's body),
            each followed by the same request sent straight to the fake A1111; added by the
            proxy = proxied - direct, per pair: p50 and p95.
  burst     N jobs submitted at once on 1 slot and on 4 slots (4 fakes, a fresh stack each);
            makespan = first submit -> last completion seen; efficiency = (N*S/slots) / makespan.
  submit    32 concurrent keep-alive clients post small txt2img bodies for ~5 s (no worker, jobs
            pile up); submits/s and latency p50/p99. The client is a minimal raw-socket HTTP/1.1
            client so that it leaves the CPU to the server.
  rss       the API's resident memory after 10,000 submits.
  list      GET /sdapi/v1/jobs latency with 100,000 jobs stored (inserted into the database from
            the table metadata before the API starts): plain, status/type filters, cursor pages.
  hold      1,000 concurrent txt2img in the default mode, all held at once (one slot, whose first
            generation never ends and reports no progress): the API's RSS and CPU over a quiet
            window, against the same window with no client waiting.

Run: `make bench`, or `.venv/bin/python bench/load.py [--only overhead,burst] [-h for knobs]`.
Targets are printed next to each figure for orientation only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import random
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
from harness import (  # first: it puts the repository on sys.path for what follows
    Deployment,
    Http,
    Report,
    clean_environ,
    cpu_seconds,
    deployment,
    ms,
    pct,
    section,
    ts,
)
from sqlalchemy import Engine, create_engine, func, insert, select
from sqlalchemy.engine import make_url

from a1111_proxy.db.tables import job_payloads, jobs
from a1111_proxy.settings import Settings
from tests.fakes.a1111 import FakeA1111
from tests.servers import serve

PARTS = ("overhead", "wait", "burst", "submit", "rss", "list", "hold")
TERMINAL = {"completed", "error", "canceled"}
SMALL_BODY = json.dumps(
    {
        "prompt": "a lighthouse at dusk, volumetric light",
        "negative_prompt": "blurry",
        "steps": 4,
        "width": 64,
        "height": 64,
        "cfg_scale": 7,
        "seed": 1234,
    }
).encode()
MIB = 1024 * 1024

# The comparable Node async A1111 proxy, measured the same way.
BASELINE = {
    "overhead_ms": 2060.0,
    "burst_eff": 0.76,
    "submits_per_s": 205.0,
    "submit_p99_ms": 620.0,
}


def sync_engine(database_url: str) -> Engine:
    """A plain (synchronous) SQLAlchemy engine on the deployment's SQLite file."""
    return create_engine(make_url(database_url).set(drivername="sqlite"))


def count_jobs(database_url: str) -> Counter[str]:
    engine = sync_engine(database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(jobs.c.status, func.count()).group_by(jobs.c.status))
            return Counter({status: count for status, count in rows})
    finally:
        engine.dispose()


def process_groups(d: Deployment) -> dict[str, list[psutil.Process]]:
    """The deployment's processes by role; the API's include its SERVE_PROCESSES children."""
    api = psutil.Process(d.api_pid)
    return {
        "API": [api, *api.children(recursive=True)],
        "worker": [psutil.Process(p.pid) for p in d.stack.procs if p is not d.stack.api_proc],
        "fake A1111": [psutil.Process(p.pid) for p in d.fakes],
        "bench client": [psutil.Process()],
    }


def group_cpu(procs: list[psutil.Process]) -> float:
    return sum(cpu_seconds(p.cpu_times()) for p in procs)


def line(name: str, values: list[float]) -> None:
    print(
        f"  {name:<44} p50 {ms(pct(values, 50)):7.1f} ms   p90 {ms(pct(values, 90)):7.1f} ms"
        f"   max {ms(max(values)) if values else float('nan'):7.1f} ms"
    )


# --------------------------------------------------------------------------------------------
# overhead
# --------------------------------------------------------------------------------------------


async def run_one_job(api: Http, poll: float) -> dict[str, Any]:
    job: dict[str, Any] = await api.json("POST", "/sdapi/v1/txt2img", SMALL_BODY, expect=(202,))
    while job["status"] not in TERMINAL:
        await asyncio.sleep(poll)
        job = await api.json("GET", f"/sdapi/v1/jobs/{job['id']}")
    return job


async def measure_overhead(port: int, n: int, s: float, poll: float) -> dict[str, Any]:
    api = Http(port)
    for _ in range(3):  # warm-up: connections, first-use imports, the worker's HTTP pool
        await run_one_job(api, poll)
    found: dict[str, Any] = {k: [] for k in ("overheads", "rtt", "queue", "run", "seen", "polls")}
    failures: Counter[str] = Counter()
    for _ in range(n):
        t0 = time.perf_counter()
        status, data = await api.request("POST", "/sdapi/v1/txt2img", SMALL_BODY)
        t_sub = time.perf_counter()
        if status != 202:
            failures[f"submit {status}"] += 1
            continue
        job, count = json.loads(data), 0
        while job["status"] not in TERMINAL:
            await asyncio.sleep(poll)
            job = await api.json("GET", f"/sdapi/v1/jobs/{job['id']}")
            count += 1
        t1, wall1 = time.perf_counter(), time.time()
        if job["status"] != "completed":
            failures[job["status"]] += 1
            continue
        stamps = ("created_at", "started_at", "completed_at")
        created, started, completed = (ts(job[k]) for k in stamps)
        found["overheads"].append(t1 - t0 - s)
        found["rtt"].append(t_sub - t0)
        found["polls"].append(count)
        if created and started and completed:
            found["queue"].append(started - created)  # committed -> claimed by the worker
            found["run"].append(completed - started - s)  # claim -> completed, minus S
            found["seen"].append(wall1 - completed)  # committed complete -> client saw it
    api.close()
    found["failures"] = failures
    return found


def part_overhead(root: Path, args: argparse.Namespace, report: Report) -> None:
    n, s, poll = args.overhead_jobs, args.service_time, args.poll_ms / 1000
    section(f"overhead: {n} sequential jobs, S={s} s, 1 backend, polling every {args.poll_ms} ms")
    with deployment(
        root, "overhead", log_level=args.log_level, fakes=1, service_time=s, workers=1
    ) as d:
        groups = process_groups(d)
        cpu0 = {name: group_cpu(procs) for name, procs in groups.items()}
        found = asyncio.run(measure_overhead(d.api_port, n, s, poll))
        used = {name: group_cpu(procs) - cpu0[name] for name, procs in groups.items()}
    line("overhead (seen completed - submit sent - S)", found["overheads"])
    print("  where it goes (from the job's own timestamps; they add up only roughly):")
    line("  submit round trip (POST -> 202)", found["rtt"])
    line("  queued: submit committed -> claimed", found["queue"])
    line("  running: claimed -> completed, minus S", found["run"])
    line("  seen: completed committed -> poll saw it", found["seen"])
    print(
        f"  polls per job: p50 {pct(found['polls'], 50):.0f}; "
        f"failures: {dict(found['failures']) or 'none'}"
    )
    jobs_run = n + 3  # with the warm-up jobs
    print(
        "  CPU per job (what a busy machine pays for it): "
        + ", ".join(f"{name} {ms(seconds / jobs_run):.1f} ms" for name, seconds in used.items())
    )
    p50 = ms(pct(found["overheads"], 50))
    report.add("overhead_p50", "per-job overhead p50", p50, "ms", "<= 15 ms", p50 <= 15)
    report.add("overhead_max", "per-job overhead max", ms(max(found["overheads"])), "ms")


# --------------------------------------------------------------------------------------------
# wait: the default mode against calling the fake A1111 directly
# --------------------------------------------------------------------------------------------


async def measure_wait(api_port: int, fake_port: int, n: int) -> dict[str, list[float]]:
    direct, proxied = Http(fake_port, prefer=None), Http(api_port, prefer=None)
    times: dict[str, list[float]] = {"direct": [], "proxied": []}
    for _ in range(3):  # warm-up
        await proxied.request("POST", "/sdapi/v1/txt2img", SMALL_BODY)
    for _ in range(n):
        for name, client in (("direct", direct), ("proxied", proxied)):
            t0 = time.perf_counter()
            status, _ = await client.request("POST", "/sdapi/v1/txt2img", SMALL_BODY)
            if status != 200:
                raise RuntimeError(f"{name} answered {status}")
            times[name].append(time.perf_counter() - t0)
    direct.close()
    proxied.close()
    return times


def part_wait(root: Path, args: argparse.Namespace, report: Report) -> None:
    """The default mode (no Prefer header: held until the job ends, answered with A1111's body,
    what drop-in A1111 clients get) against calling the fake A1111 directly, same requests."""
    n, s = args.overhead_jobs, args.service_time
    section(f"wait mode: {n} sequential txt2img in the default mode vs the fake directly, S={s} s")
    with deployment(
        root, "wait", log_level=args.log_level, fakes=1, service_time=s, workers=1
    ) as d:
        times = asyncio.run(measure_wait(d.api_port, d.fake_ports[0], n))
    extra = [p - d for p, d in zip(times["proxied"], times["direct"], strict=True)]
    for name in ("direct", "proxied"):
        print(
            f"  {name:<8} p50 {ms(pct(times[name], 50)):7.1f} ms   "
            f"p95 {ms(pct(times[name], 95)):7.1f} ms"
        )
    p50, p95 = ms(pct(extra, 50)), ms(pct(extra, 95))
    print(f"  added by the proxy: p50 {p50:.1f} ms, p95 {p95:.1f} ms, max {ms(max(extra)):.1f} ms")
    report.add("wait_p50", "wait-mode overhead p50 (vs direct)", p50, "ms", "<= 30 ms", p50 <= 30)
    report.add("wait_p95", "wait-mode overhead p95 (vs direct)", p95, "ms")


# --------------------------------------------------------------------------------------------
# burst
# --------------------------------------------------------------------------------------------


async def measure_burst(port: int, slots: int, n: int, poll: float) -> dict[str, Any]:
    warm = [Http(port) for _ in range(slots)]  # one warm-up job per slot
    await asyncio.gather(*(run_one_job(c, 0.01) for c in warm))
    conns = [Http(port) for _ in range(n)]
    await asyncio.gather(*(c.connect() for c in conns))
    poller = Http(port)
    await poller.connect()

    async def submit(conn: Http) -> dict[str, Any]:
        job: dict[str, Any] = await conn.json(
            "POST", "/sdapi/v1/txt2img", SMALL_BODY, expect=(202,)
        )
        return job

    wall0, t0 = time.time(), time.perf_counter()
    submitted = await asyncio.gather(*(submit(c) for c in conns))
    t_submitted = time.perf_counter()
    ids = {job["id"] for job in submitted}
    # Done when nothing is queued or processing (only our jobs exist besides warm-ups).
    while True:
        await asyncio.sleep(poll)
        if (await poller.json("GET", "/sdapi/v1/jobs?status=queued&limit=1"))["jobs"]:
            continue
        if not (await poller.json("GET", "/sdapi/v1/jobs?status=processing&limit=1"))["jobs"]:
            break
    t_last = time.perf_counter()
    listed = (await poller.json("GET", "/sdapi/v1/jobs?limit=200"))["jobs"]
    for conn in [*warm, *conns, poller]:
        conn.close()
    return {
        "wall0": wall0,
        "t0": t0,
        "submitted": t_submitted,
        "last": t_last,
        "mine": [j for j in listed if j["id"] in ids],
    }


def burst_target(service_time: float) -> float:
    """The efficiency aimed at: 0.98 with 0.5 s generations or longer, 0.95 with shorter ones
    (what a job costs beyond its generation weighs more)."""
    return 0.98 if service_time >= 0.5 else 0.95


def part_burst(root: Path, args: argparse.Namespace, report: Report) -> None:
    s = args.service_time
    for spec in args.burst.split(","):
        slots, n = (int(x) for x in spec.split(":"))
        section(
            f"burst: {n} jobs at once on {slots} slot(s), S={s} s "
            f"(ideal makespan {n * s / slots:.2f} s)"
        )
        with deployment(
            root, f"burst{slots}", log_level=args.log_level, fakes=slots, service_time=s, workers=1
        ) as d:
            got = asyncio.run(measure_burst(d.api_port, slots, n, args.burst_poll_ms / 1000))
        mine, wall0, t0 = got["mine"], got["wall0"], got["t0"]
        makespan = got["last"] - t0
        ideal = n * s / slots
        statuses = Counter(j["status"] for j in mine)
        per_backend = Counter(j["backend"] for j in mine)
        server_makespan = max(ts(j["completed_at"]) or 0 for j in mine) - wall0
        eff = ideal / makespan
        print(
            f"  submit phase {ms(got['submitted'] - t0):.1f} ms for {n} jobs; "
            f"statuses {dict(statuses)}"
        )
        retried = sum(j["attempts"] > 1 for j in mine)
        first_start = [
            min(ts(j["started_at"]) or 0 for j in mine if j["backend"] == b) - wall0
            for b in per_backend
        ]
        print(
            f"  jobs per backend: {sorted(per_backend.values())}; jobs retried: {retried}; "
            f"first job on each slot started {ms(min(first_start)):.0f}"
            f"-{ms(max(first_start)):.0f} ms after the first submit"
        )
        print(
            f"  makespan {makespan:.3f} s seen by the client ({server_makespan:.3f} s by the "
            f"jobs' completed_at); ideal {ideal:.3f} s"
        )
        print(
            f"  efficiency {eff:.3f} (server-side {ideal / server_makespan:.3f}); "
            f"lost per job per slot {ms((makespan - ideal) / (n / slots)):.1f} ms"
        )
        report.add(
            f"burst{slots}",
            f"burst efficiency, {slots} slot(s), N={n}",
            eff,
            "",
            f">= {burst_target(s):.2f}",
            eff >= burst_target(s),
        )


# --------------------------------------------------------------------------------------------
# submit and rss
# --------------------------------------------------------------------------------------------


async def hammer(
    port: int, clients: int, warmup: float, seconds: float, stop_after: int | None = None
) -> dict[str, Any]:
    """`clients` keep-alive connections posting SMALL_BODY in a loop. Latencies of requests sent
    after `warmup` s and before `warmup + seconds` s; or until `stop_after` 202s in all."""
    conns = [Http(port) for _ in range(clients)]
    await asyncio.gather(*(c.connect() for c in conns))
    start = time.perf_counter()
    measure_from, measure_to = start + warmup, start + warmup + seconds
    latencies: list[float] = []
    statuses: Counter[int | str] = Counter()
    accepted = 0

    async def client(conn: Http) -> None:
        nonlocal accepted
        while True:
            if stop_after is not None and accepted >= stop_after:
                return
            t = time.perf_counter()
            if stop_after is None and t >= measure_to:
                return
            if stop_after is not None:
                accepted += 1  # claim this submit before sending it, so we stop at exactly N
            try:
                status, _ = await conn.request("POST", "/sdapi/v1/txt2img", SMALL_BODY)
            except (OSError, asyncio.IncompleteReadError) as exc:
                statuses[type(exc).__name__] += 1
                if stop_after is not None:
                    accepted -= 1
                conn.close()
                continue
            end = time.perf_counter()
            if stop_after is not None and status != 202:
                accepted -= 1
            if t >= measure_from and (stop_after is not None or end <= measure_to):
                latencies.append(end - t)
                statuses[status] += 1

    await asyncio.gather(*(client(c) for c in conns))
    for conn in conns:
        conn.close()
    return {"latencies": latencies, "statuses": statuses}


def part_submit(root: Path, args: argparse.Namespace, report: Report) -> None:
    section(
        f"submit throughput: {args.clients} keep-alive clients for {args.submit_seconds} s "
        f"(after 1 s warm-up), no worker"
    )
    with deployment(root, "submit", log_level=args.log_level) as d:
        api_ps, me = psutil.Process(d.api_pid), psutil.Process()
        api_cpu0, me_cpu0, t0 = api_ps.cpu_times(), me.cpu_times(), time.perf_counter()
        result = asyncio.run(hammer(d.api_port, args.clients, 1.0, args.submit_seconds))
        api_cpu1, me_cpu1, t1 = api_ps.cpu_times(), me.cpu_times(), time.perf_counter()
    lat = result["latencies"]
    ok = result["statuses"].get(202, 0)
    rate = ok / args.submit_seconds
    api_cpu = (cpu_seconds(api_cpu1) - cpu_seconds(api_cpu0)) / (t1 - t0)
    me_cpu = (cpu_seconds(me_cpu1) - cpu_seconds(me_cpu0)) / (t1 - t0)
    print(
        f"  accepted (202) {ok} in {args.submit_seconds} s = {rate:,.0f}/s; "
        f"responses {dict(result['statuses'])}"
    )
    print(
        f"  latency p50 {ms(pct(lat, 50)):.1f} ms, p90 {ms(pct(lat, 90)):.1f} ms, "
        f"p99 {ms(pct(lat, 99)):.1f} ms, max {ms(max(lat)):.1f} ms"
    )
    print(
        f"  CPU (cores busy, whole run incl. warm-up): API {api_cpu:.2f}, bench client "
        f"{me_cpu:.2f} of {os.cpu_count()} cores"
    )
    p99 = ms(pct(lat, 99))
    report.add("submits_per_s", "submit throughput", rate, "/s", ">= 1000/s", rate >= 1000)
    report.add("submit_p50", "submit latency p50", ms(pct(lat, 50)), "ms")
    report.add("submit_p99", "submit latency p99", p99, "ms", "<= 50 ms", p99 <= 50)


async def submit_then_read(port: int, clients: int, n: int) -> tuple[dict[str, Any], float]:
    t0 = time.perf_counter()
    result = await hammer(port, clients, 0.0, 0.0, stop_after=n)
    took = time.perf_counter() - t0
    return result, took


async def read_pages(port: int) -> None:
    api = Http(port)  # a little reading, as a dashboard would
    for _ in range(20):
        await api.json("GET", "/sdapi/v1/jobs?limit=200")
    api.close()
    await asyncio.sleep(1.0)


def part_rss(root: Path, args: argparse.Namespace, report: Report) -> None:
    n = args.rss_jobs
    section(f"API memory: RSS after {n:,} submits ({args.clients} clients, no worker)")
    with deployment(root, "rss", log_level=args.log_level) as d:
        api_ps = psutil.Process(d.api_pid)
        rss0 = api_ps.memory_info().rss
        result, took = asyncio.run(submit_then_read(d.api_port, args.clients, n))
        rss1 = api_ps.memory_info().rss
        asyncio.run(read_pages(d.api_port))
        rss2 = api_ps.memory_info().rss
        stored = sum(count_jobs(d.stack.url).values())
    print(
        f"  {result['statuses'].get(202, 0):,} accepted in {took:.1f} s; "
        f"jobs in the database: {stored:,}"
    )
    print(
        f"  API RSS: {rss0 / MIB:.1f} MiB after start, {rss1 / MIB:.1f} MiB after {n:,} "
        f"submits, {rss2 / MIB:.1f} MiB after 20 list pages of 200 and 1 s idle"
    )
    final = max(rss1, rss2) / MIB
    report.add(
        "rss_mib", f"API RSS after {n:,} jobs", final, "MiB", "<= 150 MB", final * MIB <= 150e6
    )


# --------------------------------------------------------------------------------------------
# list: 100,000 jobs stored
# --------------------------------------------------------------------------------------------


def seed_jobs(database_url: str, n: int) -> dict[str, int]:
    """Store `n` jobs (and their payloads) in one transaction, as rows of the tables' metadata:
    columns this does not name take the schema's defaults."""
    rng = random.Random(42)
    now = time.time()
    span = 6 * 86400  # inside the default 7-day retention
    statuses = ["completed"] * 85 + ["error"] * 7 + ["canceled"] * 5 + ["queued"] * 2
    statuses.append("processing")
    max_attempts = Settings.model_fields["max_attempts"].default
    job_rows, payload_rows, counts = [], [], Counter[str]()
    for i in range(n):
        seq = i + 1
        created = now - span + span * i / n
        status = rng.choice(statuses)
        kind = "img2img" if rng.random() < 0.2 else "txt2img"
        counts[status] += 1
        counts[kind] += 1
        image = {"denoising_strength": 0.6, "init_images": ["<image: 1398100 characters omitted>"]}
        body = json.dumps(
            {
                "prompt": f"a lighthouse at dusk #{seq}, volumetric light, highly detailed",
                "negative_prompt": "blurry, lowres",
                "steps": 20,
                "width": 512,
                "height": 512,
                "cfg_scale": 7,
                "sampler_name": "Euler a",
                "seed": rng.randrange(2**31),
                **(image if kind == "img2img" else {}),
            }
        )
        row: dict[str, Any] = {
            "seq": seq,
            "id": str(uuid.uuid4()),
            "type": kind,
            "status": status,
            "request": body,
            "result": None,
            "image_count": 0,
            "error": None,
            "progress": 0.0,
            "eta_relative": None,
            "attempts": 0,
            "max_attempts": max_attempts,
            "run_after": created,
            "lease_owner": None,
            "lease_token": None,
            "lease_expires_at": None,
            "backend": None,
            "created_at": created,
            "started_at": None,
            "completed_at": None,
        }
        if status != "queued":
            row.update(started_at=created + 0.01, attempts=1, backend="http://127.0.0.1:7860")
        if status == "completed":
            info = {
                "prompt": f"a lighthouse at dusk #{seq}",
                "seed": 1000 + seq,
                "all_seeds": [1000 + seq],
            }
            result = {"images": [], "parameters": json.loads(body), "info": json.dumps(info)}
            row.update(
                completed_at=row["started_at"] + 4.2,
                progress=1.0,
                eta_relative=0.0,
                image_count=1,
                result=json.dumps(result),
            )
        elif status == "error":
            error = {
                "code": "backend_error",
                "message": "A1111 answered 500",
                "backend": row["backend"],
            }
            row.update(completed_at=row["started_at"] + 1.0, error=json.dumps(error))
        elif status == "canceled":
            row.update(
                completed_at=created + 2.0,
                error=json.dumps({"code": "canceled", "message": "canceled before it started"}),
            )
        elif status == "processing":
            row.update(
                progress=0.4,
                eta_relative=2.5,
                lease_owner="bench:1:000000",
                lease_token=str(uuid.uuid4()),
                lease_expires_at=now + 3600,
            )
        row["updated_at"] = row["completed_at"] or row["started_at"] or created
        job_rows.append(row)
        payload_rows.append({"job_seq": seq, "body": body})
    engine = sync_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(insert(jobs), job_rows)
            conn.execute(insert(job_payloads), payload_rows)
    finally:
        engine.dispose()
    return dict(counts)


async def measure_list(port: int, n: int, reps: int) -> list[tuple[str, int, list[float]]]:
    api = Http(port)
    first = await api.json("GET", "/sdapi/v1/jobs?limit=50")
    queries = [
        ("?limit=50", "plain, newest first"),
        ("?limit=50&status=completed", "status=completed"),
        (f"?limit=50&cursor={first['next_cursor']}", "page 2 (next_cursor of page 1)"),
        (f"?limit=50&cursor={n // 2}", "deep cursor (middle of the table)"),
        ("?limit=50&status=error", "status=error (7%)"),
        ("?limit=50&type=img2img", "type=img2img (20%)"),
        ("?limit=50&status=queued&type=img2img", "status=queued&type=img2img (~0.4%)"),
        ("?limit=200", "plain, limit=200"),
    ]
    results = []
    for query, label in queries:
        path = f"/sdapi/v1/jobs{query}"
        for _ in range(10):  # warm-up (plan cache, page cache)
            await api.json("GET", path)
        times, got = [], 0
        for _ in range(reps):
            t = time.perf_counter()
            status, data = await api.request("GET", path)
            times.append(time.perf_counter() - t)
            if status != 200:
                raise RuntimeError(f"GET {path} -> {status}: {data[:300]!r}")
            got = len(json.loads(data)["jobs"])
        results.append((label, got, times))
    api.close()
    return results


def part_list(root: Path, args: argparse.Namespace, report: Report) -> None:
    n, reps = args.list_jobs, args.list_requests
    section(f"listing: {reps} sequential GET /sdapi/v1/jobs per query with {n:,} jobs stored")

    def seed(database_url: str) -> None:
        t0 = time.perf_counter()
        counts = seed_jobs(database_url, n)
        size = Path(str(make_url(database_url).database)).stat().st_size
        print(
            f"  inserted {n:,} jobs in {time.perf_counter() - t0:.1f} s: {counts}; "
            f"database {size / 1e6:.0f} MB"
        )

    with deployment(root, "list", log_level=args.log_level, seed=seed) as d:
        results = asyncio.run(measure_list(d.api_port, n, reps))
    for label, got, times in results:
        print(
            f"  {label:<38} {got:>3} rows  p50 {ms(pct(times, 50)):6.1f} ms  "
            f"p90 {ms(pct(times, 90)):6.1f} ms  max {ms(max(times)):6.1f} ms"
        )
    plain = ms(pct(results[0][2], 50))
    report.add(
        "list_p50", f"GET /jobs?limit=50 p50 ({n:,} jobs)", plain, "ms", "<= 20 ms", plain <= 20
    )
    for label, _, times in results[1:4]:
        value = ms(pct(times, 50))
        report.add(f"list_{label}", f"  ... {label} p50", value, "ms", "<= 20 ms", value <= 20)
    worst_label, _, worst = max(results[:-1], key=lambda r: pct(r[2], 50))
    report.add(
        "list_worst", f"  worst limit=50 query p50 ({worst_label})", ms(pct(worst, 50)), "ms"
    )


# --------------------------------------------------------------------------------------------
# hold: 1,000 clients waiting at once
# --------------------------------------------------------------------------------------------


def quiet_window(pids: dict[str, int], seconds: float) -> dict[str, tuple[float, float]]:
    """Each process's RSS (MiB) at the end of `seconds`, and its CPU over them (% of one core)."""
    processes = {name: psutil.Process(pid) for name, pid in pids.items()}
    cpu0 = {name: cpu_seconds(p.cpu_times()) for name, p in processes.items()}
    t0 = time.perf_counter()
    time.sleep(seconds)
    wall = time.perf_counter() - t0
    return {
        name: (p.memory_info().rss / MIB, 100 * (cpu_seconds(p.cpu_times()) - cpu0[name]) / wall)
        for name, p in processes.items()
    }


async def hold(d: Deployment, clients: int, seconds: float, pids: dict[str, int]) -> dict[str, Any]:
    """`clients` connections each send one txt2img in the default mode; once every job is stored
    (all queued but the one that runs), a quiet window; then the clients hang up."""
    conns = [Http(d.api_port, prefer=None) for _ in range(clients)]
    await asyncio.gather(*(c.connect() for c in conns))
    t0 = time.perf_counter()
    waiting = [
        asyncio.ensure_future(c.request("POST", "/sdapi/v1/txt2img", SMALL_BODY)) for c in conns
    ]
    deadline = time.monotonic() + 120
    while sum((counts := await asyncio.to_thread(count_jobs, d.stack.url)).values()) < clients:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {dict(counts)} jobs stored after 120 s")
        await asyncio.sleep(0.2)
    stored = time.perf_counter() - t0
    await asyncio.sleep(2.0)  # let the submits' aftermath settle
    window = await asyncio.to_thread(quiet_window, pids, seconds)
    answered = [w.result()[0] for w in waiting if w.done() and not w.exception()]
    for waiter in waiting:
        waiter.cancel()
    for conn in conns:
        conn.close()
    await asyncio.gather(*waiting, return_exceptions=True)
    return {"stored": stored, "counts": counts, "window": window, "answered": Counter(answered)}


def part_hold(root: Path, args: argparse.Namespace, report: Report) -> None:
    n, seconds = args.hold_clients, args.hold_seconds
    clients = f"{n:,} client{'s' if n != 1 else ''}"
    section(f"hold: {clients} waiting in the default mode; RSS and CPU over {seconds} s quiet")
    fake = FakeA1111()
    fake.hang_next()  # the one slot's generation never ends and reports no progress
    hold_env = {"A1111_PROXY_SHUTDOWN_GRACE_SECONDS": "0"}  # the worker stops without waiting
    with (
        serve(fake.app) as a1111,
        deployment(
            root, "hold", log_level=args.log_level, backends=[a1111], workers=1, env=hold_env
        ) as d,
    ):
        pids = {"API": d.api_pid, "worker": d.stack.procs[-1].pid}
        idle = quiet_window(pids, seconds)
        got = asyncio.run(hold(d, n, seconds, pids))
        generations = len(fake.generation_requests())
        # The fake's shutdown cancels the generation that never ended; not worth a traceback.
        logging.getLogger("uvicorn.error").setLevel(logging.CRITICAL)
    for label, window in (("no client waiting", idle), (f"{clients} waiting", got["window"])):
        shown = "; ".join(
            f"{name} RSS {rss:6.1f} MiB, CPU {cpu:5.2f} % of one core"
            for name, (rss, cpu) in window.items()
        )
        print(f"  {label + ':':<22} {shown}")
    print(
        f"  all {n:,} jobs stored {got['stored']:.1f} s after the first request "
        f"({dict(got['counts'])}); answered during the window: "
        f"{dict(got['answered']) or 'none'}; generations sent to A1111: {generations}"
    )
    rss, cpu = got["window"]["API"]
    ok = rss * MIB <= 250e6
    report.add("hold_rss", f"API RSS, {clients} waiting", rss, "MiB", "<= 250 MB", ok)
    report.add("hold_cpu", f"API CPU, {clients} waiting, quiet", cpu, "%", "~0 (<= 1%)", cpu <= 1.0)
    report.add("hold_cpu0", "API CPU, no client waiting", idle["API"][1], "%")


# --------------------------------------------------------------------------------------------


def print_baseline(report: Report) -> None:
    v = report.values
    parts: list[str] = []
    if "overhead_p50" in v:
        parts.append(
            f"overhead {BASELINE['overhead_ms']:,.0f} ms -> {v['overhead_p50']:.1f} ms p50 "
            f"({BASELINE['overhead_ms'] / v['overhead_p50']:,.0f}x lower)"
        )
    if "burst1" in v or "burst4" in v:
        eff = [v[k] for k in ("burst1", "burst4") if k in v]
        parts.append(
            f"burst efficiency {BASELINE['burst_eff']:.2f} -> "
            + "/".join(f"{e:.3f}" for e in eff)
            + " ("
            + "/".join(f"{e / BASELINE['burst_eff']:.2f}" for e in eff)
            + "x)"
        )
    if "submits_per_s" in v:
        parts.append(
            f"submits {BASELINE['submits_per_s']:.0f}/s -> {v['submits_per_s']:,.0f}/s "
            f"({v['submits_per_s'] / BASELINE['submits_per_s']:.1f}x), p99 "
            f"{BASELINE['submit_p99_ms']:.0f} ms -> {v['submit_p99']:.1f} ms "
            f"({BASELINE['submit_p99_ms'] / v['submit_p99']:.0f}x lower)"
        )
    if parts:
        print("\nbaseline (Node async A1111 proxy) vs this run:")
        for part in parts:
            print(f"  {part}")


RUNNERS = {
    "overhead": part_overhead,
    "wait": part_wait,
    "burst": part_burst,
    "submit": part_submit,
    "rss": part_rss,
    "list": part_list,
    "hold": part_hold,
}


def run(args: argparse.Namespace) -> int:
    only = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(only) - set(PARTS)
    if unknown:
        print(f"unknown part(s) {sorted(unknown)}; choose from {', '.join(PARTS)}", file=sys.stderr)
        return 2
    clean_environ()
    root = Path(tempfile.mkdtemp(prefix="a1111-proxy-bench-"))
    report = Report()
    print(
        f"a1111-proxy load benchmark: {platform.python_implementation()} "
        f"{platform.python_version()}, {platform.system()} {platform.machine()}, "
        f"{os.cpu_count()} CPU(s), SQLite {sqlite3.sqlite_version}, log level {args.log_level}; "
        f"work dir {root}"
    )
    failed = []
    try:
        for name in PARTS:
            if name in only:
                try:
                    RUNNERS[name](root, args, report)
                except Exception as exc:  # report it and go on with the other parts
                    failed.append(name)
                    print(f"  !! {name} failed: {type(exc).__name__}: {exc}", flush=True)
                    logs = sorted((root / name).glob("*.log")) if (root / name).exists() else []
                    if logs:
                        print(f"     logs: {', '.join(str(p) for p in logs)}")
        report.print()
        print_baseline(report)
    finally:
        if args.keep or failed:
            print(f"\nwork dir kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--only", default=",".join(PARTS), help=f"parts to run (default all: {','.join(PARTS)})")
    add("-S", "--service-time", type=float, default=0.2, help="fake A1111 seconds per job")
    add("--overhead-jobs", type=int, default=50, help="N for the overhead and wait parts")
    add("--poll-ms", type=float, default=2.0, help="job polling interval (overhead part)")
    add("--burst", default="1:20,4:40", help="SLOTS:N cases for the burst part")
    add("--burst-poll-ms", type=float, default=5.0, help="completion polling interval (burst)")
    add("--clients", type=int, default=32, help="concurrent connections (submit, rss)")
    add("--submit-seconds", type=float, default=5.0, help="measured window (submit)")
    add("--rss-jobs", type=int, default=10_000, help="submits before reading RSS")
    add("--list-jobs", type=int, default=100_000, help="jobs stored for the list part")
    add("--list-requests", type=int, default=200, help="timed GETs per list query")
    add("--hold-clients", type=int, default=1000, help="clients waiting at once (hold)")
    add("--hold-seconds", type=float, default=10.0, help="quiet window measured (hold)")
    add("--log-level", default="info", help="A1111_PROXY_LOG_LEVEL for API and worker")
    add("--keep", action="store_true", help="keep the work dir (databases, logs)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def terminate(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds through the blocks that stop processes

    signal.signal(signal.SIGTERM, terminate)
    try:
        return run(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
