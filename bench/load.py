"""Load benchmark for a1111-proxy: prints figures, asserts nothing.

Everything runs as real processes on loopback (ephemeral ports), in a temporary directory, each
part on its own stack with a fresh SQLite database: fake A1111 servers (`tests.fakes.a1111`), the
API (`a1111-proxy serve`) and, where a part needs one, the worker (`a1111-proxy worker`).

Parts (`--only` picks some, comma-separated):

  overhead  N sequential jobs (service time S, 1 backend). Each is submitted, then polled with
            GET /sdapi/v1/jobs/{id} every ~2 ms until completed; overhead = (completed seen -
            submit sent) - S. p50 and max, plus where the time went (from the job's own
            created/started/completed stamps).
  burst     N jobs submitted at once on 1 slot and on 4 slots (4 fakes, a fresh stack each);
            makespan = first submit -> last completion seen; efficiency = (N*S/slots) / makespan.
  submit    32 concurrent keep-alive clients post small txt2img bodies for ~5 s (no worker, jobs
            pile up); submits/s and latency p50/p99. The client is a minimal raw-socket HTTP/1.1
            client so that it leaves the CPU to the server.
  rss       the API's resident memory after 10,000 submits.
  list      GET /sdapi/v1/jobs latency with 100,000 jobs stored (inserted straight into SQLite
            before the API starts): plain, status/type filters and a deep cursor page.

Run: `make bench`, or `.venv/bin/python bench/load.py [--only overhead,burst] [-h for knobs]`.
Targets are printed next to each figure for orientation only.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("overhead", "wait", "burst", "submit", "rss", "list")
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

# The comparable Node async A1111 proxy, measured the same way.
BASELINE = {
    "overhead_ms": 2060.0,
    "burst_eff": 0.76,
    "submits_per_s": 205.0,
    "submit_p99_ms": 620.0,
}


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------

_PROCS: list[subprocess.Popen[bytes]] = []


def _die_with_parent() -> None:
    """In the child: get SIGKILL if the benchmark dies without cleaning up (Linux only)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def kill_all() -> None:
    for proc in _PROCS:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
    for proc in _PROCS:
        with contextlib.suppress(Exception):
            proc.wait(timeout=5)


atexit.register(kill_all)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Proc:
    def __init__(self, name: str, args: list[str], env: dict[str, str], cwd: Path) -> None:
        self.name = name
        self.log_path = cwd / f"{name}.log"
        self._log = open(self.log_path, "ab")  # closed in stop()
        self.popen = subprocess.Popen(
            [sys.executable, *args],
            env=env,
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        _PROCS.append(self.popen)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=5)
        self._log.close()

    def tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


class Stack:
    """One database plus the processes of one part, all under `root/name`."""

    def __init__(self, root: Path, name: str, log_level: str) -> None:
        self.dir = root / name
        self.dir.mkdir(parents=True)
        self.db_path = self.dir / "bench.db"
        self.db_url = f"sqlite+aiosqlite:///{self.db_path}"
        self.log_level = log_level
        self.procs: list[Proc] = []
        self.fake_urls: list[str] = []
        self.api: Proc | None = None
        self.worker: Proc | None = None
        self.api_port = 0

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("A1111_PROXY_")}
        env.update(
            PYTHONPATH=str(ROOT),
            A1111_PROXY_DATABASE_URL=self.db_url,
            A1111_PROXY_LOG_LEVEL=self.log_level,
            A1111_PROXY_CIVITAI_ENABLED="false",  # the fake's model hashes are not Civitai's
            **extra,
        )
        return env

    def migrate(self) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "a1111_proxy", "migrate"],
            env=self.env(),
            cwd=self.dir,
            capture_output=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise RuntimeError(f"migrate failed:\n{done.stdout.decode()}{done.stderr.decode()}")

    def _start(self, name: str, args: list[str], env: dict[str, str]) -> Proc:
        proc = Proc(name, args, env, self.dir)
        self.procs.append(proc)
        return proc

    async def start_fakes(self, n: int, service_time: float) -> None:
        ports = [free_port() for _ in range(n)]
        for i, port in enumerate(ports):
            self._start(
                f"fake{i}",
                [
                    "-m",
                    "tests.fakes.a1111",
                    "--port",
                    str(port),
                    "--service-time",
                    str(service_time),
                ],
                self.env(),
            )
        self.fake_urls = [f"http://127.0.0.1:{port}" for port in ports]
        for url, proc in zip(self.fake_urls, self.procs[-n:], strict=True):
            await wait_http(f"{url}/sdapi/v1/progress", proc)

    async def start_api(self) -> None:
        self.api_port = free_port()
        self.api = self._start(
            "api",
            ["-m", "a1111_proxy", "serve"],
            self.env(A1111_PROXY_HOST="127.0.0.1", A1111_PROXY_PORT=str(self.api_port)),
        )
        await wait_http(f"{self.api_url}/ready", self.api)

    async def start_worker(self) -> None:
        self.worker = self._start(
            "worker",
            ["-m", "a1111_proxy", "worker"],
            self.env(A1111_PROXY_A1111_URLS=",".join(self.fake_urls)),
        )
        # /health answers 200 once the worker's heartbeat (with its slots) is in the database.
        await wait_http(
            f"{self.api_url}/health",
            self.worker,
            want=lambda r: (
                r.status_code == 200 and len(r.json()["backends"]) == len(self.fake_urls)
            ),
        )

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.log_problems()

    def log_problems(self) -> None:
        """Print the warnings and errors the processes logged (retries, lost leases, crashes)."""
        for proc in self.procs:
            with contextlib.suppress(OSError):
                lines = [
                    line
                    for line in proc.log_path.read_text(errors="replace").splitlines()
                    if " WARNING " in line
                    or " ERROR " in line
                    or '"level": "warning"' in line  # JSON lines (LOG_FORMAT=auto, not a tty)
                    or '"level": "error"' in line
                    or line.startswith(("WARNING:", "ERROR:", "Traceback"))
                ]
                if lines:
                    print(f"  !! {proc.name} logged {len(lines)} warning/error line(s), e.g.:")
                    for line in lines[:3]:
                        print(f"     {line[:200]}")

    def check_alive(self) -> None:
        for proc in self.procs:
            if not proc.alive():
                raise RuntimeError(
                    f"{proc.name} exited (code {proc.popen.returncode}):\n{proc.tail()}"
                )


async def wait_http(
    url: str,
    proc: Proc,
    timeout: float = 60.0,
    want: Callable[[httpx.Response], bool] | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=2) as client:
        while time.monotonic() < deadline:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited during startup:\n{proc.tail()}")
            with contextlib.suppress(httpx.HTTPError):
                response = await client.get(url)
                if want(response) if want else response.status_code == 200:
                    return
            await asyncio.sleep(0.05)
    raise TimeoutError(f"{url} not ready after {timeout} s; {proc.name} log:\n{proc.tail()}")


# --------------------------------------------------------------------------------------------
# A minimal keep-alive HTTP/1.1 client (cheap enough not to compete with the server for CPU)
# --------------------------------------------------------------------------------------------


class Http:
    def __init__(
        self, port: int, host: str = "127.0.0.1", prefer: str | None = "respond-async"
    ) -> None:
        """`prefer`: the Prefer header sent with every request (respond-async: 202 and the job;
        None: the deployment's default mode, which holds a generation request until its job ends)."""
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self._prefix = f"Host: {host}:{port}\r\nUser-Agent: a1111-proxy-bench\r\n"
        if prefer:
            self._prefix += f"Prefer: {prefer}\r\n"

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        reused = self.writer is not None
        try:
            return await self._request(method, path, body)
        except (asyncio.IncompleteReadError, ConnectionError):
            self.close()
            if not reused:
                raise
            return await self._request(method, path, body)  # the server closed an idle connection

    async def _request(self, method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
        if self.writer is None:
            await self.connect()
        assert self.reader is not None and self.writer is not None
        head = f"{method} {path} HTTP/1.1\r\n{self._prefix}"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        self.writer.write(head.encode() + b"\r\n" + (body or b""))
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length, chunked, close = None, False, False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                close = value.strip().lower() == b"close"
        if chunked:
            data = await self._read_chunked()
        elif length is not None:
            data = await self.reader.readexactly(length)
        else:
            data, close = await self.reader.read(), True
        if close:
            self.close()
        return status, data

    async def _read_chunked(self) -> bytes:
        assert self.reader is not None
        parts = []
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await self.reader.readuntil(b"\r\n")
                return b"".join(parts)
            parts.append(await self.reader.readexactly(size))
            await self.reader.readexactly(2)

    async def json(
        self, method: str, path: str, body: bytes | None = None, expect: Iterable[int] = (200,)
    ) -> dict:  # type: ignore[type-arg]
        status, data = await self.request(method, path, body)
        if status not in expect:
            raise RuntimeError(f"{method} {path} -> {status}: {data[:500]!r}")
        return json.loads(data)  # type: ignore[no-any-return]


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def ts(value: str | None) -> float | None:
    return None if value is None else datetime.fromisoformat(value).timestamp()


def ms(seconds: float) -> float:
    return seconds * 1000.0


class Report:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str]] = []
        self.values: dict[str, float] = {}

    def add(
        self,
        key: str,
        label: str,
        value: float,
        unit: str,
        target: str = "",
        ok: bool | None = None,
    ) -> None:
        self.values[key] = value
        shown = (
            f"{value:,.3f}" if unit == "" else (f"{value:,.1f} {unit}" if unit else f"{value:,.1f}")
        )
        verdict = "" if ok is None else ("meets" if ok else "MISSES")
        self.rows.append((label, shown, target, verdict))

    def print(self) -> None:
        widths = [
            max(len(r[i]) for r in [("metric", "value", "target", ""), *self.rows])
            for i in range(4)
        ]
        line = "  ".join("-" * w for w in widths)
        print("\n" + "=" * len(line))
        print("SUMMARY")
        print(
            "  ".join(
                h.ljust(w) for h, w in zip(("metric", "value", "target", ""), widths, strict=True)
            )
        )
        print(line)
        for row in self.rows:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))


def section(title: str) -> None:
    print(f"\n--- {title} " + "-" * max(0, 76 - len(title)), flush=True)


# --------------------------------------------------------------------------------------------
# Parts
# --------------------------------------------------------------------------------------------


async def run_one_job(api: Http, poll: float) -> dict:  # type: ignore[type-arg]
    job = await api.json("POST", "/sdapi/v1/txt2img", SMALL_BODY, expect=(202,))
    while job["status"] not in TERMINAL:
        await asyncio.sleep(poll)
        job = await api.json("GET", f"/sdapi/v1/jobs/{job['id']}")
    return job


async def part_overhead(root: Path, args: argparse.Namespace, report: Report) -> None:
    n, s, poll = args.overhead_jobs, args.service_time, args.poll_ms / 1000
    section(f"overhead: {n} sequential jobs, S={s} s, 1 backend, polling every {args.poll_ms} ms")
    stack = Stack(root, "overhead", args.log_level)
    try:
        stack.migrate()
        await stack.start_fakes(1, s)
        await stack.start_api()
        await stack.start_worker()
        api = Http(stack.api_port)
        for _ in range(3):  # warm-up: connections, first-use imports, the worker's HTTP pool
            await run_one_job(api, poll)
        overheads, submit_rtt, queue, run_extra, observe, polls = [], [], [], [], [], []
        failures = Counter()
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
            created, started, completed = (
                ts(job[k]) for k in ("created_at", "started_at", "completed_at")
            )
            overheads.append(t1 - t0 - s)
            submit_rtt.append(t_sub - t0)
            polls.append(count)
            if created and started and completed:
                queue.append(started - created)  # committed -> claimed by the worker
                run_extra.append(completed - started - s)  # claim -> completed, minus S
                observe.append(wall1 - completed)  # committed complete -> client saw it
        stack.check_alive()
    finally:
        stack.stop()

    def line(name: str, values: list[float]) -> None:
        print(
            f"  {name:<44} p50 {ms(pct(values, 50)):7.1f} ms   p90 {ms(pct(values, 90)):7.1f} ms"
            f"   max {ms(max(values)) if values else float('nan'):7.1f} ms"
        )

    line("overhead (seen completed - submit sent - S)", overheads)
    print("  where it goes (from the job's own timestamps; they add up only roughly):")
    line("  submit round trip (POST -> 202)", submit_rtt)
    line("  queued: submit committed -> claimed", queue)
    line("  running: claimed -> completed, minus S", run_extra)
    line("  seen: completed committed -> poll saw it", observe)
    print(f"  polls per job: p50 {pct(polls, 50):.0f}; failures: {dict(failures) or 'none'}")
    p50 = ms(pct(overheads, 50))
    report.add("overhead_p50", "per-job overhead p50", p50, "ms", "<= 25 ms", p50 <= 25)
    report.add("overhead_max", "per-job overhead max", ms(max(overheads)), "ms")


async def part_wait(root: Path, args: argparse.Namespace, report: Report) -> None:
    """Wait mode (`Prefer: wait`, what drop-in A1111 clients get) against calling the fake A1111
    directly: the same sequential requests, each answered with A1111's body."""
    n, s = args.overhead_jobs, args.service_time
    section(f"wait mode: {n} sequential txt2img with Prefer: wait vs the fake directly, S={s} s")
    stack = Stack(root, "wait", args.log_level)
    try:
        stack.migrate()
        await stack.start_fakes(1, s)
        await stack.start_api()
        await stack.start_worker()
        fake_port = int(stack.fake_urls[0].rsplit(":", 1)[1])
        direct, proxied = Http(fake_port, prefer=None), Http(stack.api_port, prefer="wait")
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
        extra = [p - d for p, d in zip(times["proxied"], times["direct"], strict=True)]
        print(f"  direct   p50 {ms(pct(times['direct'], 50)):7.1f} ms   proxied p50 "
              f"{ms(pct(times['proxied'], 50)):7.1f} ms")
        print(f"  added by the proxy: p50 {ms(pct(extra, 50)):.1f} ms, max {ms(max(extra)):.1f} ms")
        report.add("wait_p50", "wait-mode overhead p50 (vs direct)", ms(pct(extra, 50)), "ms",
                   "<= 30 ms", ms(pct(extra, 50)) <= 30)
        direct.close()
        proxied.close()
    finally:
        stack.stop()


async def part_burst(root: Path, args: argparse.Namespace, report: Report) -> None:
    s = args.service_time
    for spec in args.burst.split(","):
        slots, n = (int(x) for x in spec.split(":"))
        section(
            f"burst: {n} jobs at once on {slots} slot(s), S={s} s "
            f"(ideal makespan {n * s / slots:.2f} s)"
        )
        stack = Stack(root, f"burst{slots}", args.log_level)
        try:
            stack.migrate()
            await stack.start_fakes(slots, s)
            await stack.start_api()
            await stack.start_worker()
            warm = [Http(stack.api_port) for _ in range(slots)]  # one warm-up job per slot
            await asyncio.gather(*(run_one_job(c, 0.01) for c in warm))
            conns = [Http(stack.api_port) for _ in range(n)]
            await asyncio.gather(*(c.connect() for c in conns))
            poller = Http(stack.api_port)
            await poller.connect()

            async def submit(conn: Http) -> tuple[float, dict]:  # type: ignore[type-arg]
                sent = time.perf_counter()
                return sent, await conn.json("POST", "/sdapi/v1/txt2img", SMALL_BODY, expect=(202,))

            wall0, t0 = time.time(), time.perf_counter()
            submitted = await asyncio.gather(*(submit(c) for c in conns))
            t_submitted = time.perf_counter()
            ids = {job["id"] for _, job in submitted}
            # Done when nothing is queued or processing (only our jobs exist besides warm-ups).
            while True:
                await asyncio.sleep(args.burst_poll_ms / 1000)
                queued = await poller.json("GET", "/sdapi/v1/jobs?status=queued&limit=1")
                if queued["jobs"]:
                    continue
                running = await poller.json("GET", "/sdapi/v1/jobs?status=processing&limit=1")
                if not running["jobs"]:
                    break
            t_last = time.perf_counter()
            listed = (await poller.json("GET", "/sdapi/v1/jobs?limit=200"))["jobs"]
            mine = [j for j in listed if j["id"] in ids]
            stack.check_alive()
        finally:
            stack.stop()
        makespan = t_last - t0
        ideal = n * s / slots
        statuses = Counter(j["status"] for j in mine)
        per_backend = Counter(j["backend"] for j in mine)
        server_makespan = max(ts(j["completed_at"]) or 0 for j in mine) - wall0
        eff = ideal / makespan
        print(
            f"  submit phase {ms(t_submitted - t0):.1f} ms for {n} jobs; statuses {dict(statuses)}"
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
            ">= 0.97",
            eff >= 0.97,
        )


async def hammer(
    port: int, clients: int, warmup: float, seconds: float, stop_after: int | None = None
) -> dict:  # type: ignore[type-arg]
    """`clients` keep-alive connections posting SMALL_BODY in a loop. Latencies of requests sent
    after `warmup` s and before `warmup + seconds` s; or until `stop_after` 202s in all."""
    conns = [Http(port) for _ in range(clients)]
    await asyncio.gather(*(c.connect() for c in conns))
    start = time.perf_counter()
    measure_from, measure_to = start + warmup, start + warmup + seconds
    latencies: list[float] = []
    statuses: Counter[int | str] = Counter()
    accepted = 0
    done_at = [0.0]

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
            done_at[0] = max(done_at[0], end)

    await asyncio.gather(*(client(c) for c in conns))
    for conn in conns:
        conn.close()
    return {"latencies": latencies, "statuses": statuses, "elapsed": done_at[0] - start}


async def part_submit(root: Path, args: argparse.Namespace, report: Report) -> None:
    section(
        f"submit throughput: {args.clients} keep-alive clients for {args.submit_seconds} s "
        f"(after 1 s warm-up), no worker"
    )
    stack = Stack(root, "submit", args.log_level)
    try:
        stack.migrate()
        await stack.start_api()
        assert stack.api is not None
        api_ps, me = psutil.Process(stack.api.pid), psutil.Process()
        api_cpu0, me_cpu0, t0 = api_ps.cpu_times(), me.cpu_times(), time.perf_counter()
        result = await hammer(stack.api_port, args.clients, 1.0, args.submit_seconds)
        api_cpu1, me_cpu1, t1 = api_ps.cpu_times(), me.cpu_times(), time.perf_counter()
        stack.check_alive()
    finally:
        stack.stop()
    lat = result["latencies"]
    ok = result["statuses"].get(202, 0)
    rate = ok / args.submit_seconds
    wall = t1 - t0
    api_cpu = (api_cpu1.user + api_cpu1.system - api_cpu0.user - api_cpu0.system) / wall
    me_cpu = (me_cpu1.user + me_cpu1.system - me_cpu0.user - me_cpu0.system) / wall
    print(
        f"  accepted (202) {ok} in {args.submit_seconds} s = {rate:,.0f}/s; "
        f"responses {dict(result['statuses'])}"
    )
    print(
        f"  latency p50 {ms(pct(lat, 50)):.1f} ms, p90 {ms(pct(lat, 90)):.1f} ms, "
        f"p99 {ms(pct(lat, 99)):.1f} ms, max {ms(max(lat)):.1f} ms"
    )
    print(
        f"  CPU (cores busy, whole run incl. warm-up): API {api_cpu:.2f}, bench client {me_cpu:.2f}"
        f" of {os.cpu_count()} cores"
    )
    p99 = ms(pct(lat, 99))
    report.add("submits_per_s", "submit throughput", rate, "/s", ">= 1000/s", rate >= 1000)
    report.add("submit_p50", "submit latency p50", ms(pct(lat, 50)), "ms")
    report.add("submit_p99", "submit latency p99", p99, "ms", "<= 50 ms", p99 <= 50)


async def part_rss(root: Path, args: argparse.Namespace, report: Report) -> None:
    n = args.rss_jobs
    section(f"API memory: RSS after {n:,} submits ({args.clients} clients, no worker)")
    stack = Stack(root, "rss", args.log_level)
    try:
        stack.migrate()
        await stack.start_api()
        assert stack.api is not None
        api_ps = psutil.Process(stack.api.pid)
        rss0 = api_ps.memory_info().rss
        t0 = time.perf_counter()
        result = await hammer(stack.api_port, args.clients, 0.0, 0.0, stop_after=n)
        took = time.perf_counter() - t0
        rss1 = api_ps.memory_info().rss
        api = Http(stack.api_port)  # then a little reading, as a dashboard would
        for _ in range(20):
            await api.json("GET", "/sdapi/v1/jobs?limit=200")
        await asyncio.sleep(1.0)
        rss2 = api_ps.memory_info().rss
        stored = sqlite3.connect(stack.db_path).execute("SELECT count(*) FROM jobs").fetchone()[0]
        stack.check_alive()
    finally:
        stack.stop()
    mib = 1024 * 1024
    print(
        f"  {result['statuses'].get(202, 0):,} accepted in {took:.1f} s; "
        f"jobs in the database: {stored:,}"
    )
    print(
        f"  API RSS: {rss0 / mib:.1f} MiB after start, {rss1 / mib:.1f} MiB after {n:,} submits, "
        f"{rss2 / mib:.1f} MiB after 20 list pages of 200 and 1 s idle"
    )
    final = max(rss1, rss2) / mib
    report.add(
        "rss_mib", f"API RSS after {n:,} jobs", final, "MiB", "<= 150 MB", final * mib <= 150e6
    )


def fill_jobs(db_path: Path, n: int) -> dict:  # type: ignore[type-arg]
    """Insert `n` jobs (and payloads) in one transaction with the stdlib sqlite3 module."""
    rng = random.Random(42)
    now = time.time()
    span = 6 * 86400  # inside the default 7-day retention
    statuses = (
        ["completed"] * 85 + ["error"] * 7 + ["canceled"] * 5 + ["queued"] * 2 + ["processing"]
    )
    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    job_rows, payload_rows, counts = [], [], Counter()
    for i in range(n):
        seq = i + 1
        created = now - span + span * i / n
        status = rng.choice(statuses)
        kind = "img2img" if rng.random() < 0.2 else "txt2img"
        counts[status] += 1
        counts[kind] += 1
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
                **(
                    {
                        "denoising_strength": 0.6,
                        "init_images": ["<image: 1398100 characters omitted>"],
                    }
                    if kind == "img2img"
                    else {}
                ),
            }
        )
        started = completed = result = error = lease_owner = lease_token = lease_exp = backend = (
            None
        )
        attempts, progress, eta, image_count = 0, 0.0, None, 0
        if status != "queued":
            started, attempts, backend = created + 0.01, 1, "http://127.0.0.1:7860"
        if status == "completed":
            completed, progress, eta, image_count = started + 4.2, 1.0, 0.0, 1
            result = json.dumps(
                {
                    "images": [],
                    "parameters": json.loads(body),
                    "info": json.dumps(
                        {
                            "prompt": f"a lighthouse at dusk #{seq}",
                            "seed": 1000 + seq,
                            "all_seeds": [1000 + seq],
                        }
                    ),
                }
            )
        elif status == "error":
            completed = started + 1.0
            error = json.dumps(
                {"code": "backend_error", "message": "A1111 answered 500", "backend": backend}
            )
        elif status == "canceled":
            completed = created + 2.0
            error = json.dumps({"code": "canceled", "message": "canceled before it started"})
        elif status == "processing":
            progress, eta = 0.4, 2.5
            lease_owner, lease_token, lease_exp = "bench:1:000000", str(uuid.uuid4()), now + 3600
        updated = completed or started or created
        job_rows.append(
            (
                seq,
                str(uuid.uuid4()),
                kind,
                status,
                0,
                body,
                result,
                image_count,
                error,
                progress,
                eta,
                attempts,
                3,
                created,
                lease_owner,
                lease_token,
                lease_exp,
                backend,
                None,
                None,
                None,
                None,
                None,
                None,
                created,
                started,
                completed,
                updated,
            )
        )
        payload_rows.append((seq, body))
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO jobs (seq, id, type, status, priority, request, result, image_count, error, "
        "progress, eta_relative, attempts, max_attempts, run_after, lease_owner, lease_token, "
        "lease_expires_at, backend, cancel_requested_at, idempotency_key, request_hash, "
        "webhook_url, webhook_secret, webhook_events, created_at, started_at, completed_at, "
        "updated_at) "
        "VALUES (" + ",".join("?" * 28) + ")",
        job_rows,
    )
    conn.executemany("INSERT INTO job_payloads (job_seq, body) VALUES (?, ?)", payload_rows)
    conn.execute("COMMIT")
    conn.close()
    return dict(counts)


async def part_list(root: Path, args: argparse.Namespace, report: Report) -> None:
    n, reps = args.list_jobs, args.list_requests
    section(f"listing: {reps} sequential GET /sdapi/v1/jobs per query with {n:,} jobs stored")
    stack = Stack(root, "list", args.log_level)
    try:
        stack.migrate()
        t0 = time.perf_counter()
        counts = fill_jobs(stack.db_path, n)
        print(
            f"  inserted {n:,} jobs in {time.perf_counter() - t0:.1f} s: {counts}; "
            f"database {stack.db_path.stat().st_size / 1e6:.0f} MB"
        )
        await stack.start_api()
        api = Http(stack.api_port)
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
            results.append((label, query, got, times))
        stack.check_alive()
    finally:
        stack.stop()
    for label, _query, got, times in results:
        print(
            f"  {label:<38} {got:>3} rows  p50 {ms(pct(times, 50)):6.1f} ms  "
            f"p90 {ms(pct(times, 90)):6.1f} ms  max {ms(max(times)):6.1f} ms"
        )
    plain = ms(pct(results[0][3], 50))
    report.add(
        "list_p50", f"GET /jobs?limit=50 p50 ({n:,} jobs)", plain, "ms", "<= 20 ms", plain <= 20
    )
    for label, _, _, times in results[1:4]:
        value = ms(pct(times, 50))
        report.add(f"list_{label}", f"  ... {label} p50", value, "ms", "<= 20 ms", value <= 20)
    worst_label, _, _, worst = max(results[:-1], key=lambda r: pct(r[3], 50))
    report.add(
        "list_worst", f"  worst limit=50 query p50 ({worst_label})", ms(pct(worst, 50)), "ms"
    )


def print_baseline(report: Report) -> None:
    v = report.values
    parts = []
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


async def main_async(args: argparse.Namespace) -> int:
    only = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(only) - set(PARTS)
    if unknown:
        print(f"unknown part(s) {sorted(unknown)}; choose from {', '.join(PARTS)}", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="a1111-proxy-bench-"))
    report = Report()
    print(
        f"a1111-proxy load benchmark: {platform.python_implementation()} "
        f"{platform.python_version()}, "
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU(s), SQLite "
        f"{sqlite3.sqlite_version}, log level {args.log_level}; work dir {root}"
    )
    runners = {
        "overhead": part_overhead,
        "wait": part_wait,
        "burst": part_burst,
        "submit": part_submit,
        "rss": part_rss,
        "list": part_list,
    }
    failed = []
    try:
        for name in PARTS:
            if name in only:
                try:
                    await runners[name](root, args, report)
                except Exception as exc:  # report it and go on with the other parts
                    failed.append(name)
                    print(f"  !! {name} failed: {type(exc).__name__}: {exc}", flush=True)
                    logs = sorted((root / name).glob("*.log")) if (root / name).exists() else []
                    if logs:
                        print(f"     logs: {', '.join(str(p) for p in logs)}")
        report.print()
        print_baseline(report)
    finally:
        kill_all()
        if args.keep or failed:
            print(f"\nwork dir kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only", default=",".join(PARTS), help=f"parts to run (default all: {','.join(PARTS)})"
    )
    parser.add_argument(
        "-S", "--service-time", type=float, default=0.2, help="fake A1111 seconds per job"
    )
    parser.add_argument("--overhead-jobs", type=int, default=50, help="N for the overhead part")
    parser.add_argument(
        "--poll-ms", type=float, default=2.0, help="job polling interval (overhead part)"
    )
    parser.add_argument("--burst", default="1:20,4:40", help="SLOTS:N cases for the burst part")
    parser.add_argument(
        "--burst-poll-ms", type=float, default=5.0, help="completion polling interval (burst)"
    )
    parser.add_argument(
        "--clients", type=int, default=32, help="concurrent connections (submit, rss)"
    )
    parser.add_argument(
        "--submit-seconds", type=float, default=5.0, help="measured window (submit)"
    )
    parser.add_argument("--rss-jobs", type=int, default=10_000, help="submits before reading RSS")
    parser.add_argument(
        "--list-jobs", type=int, default=100_000, help="jobs stored for the list part"
    )
    parser.add_argument("--list-requests", type=int, default=200, help="timed GETs per list query")
    parser.add_argument(
        "--log-level", default="info", help="A1111_PROXY_LOG_LEVEL for API and worker"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work dir (databases, logs)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def terminate(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop processes

    signal.signal(signal.SIGTERM, terminate)
    try:
        return asyncio.run(main_async(args))
    except KeyboardInterrupt:
        return 130
    finally:
        kill_all()


if __name__ == "__main__":
    sys.exit(main())
