"""What the benchmarks share: a deployment made of the tests' servers, a lean HTTP client, and
figures (percentiles, the summary table).

A deployment is `tests.stack.Stack` (migrated database, `a1111-proxy serve` and `worker` as real
processes) with the deployment's default settings instead of the tests' fast timings, and fake
A1111s (`tests.fakes.a1111`) as processes of their own, so that none of them shares a CPU-bound
interpreter with the client that measures.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import socket
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from a1111_proxy.settings import Settings  # noqa: E402
from tests.servers import Proc, free_port, wait_for, wait_http  # noqa: E402
from tests.stack import FAST_WORKER, Stack  # noqa: E402

ENV_PREFIX = str(Settings.model_config.get("env_prefix", "A1111_PROXY_"))


def default_of(variable: str) -> str:
    """The deployment's default for an `A1111_PROXY_*` variable, from `Settings`."""
    value = Settings.model_fields[variable.removeprefix(ENV_PREFIX).lower()].default
    return str(value).lower() if isinstance(value, bool) else str(value)


def bench_env(log_level: str, **extra: str) -> dict[str, str]:
    """Environment of the proxy's processes: the defaults of everything the tests speed up,
    the given log level, no Civitai (the fake's model hashes are not Civitai's)."""
    return {
        **{name: default_of(name) for name in FAST_WORKER},
        f"{ENV_PREFIX}LOG_LEVEL": log_level,
        f"{ENV_PREFIX}CIVITAI_ENABLED": "false",
        **extra,
    }


def clean_environ() -> None:
    """Settings of the shell running the benchmark must not leak into its deployments."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            del os.environ[name]


@dataclass
class Deployment:
    """A running deployment; `stack` is the tests' Stack, `fakes` the fake A1111 processes."""

    dir: Path
    stack: Stack
    fakes: list[Proc] = field(default_factory=list)
    fake_urls: list[str] = field(default_factory=list)
    admin: dict[str, str] = field(default_factory=dict)  # headers of an admin (tokens on)

    @property
    def api_port(self) -> int:
        return int(self.stack.base.rsplit(":", 1)[1])

    @property
    def api_url(self) -> str:
        return self.stack.base

    @property
    def api_pid(self) -> int:
        assert self.stack.api_proc is not None
        return self.stack.api_proc.pid

    @property
    def fake_ports(self) -> list[int]:
        return [int(url.rsplit(":", 1)[1]) for url in self.fake_urls]

    def start_workers(self, count: int = 1) -> list[Proc]:
        """Start `count` workers and wait until /health lists them all and every backend."""
        procs = [self.stack.start_worker() for _ in range(count)]

        def ready() -> bool:
            health = httpx.get(f"{self.api_url}/health", headers=self.admin, timeout=5)
            self.check_alive()
            body = health.json()
            return (
                health.status_code == 200
                and len(body["workers"]) >= count
                and len(body["backends"]) >= len(self.fake_urls)
            )

        wait_for(ready, timeout=60, interval=0.05, what="the workers' first heartbeat")
        return procs

    def check_alive(self) -> None:
        for proc in [*self.fakes, *self.stack.procs]:
            if proc.popen.poll() is not None:
                tail = "\n".join(proc.output().splitlines()[-30:])
                raise RuntimeError(
                    f"{proc.log_path.stem} exited (code {proc.popen.returncode}):\n{tail}"
                )


def log_problems(where: Path) -> None:
    """Print the warnings and errors the processes logged (retries, lost leases, crashes)."""
    for log in sorted(where.glob("*.log")):
        lines = [
            line
            for line in log.read_text(errors="replace").splitlines()
            if " WARNING " in line
            or " ERROR " in line
            or '"level": "warning"' in line
            or '"level": "error"' in line  # JSON lines
            or line.startswith(("WARNING:", "ERROR:", "Traceback"))
        ]
        if lines:
            print(f"  !! {log.stem} logged {len(lines)} warning/error line(s), e.g.:")
            for line in lines[:3]:
                print(f"     {line[:200]}")


@contextlib.contextmanager
def deployment(
    root: Path,
    name: str,
    *,
    log_level: str,
    fakes: int = 0,
    service_time: float = 0.2,
    workers: int = 0,
    database_url: str | None = None,
    backends: list[str] | None = None,
    seed: Callable[[str], object] | None = None,
    env: Mapping[str, str] | None = None,
) -> Iterator[Deployment]:
    """Fake A1111s (`fakes` processes, `service_time` s per generation, one at a time like
    A1111), a migrated database (SQLite in `root/name` unless `database_url`; `seed(url)` fills
    it before anything starts), the API and `workers` workers listing every fake (or `backends`);
    `env`: settings beyond the defaults. Stopped, and their warnings printed, when the block
    ends."""
    where = root / name
    where.mkdir(parents=True)
    ports = [free_port() for _ in range(fakes)]
    procs = [
        Proc(
            ["--port", str(port), "--service-time", str(service_time)],
            {},
            where / f"fake{i}.log",
            module="tests.fakes.a1111",
        )
        for i, port in enumerate(ports)
    ]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    stack: Stack | None = None
    try:
        for url, proc in zip(urls, procs, strict=True):
            wait_http(f"{url}/sdapi/v1/progress", timeout=60, proc=proc)
        stack = Stack(
            where,
            backends if backends is not None else urls,
            database_url,
            **bench_env(log_level, **(env or {})),
        )
        if seed is not None:
            seed(stack.url)
        admin_token = (env or {}).get(f"{ENV_PREFIX}ADMIN_TOKENS", "").split(",")[0]
        admin = {"Authorization": f"Bearer {admin_token.rpartition(':')[2]}"} if admin_token else {}
        found = Deployment(where, stack, procs, urls, admin)
        stack.start_api()
        if workers:
            found.start_workers(workers)
        # What the benchmark imported (the proxy, alembic, the fakes) is long-lived: out of the
        # collector's way, so that full collections do not pause the measuring client.
        gc.collect()
        gc.freeze()
        yield found
        found.check_alive()
    finally:
        if stack is not None:
            stack.close()
        for proc in procs:
            proc.stop(timeout=5)
        log_problems(where)


# --------------------------------------------------------------------------------------------
# A throwaway PostgreSQL database
# --------------------------------------------------------------------------------------------


def pg_admin(statement: str, dsn: str) -> None:
    """Run one statement on the PostgreSQL server of `dsn` (CREATE or DROP DATABASE)."""
    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(run())


@contextlib.contextmanager
def pg_database(dsn: str) -> Iterator[str]:
    """A throwaway database on the PostgreSQL server of `dsn` (an admin connection that may
    create databases), as an asyncpg SQLAlchemy URL; dropped afterwards."""
    name = f"a1111_proxy_bench_{uuid.uuid4().hex[:8]}"
    pg_admin(f'CREATE DATABASE "{name}"', dsn)
    host = dsn.split("://", 1)[1].rsplit("/", 1)[0]
    try:
        yield f"postgresql+asyncpg://{host}/{name}"
    finally:
        pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', dsn)


# --------------------------------------------------------------------------------------------
# A minimal keep-alive HTTP/1.1 client (cheap enough not to compete with the server for CPU)
# --------------------------------------------------------------------------------------------


class Http:
    def __init__(
        self, port: int, host: str = "127.0.0.1", prefer: str | None = "respond-async"
    ) -> None:
        """`prefer`: the Prefer header of every request. respond-async: 202 and the job; None:
        the deployment's default mode, which holds a generation request until its job ends."""
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
        parts: list[bytes] = []
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await self.reader.readuntil(b"\r\n")
                return b"".join(parts)
            parts.append(await self.reader.readexactly(size))
            await self.reader.readexactly(2)

    async def json(
        self, method: str, path: str, body: bytes | None = None, expect: Iterable[int] = (200,)
    ) -> Any:
        status, data = await self.request(method, path, body)
        if status not in expect:
            raise RuntimeError(f"{method} {path} -> {status}: {data[:500]!r}")
        return json.loads(data)


# --------------------------------------------------------------------------------------------
# Figures
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


def section(title: str) -> None:
    print(f"\n--- {title} " + "-" * max(0, 76 - len(title)), flush=True)


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
        shown = f"{value:,.3f}" if unit == "" else f"{value:,.1f} {unit}"
        verdict = "" if ok is None else ("meets" if ok else "MISSES")
        self.rows.append((label, shown, target, verdict))

    def print(self) -> None:
        header = ("metric", "value", "target", "")
        widths = [max(len(r[i]) for r in [header, *self.rows]) for i in range(4)]
        line = "  ".join("-" * w for w in widths)
        print("\n" + "=" * len(line))
        print("SUMMARY")
        print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
        print(line)
        for row in self.rows:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))


def cpu_seconds(times: Any) -> float:
    """User + system seconds of a psutil cpu_times()."""
    return float(times.user + times.system)
