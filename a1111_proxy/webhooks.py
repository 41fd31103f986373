"""Webhook messages and their delivery policy.

Body: `{"type": "job.<event>", "timestamp": <when it happened>, "data": <the job as the API shows
it>}`, built from the snapshot the outbox took when the event happened, so every attempt of a
message sends the same bytes. For `job.completed` the result's images are included as base64
(`WEBHOOK_IMAGES=base64`), left out with absolute `image_urls` to fetch them (`url`), or left out
(`none`).

Policy: any 2xx is delivered. `job.completed` is retried after network errors, timeouts and any
other answer (3xx included: redirects are not followed) on a schedule of about a day (0, 5 s,
5 min, 30 min, 2 h, 5 h, 10 h, 10 h, each ±20 %), waiting at least as long as a `Retry-After`
asks; 410 Gone stops it. `job.started` and `job.progress` are tried once, and a manual redelivery
is one attempt.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from a1111_proxy.deliveries import Delivery, Verdict
from a1111_proxy.egress import Answer
from a1111_proxy.jobs import JobRecord
from a1111_proxy.schemas import iso, render_job

ImagesMode = Literal["base64", "url", "none"]

SCHEDULE_SECONDS = (0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)
MAX_RETRY_AFTER_SECONDS = 86400.0


def message_body(
    delivery: Delivery,
    job: JobRecord,
    images: list[bytes] | None,
    *,
    mode: ImagesMode,
    public_url: str,
) -> bytes:
    """The exact bytes to POST. `job`: the delivery's snapshot (`snapshot_record`); `images`:
    the job's images (base64 mode, completed jobs)."""
    data = render_job(job, images if mode == "base64" else None)
    if mode == "url":
        data["image_urls"] = [public_url.rstrip("/") + path for path in data["image_urls"]]
    envelope = {
        "type": f"job.{delivery.event}",
        "timestamp": iso(delivery.occurred_at),
        "data": data,
    }
    return json.dumps(envelope, separators=(",", ":")).encode()


def needs_images(delivery: Delivery, job: JobRecord, mode: ImagesMode) -> bool:
    if mode != "base64" or delivery.event != "completed":
        return False
    return bool(job.image_count)  # completed, or canceled with what A1111 had made


@dataclass(frozen=True)
class RetryPolicy:
    schedule: tuple[float, ...] = SCHEDULE_SECONDS
    jitter: float = 0.2
    rng: Callable[[], float] = random.random

    def delay_after(self, attempts: int, retry_after: float | None = None) -> float | None:
        """Seconds to wait after `attempts` failed attempts; None once the schedule is used up."""
        if attempts >= len(self.schedule):
            return None
        delay = self.schedule[attempts] * (1 - self.jitter + 2 * self.jitter * self.rng())
        if retry_after is not None:
            delay = max(delay, min(retry_after, MAX_RETRY_AFTER_SECONDS))
        return delay


def judge(delivery: Delivery, answer: Answer, policy: RetryPolicy, now: float) -> Verdict:
    """What happens to a delivery after this attempt."""
    if answer.status_code is not None and 200 <= answer.status_code < 300:
        return Verdict("delivered")
    if not retried(delivery, answer):
        return Verdict("failed")
    delay = policy.delay_after(delivery.attempt, answer.retry_after)
    return Verdict("failed") if delay is None else Verdict("pending", now + delay)


def retried(delivery: Delivery, answer: Answer) -> bool:
    return (
        delivery.event == "completed"
        and delivery.trigger == "scheduled"
        and answer.status_code != 410
        and not answer.blocked
    )


def attempt_error(answer: Answer) -> str | None:
    """The log's reading of an answer that was not a success."""
    if answer.error is not None or answer.status_code is None:
        return answer.error
    if 300 <= answer.status_code < 400:
        return (
            f"{answer.status_code}: redirects are not followed; point webhook_url at the final URL"
        )
    if answer.status_code == 410:
        return "410 Gone: the receiver asked not to be sent this again; no more retries"
    if not 200 <= answer.status_code < 300:
        return f"{answer.status_code}: not a 2xx answer"
    return None
