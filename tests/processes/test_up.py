"""`a1111-proxy up` supervises its two children (`serve`, `worker`): one that dies is started
again, the other keeps running; SIGTERM stops both and `up` exits 0; a child's configuration
error (exit status 2) ends `up` with that status. Real processes, BACKEND=fake, one SQLite file."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.servers import ASYNC, Proc, free_port, wait_for, wait_http
from tests.stack import FAST_WORKER

pytestmark = pytest.mark.slow


class Up:
    """`a1111-proxy up` as a real process, and the pids of its children as /proc lists them."""

    def __init__(self, tmp: Path) -> None:
        self.database = tmp / "jobs.db"
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        env = {
            **FAST_WORKER,
            "A1111_PROXY_DATABASE_URL": f"sqlite+aiosqlite:///{self.database}",
            "A1111_PROXY_BACKEND": "fake",
            "A1111_PROXY_FAKE_SECONDS": "0.05",
            "A1111_PROXY_LOG_FORMAT": "text",
        }
        self.proc = Proc(["up", "--port", str(port)], env, tmp / "up.log")
        self.seen: set[int] = set()

    def children(self) -> dict[str, int]:
        """{"serve": pid, "worker": pid}, for those running now."""
        pid = self.proc.pid
        with contextlib.suppress(FileNotFoundError):
            pids = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
            found = {name: child for child in pids if _running(child) and (name := _command(child))}
            self.seen.update(found.values())
            return found
        return {}

    def child(self, name: str, not_pid: int | None = None) -> int:
        """The pid of the running `name` child (other than `not_pid`), once there is one."""
        return wait_for(
            lambda: (pid := self.children().get(name)) not in (None, not_pid) and pid,
            timeout=60,
            what=f"a running {name} child",
        )

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base, timeout=30, headers=ASYNC)

    def run_a_job(self) -> dict:
        with self.client() as api:
            response = api.post("/sdapi/v1/txt2img", json={"prompt": "cat", "steps": 2})
            assert response.status_code == 202, response.text
            job_id = response.json()["id"]
            return wait_for(
                lambda: (
                    (job := api.get(f"/sdapi/v1/jobs/{job_id}").json())["status"]
                    in ("completed", "error")
                    and job
                ),
                timeout=60,
                what=f"job {job_id} to end",
            )

    def stop(self) -> None:
        self.proc.stop(timeout=60)
        for pid in self.seen:  # only our own children, and only if `up` left one behind
            if _running(pid):
                os.kill(pid, signal.SIGKILL)


def _command(pid: int) -> str | None:
    """`serve` or `worker`: the last word of the child's command line (None once it is gone)."""
    with contextlib.suppress(FileNotFoundError):
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        return argv[-2].decode() if len(argv) > 1 else None  # the line ends with a NUL
    return None


def _running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    made = Up(tmp_path)
    try:
        wait_http(f"{made.base}/ready", timeout=60, proc=made.proc)
        made.child("serve"), made.child("worker")
        yield made
    finally:
        made.stop()


def test_a_killed_worker_is_started_again_while_the_api_keeps_running(up: Up) -> None:
    api, worker = up.child("serve"), up.child("worker")
    os.kill(worker, signal.SIGKILL)
    again = up.child("worker", not_pid=worker)
    assert up.run_a_job()["status"] == "completed"
    assert up.children() == {"serve": api, "worker": again}  # the API was never restarted
    log = up.proc.output()
    assert "worker died (killed by signal SIGKILL)" in log and "restarting it in 1 s" in log
    assert f"worker restarted (restart 1), pid {again}" in log
    assert "serve died" not in log


def test_a_killed_api_is_started_again_and_serves(up: Up) -> None:
    api, worker = up.child("serve"), up.child("worker")
    os.kill(api, signal.SIGKILL)
    again = up.child("serve", not_pid=api)
    wait_http(f"{up.base}/ready", timeout=60, proc=up.proc)
    assert up.run_a_job()["status"] == "completed"
    assert up.children() == {"serve": again, "worker": worker}
    assert "serve died (killed by signal SIGKILL)" in up.proc.output()


def test_sigterm_stops_both_children_and_up_exits_0(up: Up) -> None:
    children = up.children()
    up.proc.signal(signal.SIGTERM)
    assert up.proc.popen.wait(timeout=60) == 0
    assert not [pid for pid in children.values() if _running(pid)]


def test_a_child_that_exits_with_a_configuration_error_ends_up_with_its_status(up: Up) -> None:
    # The database becomes unusable (a folder where the file was); the worker, started again,
    # refuses it with exit status 2, which any further restart would repeat.
    for path in up.database.parent.glob("jobs.db*"):
        path.rename(path.with_name(f"moved-{path.name}"))
    up.database.mkdir()
    children = up.children()
    os.kill(children["worker"], signal.SIGKILL)
    assert up.proc.popen.wait(timeout=60) == 2
    log = up.proc.output()
    assert f"{up.database} is a folder, not a file" in log
    assert "worker exited with code 2" in log and "stopping" in log
    assert not [pid for pid in children.values() if _running(pid)]
