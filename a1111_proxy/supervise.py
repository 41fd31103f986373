"""`a1111-proxy up`'s supervisor: runs the API server and a worker as child processes, starts
again one that dies (after a backoff), and stops both when asked (SIGINT, SIGTERM).

A child that exits with CONFIG_ERROR said why on stderr, and would say it again on every
restart (invalid settings, a database that cannot be used): `up` then stops the other child and
exits with that status. Any other exit, a signal included, is a crash, and the child is restarted.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

log = logging.getLogger("a1111_proxy.up")

CONFIG_ERROR = 2  # what `a1111-proxy` exits with when only a change of configuration can help
TICK = 0.25  # how often children are checked (a signal wakes the loop at once)


@dataclass
class Backoff:
    """1 s, 2 s, 4 s, ... up to `most`; back to `first` once a child has stayed up `steady` s."""

    first: float = 1.0
    most: float = 30.0
    steady: float = 60.0
    current: float | None = None

    def after(self, ran_for: float) -> float:
        if self.current is None or ran_for >= self.steady:
            self.current = self.first
        else:
            self.current = min(self.current * 2, self.most)
        return self.current


@dataclass
class Child:
    name: str
    argv: Sequence[str]
    env: Mapping[str, str]
    backoff: Backoff = field(default_factory=Backoff)
    popen: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restart_at: float = 0.0
    restarts: int = -1

    def start(self) -> None:
        # Its own session: a terminal's Ctrl-C reaches only `up`, which forwards it once.
        self.popen = subprocess.Popen(self.argv, env=dict(self.env), start_new_session=True)
        self.started = time.monotonic()
        self.restarts += 1
        how = f"restarted (restart {self.restarts})" if self.restarts else "started"
        log.info("%s %s, pid %d", self.name, how, self.popen.pid)

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def send(self, signum: int) -> None:
        if self.popen is not None and self.running():
            self.popen.send_signal(signum)


def describe_exit(code: int) -> str:
    if code < 0:
        return f"killed by signal {signal.Signals(-code).name}"
    return f"exit code {code}"


class Supervisor:
    def __init__(self, children: Sequence[Child], *, stop_timeout: float) -> None:
        self.children = list(children)
        self.stop_timeout = stop_timeout
        self.asked: int | None = None  # the signal that asked us to stop
        self.failed: int | None = None  # a child's CONFIG_ERROR
        self._wake = threading.Event()

    def run(self) -> int:
        """Until asked to stop (then 0) or a child's configuration error (then its status)."""
        signal.signal(signal.SIGINT, self._ask)
        signal.signal(signal.SIGTERM, self._ask)
        for child in self.children:
            child.start()
        while self.asked is None and self.failed is None:
            for child in self.children:
                self._tend(child, time.monotonic())
            self._wake.wait(TICK)
        self._stop_all(self.asked or signal.SIGTERM)
        return self.failed or 0

    def _ask(self, signum: int, _frame: object) -> None:
        if self.asked is not None:  # asked again: say it again (uvicorn then stops at once)
            for child in self.children:
                child.send(signum)
        self.asked = signum
        self._wake.set()

    def _tend(self, child: Child, now: float) -> None:
        if child.popen is None:
            if now >= child.restart_at:
                child.start()
            return
        code = child.popen.poll()
        if code is None:
            return
        child.popen = None
        if code == CONFIG_ERROR:
            log.error(
                "%s exited with code %d: its configuration is wrong (see its message above), "
                "and a restart would fail the same way; stopping",
                child.name,
                code,
            )
            self.failed = code
            return
        delay = child.backoff.after(now - child.started)
        child.restart_at = now + delay
        log.error(
            "%s died (%s) after %.0f s up; restarting it in %g s",
            child.name,
            describe_exit(code),
            now - child.started,
            delay,
        )

    def _stop_all(self, signum: int) -> None:
        """Pass the signal on, wait up to stop_timeout for every child, kill what is left."""
        for child in self.children:
            child.send(signum)
        deadline = time.monotonic() + self.stop_timeout
        for child in self.children:
            if child.popen is None:
                continue
            try:
                child.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning(
                    "%s did not stop within %g s; killing it", child.name, self.stop_timeout
                )
                child.popen.kill()
                child.popen.wait()
