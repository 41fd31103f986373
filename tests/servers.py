"""Real servers on loopback for tests: ASGI apps in a thread, and our own processes."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn
from starlette.types import ASGIApp

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class TLS:
    """What an https test server presents (a certificate and its key, PEM files), and a hook
    that sees the server name (SNI) each client asks for."""

    certfile: Path
    keyfile: Path
    on_server_name: Callable[[str | None], None] = lambda name: None


@contextlib.contextmanager
def serve(app: ASGIApp, tls: TLS | None = None) -> Iterator[str]:
    """Run `app` with uvicorn on 127.0.0.1 (ephemeral port) in a thread; yield its base URL
    (https with `tls`)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        app,
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=1,
        ssl_certfile=tls and tls.certfile,
        ssl_keyfile=tls and tls.keyfile,
    )
    if tls is not None:
        config.load()  # makes config.ssl, the context the server will use
        assert config.ssl is not None
        config.ssl.sni_callback = _server_name_hook(tls.on_server_name)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("server exited during startup (lifespan failed?)")
        time.sleep(0.001)
    try:
        scheme = "https" if tls else "http"
        yield f"{scheme}://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def _server_name_hook(hook: Callable[[str | None], None]) -> Callable[..., None]:
    def on_handshake(_connection: object, server_name: str | None, _context: object) -> None:
        hook(server_name)  # and go on with the handshake

    return on_handshake


# The header a client sends to get 202 + job instead of A1111's answer (RESPONSE_MODE=auto).
ASYNC = {"Prefer": "respond-async"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Proc:
    """One of our processes (`a1111-proxy serve` or `worker`), logging to a file. `module` runs
    another one (`tests.fakes.a1111` for a fake A1111 of its own, as the benchmarks do)."""

    def __init__(
        self, args: list[str], env: dict[str, str], log: Path, module: str = "a1111_proxy"
    ) -> None:
        self.log_path = log
        self._log = open(log, "ab")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            env={**os.environ, **env, "PYTHONPATH": _python_path()},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=log.parent,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def signal(self, signum: int) -> None:
        self.popen.send_signal(signum)

    def kill(self) -> None:
        self.popen.kill()
        self.popen.wait(timeout=10)

    def stop(self, timeout: float = 15) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._log.close()
        return self.popen.returncode

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")


def wait_http(url: str, timeout: float = 60, proc: Proc | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.popen.poll() is not None:
            raise RuntimeError(f"process exited early:\n{proc.output()}")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer in {timeout} s")


def wait_for(predicate, timeout: float = 20, interval: float = 0.02, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def _python_path() -> str:
    """The repository first, then whatever PYTHONPATH the caller had (packages kept apart)."""
    return os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
