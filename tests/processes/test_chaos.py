"""Chaos: random SIGKILLs of API and worker processes under a mixed load, on a SQLite file and on
PostgreSQL.

Two `a1111-proxy serve` and two `a1111-proxy worker` processes share two fake A1111s; a load
thread submits jobs (some with a webhook to a receiver that fails about a third of its requests
with a 500 or a cut connection) and cancels some of them, through whichever API it picks, while
one process after another is SIGKILLed and started again. Then the system drains and every job an
API acknowledged is checked: one final state that stays, its `job.completed` delivered under one
webhook-id, nothing left `processing` or `sending`, a job canceled while queued never run after.

Every choice comes from one seed, printed (and named in every failure): `CHAOS_SEED=<seed>`
replays the same choices (a busy machine's timing still differs from run to run).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from a1111_proxy.db.engine import Database
from a1111_proxy.db.tables import jobs, webhook_deliveries
from tests.fakes.a1111 import FakeA1111
from tests.fakes.webhook_sink import Received, WebhookSink
from tests.servers import ASYNC, Proc, free_port, serve, wait_for, wait_http
from tests.stack import Stack

# About a minute a database on an idle machine; the bound is for a busy one.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

KILLS = 30
APIS, WORKERS = 2, 2
FINAL = ("completed", "error", "canceled")
# Short leases and a quick webhook schedule, so that what a killed process held comes back soon.
ENV = {
    "A1111_PROXY_LEASE_SECONDS": "2",
    "A1111_PROXY_HEARTBEAT_SECONDS": "0.5",
    "A1111_PROXY_REAP_SECONDS": "0.3",
    "A1111_PROXY_WEBHOOK_ALLOW_PRIVATE": "true",
    "A1111_PROXY_WEBHOOK_LEASE_SECONDS": "3",
    "A1111_PROXY_WEBHOOK_RETRY_SECONDS": "0.1,0.3,0.5,1,1,1,1",
    "A1111_PROXY_CATALOGUE_SECONDS": "3600",
}
FLAKY_RATE, FLAKY_MOST = 0.3, 3  # the receiver fails a message at most 3 of its 8 attempts


@dataclass
class Slot:
    """One process of the deployment, started again under the same name after each kill."""

    name: str
    args: list[str]
    ready_line: str  # what its log says once it is up
    proc: Proc | None = None
    starts: int = 0
    kills: int = 0

    def up(self) -> bool:
        return self.proc is not None and self.ready_line in self.proc.output()


class Deployment:
    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.ports = [free_port() for _ in range(APIS)]
        apis = [
            Slot(f"api{i}", ["serve", "--port", str(port)], "Application startup complete")
            for i, port in enumerate(self.ports)
        ]
        workers = [Slot(f"worker{i}", ["worker"], " slot(s): ") for i in range(WORKERS)]
        self.slots = apis + workers
        self.crashes: list[str] = []  # processes that exited before they were killed

    @property
    def bases(self) -> list[str]:
        return [f"http://127.0.0.1:{port}" for port in self.ports]

    def start(self, slot: Slot) -> None:
        slot.starts += 1
        log = self.stack.tmp / f"{slot.name}-{slot.starts}.log"
        slot.proc = Proc(slot.args, self.stack.env, log)
        self.stack.procs.append(slot.proc)

    def victim(self, rng: random.Random, busy: set[int]) -> Slot:
        """Half the time a worker running a job (`busy`: their pids), if one is; otherwise a
        random process among those that are up, but never the only API up, so that the load
        goes on; a starting one when no other is left (a busy machine starts them slowly, and
        the chaos keeps its pace)."""
        running = [slot for slot in self.slots if slot.proc and slot.proc.pid in busy]
        if running and rng.random() < 0.5:
            return rng.choice(running)
        up = [slot for slot in self.slots if slot.up()]
        apis_up = [slot for slot in up if slot.args[0] == "serve"]
        spared = apis_up if len(apis_up) == 1 else []
        chosen = [slot for slot in up if slot not in spared]
        return rng.choice(chosen or [slot for slot in self.slots if slot not in up])

    def kill_and_restart(self, slot: Slot) -> None:
        assert slot.proc is not None
        if (code := slot.proc.popen.poll()) is not None:
            self.crashes.append(f"{slot.name} exited {code} on its own:\n{slot.proc.output()}")
        slot.proc.kill()
        slot.kills += 1
        self.start(slot)

    def wait_ready(self) -> None:
        for slot, base in zip(self.slots, self.bases, strict=False):
            wait_http(f"{base}/ready", timeout=60, proc=slot.proc)

    def exited(self) -> list[str]:
        """The processes (of the last generation) that are not running."""
        return [
            f"{slot.name} exited {slot.proc.popen.returncode} on its own:\n{slot.proc.output()}"
            for slot in self.slots
            if slot.proc is not None and slot.proc.popen.poll() is not None
        ]

    def errors_logged(self) -> list[str]:
        """Errors any process logged: killing a process must not make the others fail."""
        return [
            f"{path.name}: {line[:3000]}"
            for path in sorted(self.stack.tmp.glob("*.log"))
            for line in path.read_text(errors="replace").splitlines()
            if '"level": "error"' in line or '"level": "critical"' in line or "Traceback" in line
        ]


@dataclass(frozen=True)
class Submitted:
    id: str
    prompt: str
    hook: str | None  # the receiver's path for this job's webhooks


@dataclass(frozen=True)
class Cancel:
    id: str
    answered: str  # the status the cancel answered with
    at: float  # when the answer arrived


@dataclass
class Load:
    """Submits (two in five with a webhook) and cancels, through a random API, until stopped.
    Only a 2xx answer counts: a request whose answer never came acknowledged nothing."""

    bases: list[str]
    hooks: str
    rng: random.Random
    acked: list[Submitted] = field(default_factory=list)
    cancels: list[Cancel] = field(default_factory=list)
    unanswered: Counter[str] = field(default_factory=Counter)
    stopped: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with httpx.Client(timeout=5, headers=ASYNC) as client:
            n = 0
            while not self.stopped.wait(self.rng.uniform(0.1, 0.3)):
                if self.acked and self.rng.random() < 0.2:
                    self._cancel(client, self.rng.choice(self.acked[-20:]))
                else:
                    n += 1
                    self._submit(client, n)

    def _submit(self, client: httpx.Client, n: int) -> None:
        body: dict[str, Any] = {"prompt": f"chaos {n}", "steps": 3}
        hook = f"/job/{n}" if self.rng.random() < 0.4 else None
        if hook is not None:
            body["webhook_url"] = self.hooks + hook
            if self.rng.random() < 0.5:
                body["webhook_events"] = ["started", "completed"]
        answer = self._post(client, "/sdapi/v1/txt2img", body)
        if answer is not None:
            self.acked.append(Submitted(answer["id"], body["prompt"], hook))

    def _cancel(self, client: httpx.Client, job: Submitted) -> None:
        answer = self._post(client, f"/sdapi/v1/jobs/{job.id}/cancel", None)
        if answer is not None:
            self.cancels.append(Cancel(job.id, answer["status"], time.time()))

    def _post(self, client: httpx.Client, path: str, body: Any) -> dict[str, Any] | None:
        """POST through a random API, or the other one when it refuses the connection (the
        request was not sent); None unless a 2xx answer came."""
        first = self.rng.randrange(len(self.bases))
        for base in self.bases[first:] + self.bases[:first]:
            try:
                response = client.post(base + path, json=body)
                break
            except httpx.ConnectError:
                continue
            except httpx.HTTPError as exc:
                self.unanswered[type(exc).__name__] += 1
                return None
        else:
            self.unanswered["no API up"] += 1
            return None
        if not response.is_success:
            self.unanswered[str(response.status_code)] += 1
            return None
        return dict(response.json())


@dataclass(frozen=True)
class Census:
    jobs: dict[str, int]  # by status
    deliveries: dict[str, int]  # by status
    completed_messages: dict[int, int]  # job seq -> its `completed` messages, where more than one
    running: set[int]  # the pids of the workers that hold a job

    def settled(self) -> bool:
        unfinished = {"queued", "processing"} & set(self.jobs)
        return not unfinished and not {"pending", "sending"} & set(self.deliveries)


def census(url: str) -> Census:
    """What the database holds, read directly."""

    async def read() -> Census:
        db = Database(url)
        d = webhook_deliveries
        try:
            async with db.reading() as conn:
                by_status = select(jobs.c.status, func.count()).group_by(jobs.c.status)
                sent = select(d.c.status, func.count()).group_by(d.c.status)
                twice = (
                    select(d.c.job_seq, func.count())
                    .where(d.c.event == "completed")
                    .group_by(d.c.job_seq)
                    .having(func.count() > 1)
                )
                owners = select(jobs.c.lease_owner).where(jobs.c.status == "processing")
                return Census(
                    {s: n for s, n in (await conn.execute(by_status)).all()},
                    {s: n for s, n in (await conn.execute(sent)).all()},
                    {s: n for s, n in (await conn.execute(twice)).all()},
                    {int(o.rsplit(":", 2)[1]) for o in (await conn.execute(owners)).scalars()},
                )
        finally:
            await db.dispose()

    return asyncio.run(read())


@pytest.fixture
def seed() -> int:
    chosen = int(os.environ.get("CHAOS_SEED") or random.SystemRandom().randrange(2**32))
    print(f"chaos seed: {chosen} (CHAOS_SEED={chosen} replays it)")
    return chosen


@pytest.fixture
def fakes() -> Iterator[list[tuple[FakeA1111, str]]]:
    made = [FakeA1111(service_time=0.4, name=name) for name in ("a", "b")]
    with serve(made[0].app) as a, serve(made[1].app) as b:
        yield [(made[0], a), (made[1], b)]


def test_thirty_random_kills_under_load_lose_no_job_and_no_webhook(
    tmp_path: Path, database_url: str, seed: int, fakes: list[tuple[FakeA1111, str]]
) -> None:
    rng = random.Random(seed)
    sink = WebhookSink()
    sink.flaky(random.Random(rng.random()), FLAKY_RATE, FLAKY_MOST, slow=0.3)
    with serve(sink.app) as hooks:
        stack = Stack(tmp_path, [url for _, url in fakes], database_url=database_url, **ENV)
        deployment = Deployment(stack)
        try:
            load = _chaos(deployment, hooks, rng)
            _check(deployment, load, sink, fakes, database_url, seed)
        finally:
            stack.close()


def _chaos(deployment: Deployment, hooks: str, rng: random.Random) -> Load:
    """Start the deployment, put it under load, kill a random process every 1-2 s (starting it
    again at once), KILLS times; then stop the load."""
    for slot in deployment.slots:
        deployment.start(slot)
    deployment.wait_ready()
    load = Load(deployment.bases, hooks, random.Random(rng.random()))
    thread = threading.Thread(target=load.run, name="chaos load", daemon=True)
    thread.start()
    started = time.monotonic()
    try:
        for _ in range(KILLS):
            time.sleep(rng.uniform(1.0, 2.0))  # the pace of the chaos itself, not a wait
            busy = census(deployment.stack.url).running
            deployment.kill_and_restart(deployment.victim(rng, busy))
    finally:
        load.stopped.set()
        thread.join(timeout=30)
    print(f"{KILLS} kills in {time.monotonic() - started:.1f} s")
    return load


def _check(
    deployment: Deployment,
    load: Load,
    sink: WebhookSink,
    fakes: list[tuple[FakeA1111, str]],
    url: str,
    seed: int,
) -> None:
    why = f"(chaos seed {seed})"
    started = time.monotonic()
    deployment.wait_ready()
    drained = _drain(url, why)
    print(f"drained in {time.monotonic() - started:.1f} s")
    _report(deployment, load, sink, drained)
    crashes = deployment.crashes + deployment.exited()
    assert not crashes, f"{why} {crashes}"
    errors = deployment.errors_logged()
    assert not errors, f"{why} {errors}"
    assert drained.completed_messages == {}, f"a job ended twice {why}"
    assert load.acked, f"nothing was acknowledged {why}"
    with httpx.Client(base_url=deployment.bases[0], timeout=30) as api:
        first = {job.id: api.get(f"/sdapi/v1/jobs/{job.id}").json() for job in load.acked}
        print(
            f"acknowledged jobs by attempts {dict(Counter(j['attempts'] for j in first.values()))}"
        )
        for job in load.acked:
            assert first[job.id]["status"] in FINAL, f"{job} {first[job.id]} {why}"
            _check_webhooks(api, job, first[job.id], sink, why)
            _check_result(job, first[job.id], fakes, why)
        _check_cancels(load, first, fakes, why)
        again = {job.id: api.get(f"/sdapi/v1/jobs/{job.id}").json() for job in load.acked}
    assert again == first, f"a final state changed {why}"
    assert census(url) == drained, why  # and nothing moved meanwhile


def _drain(url: str, why: str) -> Census:
    """Wait until no job is queued or processing and no delivery pending or sending."""
    last: list[Census] = []
    try:
        return wait_for(
            lambda: ((c := census(url)).settled() and c) or last.append(c),
            timeout=90,
            interval=0.2,
            what="the drain",
        )
    except TimeoutError:
        pytest.fail(f"it never drained; the database holds {last[-1]} {why}")


def _check_webhooks(
    api: httpx.Client, job: Submitted, final: dict[str, Any], sink: WebhookSink, why: str
) -> None:
    """A job with a webhook: its one `job.completed` message was delivered, always under its
    id, and it tells the job's final state (and its result)."""
    if job.hook is None:
        return
    log = api.get(f"/sdapi/v1/jobs/{job.id}/webhooks").json()["deliveries"]
    [message] = [d for d in log if d["type"] == "job.completed"]
    assert message["status"] == "delivered", f"{job} {message} {why}"
    received = [r for r in sink.at(job.hook) if _body(r)["type"] == "job.completed"]
    assert {r.headers["webhook-id"] for r in received} == {message["id"]}, f"{job} {why}"
    assert any(r.answered == 200 for r in received), f"{job} never delivered {why}"
    done = min(r.at for r in received if r.answered == 200)
    late = [r for r in sink.at(job.hook) if r.at > done and _body(r)["type"] != "job.completed"]
    assert not late, f"{job}: {_body(late[0])['type']} came after job.completed {why}"
    for r in received:
        data = _body(r)["data"]
        assert data["status"] == final["status"], f"{job} {data} {final} {why}"
        assert data["result"] == final["result"], f"{job} {why}"


def _body(received: Received) -> dict[str, Any]:
    return dict(json.loads(received.body))


def _check_result(
    job: Submitted, final: dict[str, Any], fakes: list[tuple[FakeA1111, str]], why: str
) -> None:
    """A completed job shows the images of one generation its prompt really had."""
    if final["status"] != "completed":
        return
    info = json.loads(final["result"]["info"])
    [backend] = [fake for fake, url in fakes if url == final["backend"]]
    ran = {g["number"] for g in backend.completed if g["body"]["prompt"] == job.prompt}
    assert info["fake_generation"] in ran, f"{job} {info} {ran} {why}"
    assert info["infotexts"][0].endswith(f"fake: {backend.name}#{info['fake_generation']}")


def _check_cancels(
    load: Load, final: dict[str, dict[str, Any]], fakes: list[tuple[FakeA1111, str]], why: str
) -> None:
    """A cancel answered `canceled` at once caught the job queued: it ends canceled, and no
    A1111 got it after that answer."""
    for cancel in load.cancels:
        if cancel.answered != "canceled":
            continue
        job = final[cancel.id]
        assert job["status"] == "canceled", f"{cancel} {job} {why}"
        prompt = job["request"]["prompt"]
        late = [
            r
            for fake, _ in fakes
            for r in fake.generation_requests()
            if r.body["prompt"] == prompt and r.at > cancel.at
        ]
        assert not late, f"{cancel} ran after its cancel: {late} {why}"


def _report(deployment: Deployment, load: Load, sink: WebhookSink, drained: Census) -> None:
    kills = {slot.name: slot.kills for slot in deployment.slots}
    answered = Counter(r.answered for r in sink.received)
    print(f"kills {kills}; acknowledged {len(load.acked)}, unanswered {dict(load.unanswered)}")
    print(f"cancels {Counter(c.answered for c in load.cancels)}; jobs {drained.jobs}")
    print(f"deliveries {drained.deliveries}; receiver answered {dict(answered)}")
