"""Fixtures of the processes tier: the fake A1111 a module's processes talk to, and a client as
A1111 clients are. A module starts its own `stack` (tests/stack.py) from `fake.url`. Each test's
reports are kept on it (`item.reports`), so that a fixture can tell at teardown whether the test
failed (the browser tests then save a screenshot)."""

from __future__ import annotations

import contextlib
from collections.abc import Generator, Iterator

import httpx
import pytest

from tests.fakes.a1111 import FakeA1111
from tests.servers import serve
from tests.stack import Stack


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeA1111]:
    """One fake A1111 on loopback for the whole module (its processes are slow to start); its
    base URL is `fake.url`."""
    with serving(FakeA1111(service_time=0.05)) as fake:
        yield fake


@contextlib.contextmanager
def serving(fake: FakeA1111) -> Iterator[FakeA1111]:
    """`fake` on loopback for the block; its base URL is `fake.url`."""
    with serve(fake.app) as url:
        fake.url = url  # type: ignore[attr-defined]
        yield fake


@pytest.fixture
def api(stack: Stack) -> Iterator[httpx.Client]:
    """A client as A1111 clients are: no Prefer header (stack.api asks for async)."""
    with httpx.Client(base_url=stack.base, timeout=30) as client:
        yield client


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    item.reports = {**getattr(item, "reports", {}), report.when: report}  # type: ignore[attr-defined]
    return report
