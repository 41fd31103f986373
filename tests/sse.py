"""A small Server-Sent Events reader for tests (what a browser's EventSource does)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx

FINAL = ("completed", "error", "canceled")


@dataclass
class Event:
    event: str  # "ping" for a `: ping` comment
    id: str | None
    data: Any
    at: float  # time.monotonic() when it arrived


def parse(lines: Iterable[str]) -> Iterator[Event]:
    fields: dict[str, str] = {}
    for line in lines:
        if line.startswith(":"):
            yield Event("ping", None, line[1:].strip(), time.monotonic())
        elif line == "":
            if "event" in fields or "data" in fields:
                data = json.loads(fields["data"]) if "data" in fields else None
                yield Event(
                    fields.get("event", "message"), fields.get("id"), data, time.monotonic()
                )
            fields = {}
        else:
            name, _, value = line.partition(":")
            fields[name] = value[1:] if value.startswith(" ") else value


def follow(
    client: httpx.Client,
    job_id: str,
    *,
    last_event_id: str | None = None,
    stop: tuple[str, ...] = FINAL,
    timeout: float = 30,
) -> list[Event]:
    """Read a job's stream until an event named in `stop` (or the stream ends)."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    events = []
    with client.stream(
        "GET", f"/sdapi/v1/jobs/{job_id}/events", headers=headers, timeout=timeout
    ) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for event in parse(response.iter_lines()):
            events.append(event)
            if event.event in stop:
                break
    return events


def named(events: list[Event], *names: str) -> list[Event]:
    return [e for e in events if e.event in names]
