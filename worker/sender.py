"""WebhookSender: sends what the outbox holds, apart from job execution.

It runs beside the Worker in the worker process and shares nothing with it but the database, so
a dead or slow receiver never delays a job, a cancel or the API. Each round claims due deliveries
in one short transaction, sends each one outside any transaction (at most `concurrency` at once,
`per_host` per receiver host, every attempt signed anew) and records each attempt in another
short transaction. Deliveries survive restarts: a sender that dies leaves leases that expire, and
the next sender sends those messages again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import httpx

from a1111_proxy.db.engine import unavailable, why_unavailable
from a1111_proxy.deliveries import Attempt, Delivery, Verdict
from a1111_proxy.egress import (
    TOTAL_TIMEOUT_SECONDS,
    Answer,
    Resolver,
    make_client,
    post,
    system_resolve,
)
from a1111_proxy.jobs import JobRecord, JobRepository, snapshot_record
from a1111_proxy.logs import job_id_var
from a1111_proxy.signatures import webhook_headers
from a1111_proxy.wakeup import Wakeup
from a1111_proxy.webhooks import (
    ImagesMode,
    RetryPolicy,
    attempt_error,
    judge,
    message_body,
    needs_images,
)
from worker.loop import first_of

log = logging.getLogger("a1111_proxy.webhooks")


@dataclass(frozen=True)
class SenderConfig:
    default_secret: str = field(default="", repr=False)  # WEBHOOK_SECRET; never logged
    allow_private: bool = False
    ca_bundle: str = ""  # WEBHOOK_CA_BUNDLE: CAs trusted besides the public ones (a PEM file)
    images: ImagesMode = "base64"
    public_url: str = "http://127.0.0.1:7861"
    concurrency: int = 16
    per_host: int = 4
    lease_seconds: float = 120.0  # longer than a claimed delivery waits for its host and sends
    idle_seconds: float = 0.25  # look for due deliveries at least this often while any wait
    # With none pending or being sent, only a queued message wakes the sender (its wake-up);
    # it still looks this often, in case a wake-up was missed.
    quiet_seconds: float = 5.0
    timeout_seconds: float = TOTAL_TIMEOUT_SECONDS  # one attempt, DNS to last byte read
    stop_grace_seconds: float = 5.0
    policy: RetryPolicy = field(default_factory=RetryPolicy)


class HostLimiter:
    """At most `limit` requests in flight to one host."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._slots: dict[str, tuple[asyncio.Semaphore, int]] = {}

    @contextlib.asynccontextmanager
    async def slot(self, host: str) -> AsyncIterator[None]:
        semaphore, users = self._slots.get(host, (asyncio.Semaphore(self.limit), 0))
        self._slots[host] = (semaphore, users + 1)
        try:
            async with semaphore:
                yield
        finally:
            semaphore, users = self._slots[host]
            if users == 1:
                del self._slots[host]
            else:
                self._slots[host] = (semaphore, users - 1)


class WebhookSender:
    def __init__(
        self,
        jobs: JobRepository,
        wakeup: Wakeup,
        config: SenderConfig | None = None,
        *,
        client: httpx.AsyncClient | None = None,
        resolve: Resolver = system_resolve,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.jobs = jobs
        self.deliveries = jobs.deliveries
        self.wakeup = wakeup
        self.config = config or SenderConfig()
        self.client = client or make_client(self.config.ca_bundle)
        self.resolve = resolve
        self.clock = clock  # for the signed timestamp
        self._hosts = HostLimiter(self.config.per_host)
        self._inflight: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()
        self._freed = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Send due deliveries until stop(); then let those in flight finish, briefly."""
        await self.wakeup.start()
        try:
            while not self._stop.is_set():
                if await self._step():
                    continue
                self._freed.clear()
                idle = await self._idle_seconds()
                await first_of(
                    self._stop.wait(), self._freed.wait(), self.wakeup.wait(idle), timeout=idle
                )
        finally:
            await self._drain()
            await self.aclose()

    async def run_until_idle(self) -> None:
        """Send every delivery that is due now, until none is (tests, batch use)."""
        while True:
            await self._start_due()
            if self._inflight:
                await asyncio.wait(set(self._inflight), return_when=asyncio.FIRST_COMPLETED)
            elif not await self.deliveries.has_due():
                return

    async def aclose(self) -> None:
        await self.wakeup.close()
        await self.client.aclose()

    async def _step(self) -> bool:
        try:
            return await self._start_due()
        except Exception as exc:
            _log_failure("claiming deliveries failed; trying again", exc)
            await asyncio.sleep(self.config.idle_seconds)
            return False

    async def _idle_seconds(self) -> float:
        """How long to sleep when nothing is due: a message waiting for its retry, or for an
        abandoned lease to expire, becomes due by time alone, so look again soon; with none
        outstanding, a new one comes with a wake-up."""
        if self._inflight:
            return self.config.idle_seconds
        try:
            outstanding = await self.deliveries.outstanding()
        except Exception as exc:
            _log_failure("looking for outstanding deliveries failed", exc)
            return self.config.idle_seconds
        return self.config.idle_seconds if outstanding else self.config.quiet_seconds

    async def _start_due(self) -> bool:
        """Claim as many due deliveries as there is room for and start sending them."""
        room = self.config.concurrency - len(self._inflight)
        if room <= 0 or not await self.deliveries.has_due():
            return False
        claimed = await self.deliveries.claim(room, self.config.lease_seconds)
        for delivery in claimed:
            task = asyncio.create_task(self._deliver(delivery), name=f"webhook {delivery.id}")
            self._inflight.add(task)
            task.add_done_callback(self._done)
        return bool(claimed)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._freed.set()

    async def _deliver(self, delivery: Delivery) -> None:
        job = _snapshot(delivery)
        job_id_var.set(job.id if job else None)  # this task's lines name the job
        try:
            async with self._hosts.slot(_host_key(delivery.url)):
                answer = await self._attempt(delivery, job)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await self.deliveries.release(delivery)
            raise
        try:
            verdict = judge(delivery, answer, self.config.policy, self.deliveries.clock())
            kept = await self.deliveries.record(delivery, _logged(answer), verdict)
            _log_attempt(delivery, job, answer, verdict, kept)
        except Exception as exc:  # its lease runs out and the attempt is made again
            _log_failure(f"recording the attempt of webhook {delivery.id} failed", exc)

    async def _attempt(self, delivery: Delivery, job: JobRecord | None) -> Answer:
        try:
            if job is None:
                raise ValueError("the stored job snapshot cannot be read")
            body = await self._body(delivery, job)
            secret = await self.jobs.webhook_secret(delivery.job_seq) or self.config.default_secret
            headers = webhook_headers(delivery.id, body, secret, int(self.clock()))
        except Exception as exc:  # a bad stored secret or a bug: logged, retried by policy
            log.exception("webhook %s: could not build the message", delivery.id)
            return Answer(time.time(), 0, error=f"internal error: {type(exc).__name__}")
        try:
            return await post(
                self.client,
                delivery.url,
                body,
                headers,
                allow_private=self.config.allow_private,
                resolve=self.resolve,
                timeout=self.config.timeout_seconds,
            )
        except Exception as exc:  # a URL the HTTP client cannot use: an attempt that failed
            log.warning("webhook %s: cannot send to %s: %s", delivery.id, delivery.url, exc)
            return Answer(time.time(), 0, error=f"cannot send to this URL: {exc}")

    async def _body(self, delivery: Delivery, job: JobRecord) -> bytes:
        images = None
        if needs_images(delivery, job, self.config.images):
            images = await self.jobs.images(delivery.job_seq)
        return message_body(
            delivery, job, images, mode=self.config.images, public_url=self.config.public_url
        )

    async def _drain(self) -> None:
        if not self._inflight:
            return
        _, pending = await asyncio.wait(set(self._inflight), timeout=self.config.stop_grace_seconds)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


def _logged(answer: Answer) -> Attempt:
    return Attempt(
        started_at=answer.started_at,
        duration_ms=answer.duration_ms,
        status_code=answer.status_code,
        response_body=answer.body,
        error=attempt_error(answer),
        address=answer.address,
    )


def _log_attempt(
    delivery: Delivery, job: JobRecord | None, answer: Answer, verdict: Verdict, kept: bool
) -> None:
    job_id = job.id if job else None
    outcome = answer.status_code if answer.status_code is not None else attempt_error(answer)
    then = verdict.status
    if verdict.next_attempt_at is not None:
        then += f", next attempt in {verdict.next_attempt_at - time.time():.0f} s"
    if not kept:
        then += " (lease lost: another sender took it over)"
    level = logging.INFO if verdict.status == "delivered" else logging.WARNING
    log.log(
        level,
        "webhook %s (job.%s of job %s, attempt %d): %s; %s",
        delivery.id,
        delivery.event,
        job_id,
        delivery.attempt,
        outcome,
        then,
    )


def _snapshot(delivery: Delivery) -> JobRecord | None:
    """The job as the delivery's message shows it; None when its stored snapshot is unreadable
    (the attempt then fails, and is logged and retried like any other)."""
    try:
        return snapshot_record(delivery.data)
    except (ValueError, KeyError, TypeError):
        return None


def _host_key(url: str) -> str:
    """The per-host concurrency key; the URL itself when the HTTP client cannot parse it."""
    try:
        return httpx.URL(url).netloc.decode("ascii")
    except Exception:
        return url


def _log_failure(what: str, exc: Exception) -> None:
    """One line while the database is away (it says why); a traceback for anything else."""
    if unavailable(exc):
        log.warning("webhook sender: %s (database unavailable: %s)", what, why_unavailable(exc))
    else:
        log.exception("webhook sender: %s", what)
