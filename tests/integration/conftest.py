"""Fixtures of the integration tier: the app's own database objects over the real database (a
SQLite file, then PostgreSQL, through `database_url`), the API in this process on loopback, and a
webhook receiver. A module that runs on SQLite only overrides `database_url` with `sqlite_url`."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest

from a1111_proxy.app import create_app
from a1111_proxy.db.engine import Database
from a1111_proxy.jobs import JobRepository
from tests.fakes.webhook_sink import WebhookSink
from tests.servers import ASYNC, serve


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    """The migrated, empty database, through the engine the API and the worker use."""
    made = Database(database_url)
    yield made
    await made.dispose()


@pytest.fixture
def repo_options() -> dict[str, Any]:
    """What `repo` is built with (max_attempts, lease_seconds, clock...): a module that needs
    other values overrides this fixture."""
    return {}


@pytest.fixture
def repo(db: Database, repo_options: dict[str, Any]) -> JobRepository:
    """The job store over `db`."""
    return JobRepository(db, **repo_options)


@pytest.fixture
def make_api(sqlite_url: str, settings_for: Any) -> Iterator[Callable[..., httpx.Client]]:
    """Start the API on a real uvicorn on loopback, over the SQLite file, with the settings a test
    asks for; a client that asks for async answers (202 and the job)."""
    with contextlib.ExitStack() as stack:

        def make(**values: Any) -> httpx.Client:
            settings = settings_for(database_url=sqlite_url, **values)
            url = stack.enter_context(serve(create_app(settings)))
            return stack.enter_context(httpx.Client(base_url=url, timeout=30, headers=ASYNC))

        yield make


@pytest.fixture
def sink() -> Iterator[tuple[WebhookSink, str]]:
    """A webhook receiver on loopback, and its base URL."""
    receiver = WebhookSink()
    with serve(receiver.app) as url:
        yield receiver, url
