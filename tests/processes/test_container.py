"""What can be checked of the container without a Docker engine: the Dockerfile passes hadolint,
and supervisord runs our `supervisord.conf` as the image does (both programs up, /health 200,
a killed program restarted, a clean stop on SIGTERM)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from a1111_proxy.db.engine import POOL_SIZE
from a1111_proxy.migrate import upgrade
from tests.fakes.a1111 import FakeA1111
from tests.servers import ASYNC, ROOT, free_port, serve, wait_for
from tests.stack import FAST_WORKER

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    found = shutil.which(name, path=str(BIN)) or shutil.which(name)
    if found is None:
        pytest.skip(
            f"{name} is not installed (it is in the `test` extra: pip install -e '.[test]')"
        )
    return found


def test_the_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [_tool("hadolint"), "--no-color", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_dockerfile_builds_with_or_without_the_engine_as_a_non_root_user() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "ARG ENGINE=false" in text and '"$ENGINE" = "true"' in text
    assert re.search(r"^USER 10001", text, re.M) and 'VOLUME ["/data"]' in text
    assert "HEALTHCHECK" in text and "/health" in text
    assert text.count("FROM python:${PYTHON_VERSION}-slim") == 2  # multi-stage, slim


class Supervisor:
    def __init__(self, tmp: Path, env: dict[str, str]) -> None:
        self.conf = str(ROOT / "supervisord.conf")
        self.env = env
        # A pipe, as in a container: every program's lines and supervisord's own share it.
        self.popen = subprocess.Popen(
            [_tool("supervisord"), "-c", self.conf],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=tmp,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line.decode(errors="replace"))

    def status(self) -> dict[str, tuple[str, int | None]]:
        """program -> (state, pid)"""
        result = subprocess.run(
            [_tool("supervisorctl"), "-c", self.conf, "status"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=10,
        )
        found = {}
        for line in result.stdout.splitlines():
            parts = line.split()
            if len(parts) >= 2:
                pid = re.search(r"pid (\d+)", line)
                found[parts[0]] = (parts[1], int(pid.group(1)) if pid else None)
        return found

    def running(self) -> dict[str, int] | None:
        status = self.status()
        if set(status) == {"serve", "worker"} and all(s == "RUNNING" for s, _ in status.values()):
            return {name: pid for name, (_, pid) in status.items() if pid}
        return None

    def output(self) -> str:
        return "".join(self.lines)


@pytest.fixture
def supervised(tmp_path: Path) -> Iterator[tuple[Supervisor, str]]:
    fake = FakeA1111(service_time=0.05)
    with serve(fake.app) as backend:
        database = f"sqlite+aiosqlite:///{tmp_path}/jobs.db"
        upgrade(database)  # the image's CMD migrates before it starts supervisord
        port = free_port()
        env = {
            **os.environ,
            **FAST_WORKER,
            "PYTHONPATH": str(ROOT),
            "PATH": f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "SUPERVISOR_RUN_DIR": str(tmp_path),
            "A1111_PROXY_PORT": str(port),
            "A1111_PROXY_DATABASE_URL": database,
            "A1111_PROXY_A1111_URLS": backend,
        }
        supervisor = Supervisor(tmp_path, env)
        try:
            yield supervisor, f"http://127.0.0.1:{port}"
        finally:
            if supervisor.popen.poll() is None:
                supervisor.popen.send_signal(signal.SIGTERM)
                try:
                    supervisor.popen.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    supervisor.popen.kill()
                    supervisor.popen.wait()
            supervisor.reader.join(timeout=5)
            if supervisor.popen.stdout is not None:
                supervisor.popen.stdout.close()


def _healthy(base: str) -> bool:
    try:
        return httpx.get(f"{base}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_supervisord_runs_both_programs_restarts_a_killed_worker_and_stops_cleanly(
    supervised: tuple[Supervisor, str],
) -> None:
    supervisor, base = supervised
    pids = wait_for(
        supervisor.running, timeout=30, what=f"both programs RUNNING:\n{supervisor.output()}"
    )
    wait_for(lambda: _healthy(base), timeout=20, what="/health to answer 200")
    os.kill(pids["worker"], signal.SIGKILL)
    restarted = wait_for(
        lambda: (r := supervisor.running()) and r["worker"] != pids["worker"] and r,
        timeout=30,
        what="the worker to be restarted",
    )
    assert restarted["serve"] == pids["serve"]  # the API was left alone
    job = httpx.post(
        f"{base}/sdapi/v1/txt2img", json={"prompt": "after the restart"}, headers=ASYNC
    ).json()
    wait_for(
        lambda: httpx.get(f"{base}/sdapi/v1/jobs/{job['id']}").json()["status"] == "completed",
        timeout=20,
        what="the restarted worker to run a job",
    )

    supervisor.popen.send_signal(signal.SIGTERM)  # what `docker stop` sends to PID 1
    assert supervisor.popen.wait(timeout=30) == 0
    assert not any(
        psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"
        for pid in restarted.values()
    )
    supervisor.reader.join(timeout=5)
    out = supervisor.output()
    assert "SIGTERM: no new jobs" in out and "stopped: worker (exit status 0)" in out
    # uvicorn finishes open requests, then ends itself with the signal it got
    assert "Finished server process" in out and "stopped: serve" in out
    program_lines = [line for line in out.splitlines() if line.startswith("{")]
    assert program_lines and all(json.loads(line)["message"] for line in program_lines)


def test_compose_runs_postgresql_api_and_worker_replicas_on_the_environments_a1111_urls() -> None:
    import yaml  # uvicorn[standard] brings PyYAML

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "migrate", "api", "worker", "lb"} <= set(services)
    for name in ("migrate", "api", "worker"):
        env = services[name]["environment"]
        assert env["A1111_PROXY_DATABASE_URL"].startswith("postgresql+asyncpg://")
        assert "@postgres:5432/" in env["A1111_PROXY_DATABASE_URL"]
        assert env["A1111_PROXY_A1111_URLS"].startswith("${A1111_URLS:?")
    assert services["api"]["command"] == ["a1111-proxy", "serve"]
    assert services["worker"]["command"] == ["a1111-proxy", "worker"]
    assert "WORKER_REPLICAS" in str(services["worker"]["deploy"]["replicas"])
    assert "API_REPLICAS" in str(services["api"]["deploy"]["replicas"])
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["migrate"]["condition"] == (
            "service_completed_successfully"
        )
    assert (ROOT / "deploy" / "nginx.conf").exists()


def test_compose_lets_postgresql_take_the_connections_of_its_own_scaling_example() -> None:
    """`--scale api=3 --scale worker=4` on a host of 8 cores or more (`serve` runs 8 API
    processes then): each API process pools POOL_SIZE connections and LISTENs on one more, each
    worker two more (its claimer's and its webhook sender's)."""
    import yaml

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    command = compose["services"]["postgres"]["command"]
    allowed = int(command[command.index("-c") + 1].removeprefix("max_connections="))
    assert 3 * 8 * (POOL_SIZE + 1) + 4 * (POOL_SIZE + 2) <= allowed


def test_compose_gives_the_workers_and_a1111_one_models_volume_that_workers_may_write() -> None:
    import yaml

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    worker_mounts = [m.split(":") for m in services["worker"]["volumes"]]
    a1111_mounts = [m.split(":") for m in services["a1111"]["volumes"]]
    assert ["models", "/data/models"] in worker_mounts  # read-write: downloads land here
    assert services["worker"]["environment"]["A1111_PROXY_MODELS_DIR"] == "/data/models"
    assert [m[0] for m in a1111_mounts] == ["models"]
    assert "models" in compose["volumes"]
    assert services["a1111"]["profiles"] == ["a1111"]  # only with --profile a1111
