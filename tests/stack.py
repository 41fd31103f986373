"""A running a1111-proxy made of real processes (API, workers) over one SQLite file."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable
from pathlib import Path

import httpx

from a1111_proxy.migrate import upgrade
from tests.servers import ASYNC, Proc, free_port, wait_for, wait_http

FAST_WORKER = {
    "A1111_PROXY_LEASE_SECONDS": "2",
    "A1111_PROXY_HEARTBEAT_SECONDS": "0.5",
    "A1111_PROXY_REAP_SECONDS": "0.5",
    "A1111_PROXY_PROGRESS_SECONDS": "0.1",
    "A1111_PROXY_SHUTDOWN_GRACE_SECONDS": "1",
    "A1111_PROXY_LOG_LEVEL": "info",
    "A1111_PROXY_CIVITAI_ENABLED": "false",  # tests never reach the internet
}


class Stack:
    def __init__(
        self, tmp: Path, backends: list[str], database_url: str | None = None, **env: str
    ) -> None:
        self.tmp = tmp
        self.url = database_url or f"sqlite+aiosqlite:///{tmp}/jobs.db"
        upgrade(self.url)
        self.env = {
            "A1111_PROXY_DATABASE_URL": self.url,
            "A1111_PROXY_A1111_URLS": ",".join(backends),
            **FAST_WORKER,
            **env,
        }
        self.procs: list[Proc] = []
        self.api: httpx.Client | None = None
        self.api_proc: Proc | None = None
        self.closers: list[Callable[[], object]] = []

    def start_api(self) -> httpx.Client:
        port = free_port()
        proc = self._start(["serve", "--port", str(port)], "api")
        wait_http(f"http://127.0.0.1:{port}/ready", proc=proc)
        if self.api is not None:
            self.api.close()
        self.api_proc = proc
        self.base = f"http://127.0.0.1:{port}"
        self.api = httpx.Client(base_url=self.base, timeout=10, headers=ASYNC)
        return self.api

    def start_worker(self, **env: str) -> Proc:
        return self._start(["worker"], f"worker{len(self.procs)}", **env)

    def _start(self, args: list[str], name: str, **env: str) -> Proc:
        proc = Proc(args, {**self.env, **env}, self.tmp / f"{name}.log")
        self.procs.append(proc)
        return proc

    def job(self, job_id: str) -> dict:
        assert self.api is not None
        return self.api.get(f"/sdapi/v1/jobs/{job_id}").json()

    def wait_status(self, job_id: str, *statuses: str, timeout: float = 30) -> dict:
        return wait_for(
            lambda: (j := self.job(job_id))["status"] in statuses and j,
            timeout=timeout,
            what=f"job {job_id} to be {statuses}",
        )

    def submit(self, **body: object) -> str:
        assert self.api is not None
        response = self.api.post("/sdapi/v1/txt2img", json={"prompt": "cat", "steps": 10, **body})
        assert response.status_code == 202, response.text
        return response.json()["id"]

    def close(self) -> None:
        for close in self.closers:
            close()
        if self.api is not None:
            self.api.close()
        for proc in self.procs:
            with contextlib.suppress(Exception):
                if proc.popen.poll() is None:
                    proc.signal(signal.SIGCONT)
                proc.stop(timeout=5)
