"""Fixtures shared by the tiers: a clean environment, real databases (SQLite file, PostgreSQL),
the fake A1111. Each tier folder adds its own in its conftest.py."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import NoReturn

import pytest

from a1111_proxy.migrate import upgrade
from a1111_proxy.settings import Settings
from tests.fakes.a1111 import FakeA1111
from tests.servers import serve

PG_ADMIN = "postgresql://root@127.0.0.1:5432/test"
TESTS = Path(__file__).resolve().parent
# Library-internal warnings in the engine's stack (numpy 2 vs diffusers' schedulers, torchsde
# rounding, ...) are not ours to fix; every test marked `engine` ignores them.
ENGINE_WARNINGS = (
    "ignore::DeprecationWarning:diffusers.*",
    "ignore::FutureWarning:diffusers.*",
    "ignore::DeprecationWarning:transformers.*",
    "ignore::FutureWarning:transformers.*",
    "ignore:Should have ta>=t0:UserWarning",
    "ignore:__array_wrap__ must accept context:DeprecationWarning",
    "ignore::DeprecationWarning:peft.*",
    "ignore::FutureWarning:peft.*",
    "ignore::UserWarning:peft.*",
)


# The tiers (docs/development.md): each test module sits in one of these folders, and each
# folder's tests carry its markers, so `-m "not slow"` and `pytest tests/unit` select the same way.
TIERS: dict[str, tuple[str, ...]] = {
    "unit": (),  # no sockets, no database
    "integration": (),  # a real SQLite file or PostgreSQL, servers in this process on loopback
    "processes": ("slow",),  # starts `a1111-proxy serve`/`worker`/supervisord
    "engine": ("engine",),  # the bundled engine on tiny models
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    outside: set[str] = set()
    for item in items:
        if not item.path.is_relative_to(TESTS):
            continue
        tier = _tier(item.path.relative_to(TESTS))
        if tier is None:
            outside.add(str(item.path.relative_to(TESTS.parent)))
            continue
        for marker in TIERS[tier]:
            item.add_marker(marker)
        if item.get_closest_marker("engine"):
            for warning in ENGINE_WARNINGS:
                item.add_marker(pytest.mark.filterwarnings(warning))
    if outside:
        raise pytest.UsageError(
            f"test modules outside the tiers: {', '.join(sorted(outside))}. Move each into "
            "tests/unit, tests/integration, tests/processes or tests/engine (docs/development.md "
            "says which)."
        )


def _tier(path: Path) -> str | None:
    """The tier of a test module at `path` (relative to tests/); None outside the tier folders."""
    return path.parts[0] if len(path.parts) > 1 and path.parts[0] in TIERS else None


@pytest.fixture
def anyio_backend() -> str:
    """Async tests (`pytest.mark.anyio`) run on asyncio, as the server and worker do."""
    return "asyncio"


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("A1111_PROXY_"):
            monkeypatch.delenv(name)


def postgres_unavailable(reason: str, environ: Mapping[str, str] = os.environ) -> NoReturn:
    """The PostgreSQL at 127.0.0.1:5432 cannot be used: skip its tests, saying why, on a
    developer's machine; fail them under CI (`CI` set and not empty, as `.ci/run` sets it), where
    a broken role or authentication must not leave a green suite that ran none of them."""
    message = f"no usable PostgreSQL at 127.0.0.1:5432 ({reason})"
    if environ.get("CI"):
        pytest.fail(
            f"{message}. CI is set, so the PostgreSQL tests fail instead of being skipped: "
            "start PostgreSQL there (role root, trust authentication, database test), or unset "
            "CI to skip them",
            pytrace=False,
        )
    pytest.skip(message)


def _pg(statement: str) -> None:
    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(PG_ADMIN, timeout=3)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(run())


def create_pg_database(name: str) -> str | None:
    """Create database `name` on the PostgreSQL; None when done, else why it could not be."""
    try:
        _pg(f'CREATE DATABASE "{name}"')
    except Exception as exc:  # pragma: no cover - depends on the machine
        return f"{type(exc).__name__}: {exc}"
    return None


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL database for this test session, migrated; dropped afterwards."""
    name = f"a1111_proxy_test_{uuid.uuid4().hex[:10]}"
    if (failure := create_pg_database(name)) is not None:
        postgres_unavailable(failure)
    url = f"postgresql+asyncpg://root@127.0.0.1:5432/{name}"
    upgrade(url)
    yield url
    _pg(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _truncate_pg(url: str) -> None:
    """Empty every table, as a fresh SQLite file is (the catalogue and the control requests
    included: left over, they change what the next test's worker sends)."""
    import asyncpg

    from a1111_proxy.db.tables import metadata

    async def run() -> None:
        conn = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
        try:
            await conn.execute(f"TRUNCATE {', '.join(metadata.tables)} CASCADE")
        finally:
            await conn.close()

    asyncio.run(run())


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated, empty database: a SQLite file, then the real PostgreSQL."""
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path}/jobs.db"
        upgrade(url)
        return url
    url: str = request.getfixturevalue("postgres_url")
    _truncate_pg(url)
    return url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite+aiosqlite:///{tmp_path}/jobs.db"
    upgrade(url)
    return url


@pytest.fixture
def settings_for(tmp_path: Path):  # type: ignore[no-untyped-def]
    def make(**values: object) -> Settings:
        return Settings(_env_file=None, **values)  # type: ignore[call-arg]

    return make


@pytest.fixture
def fake_a1111() -> Iterator[tuple[FakeA1111, str]]:
    fake = FakeA1111(service_time=0.05)
    with serve(fake.app) as url:
        yield fake, url
