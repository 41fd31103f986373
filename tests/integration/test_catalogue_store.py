"""CatalogueStore's writes when several processes make them at once, on PostgreSQL (SQLite has one
writer at a time). Another transaction holds the row first, uncommitted, so the store's write
meets it half-way, as a second worker or API process would."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable

import pytest
from sqlalchemy import insert, text

from a1111_proxy.catalogue import CHECKPOINT_REQUEST, PENDING_OPTIONS, CatalogueStore
from a1111_proxy.db.engine import Database
from a1111_proxy.db.tables import catalogue, controls
from tests.conftest import _truncate_pg

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]


@pytest.fixture
def empty_pg(postgres_url: str) -> str:
    _truncate_pg(postgres_url)
    return postgres_url


@pytest.fixture
async def pg(empty_pg: str) -> AsyncIterator[tuple[Database, Database]]:
    """Two engines on the same empty PostgreSQL database: two processes."""
    one, two = Database(empty_pg), Database(empty_pg)
    yield one, two
    await one.dispose()
    await two.dispose()


async def _meets_a_held_row(db: Database, write: Awaitable[object]) -> asyncio.Task[object]:
    """Start `write` and return once it waits for a lock another transaction holds."""
    task = asyncio.ensure_future(write)
    waiting = text(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    async with asyncio.timeout(20):
        while True:
            async with db.reading() as conn:
                if (await conn.execute(waiting)).scalar():
                    return task
            assert not task.done(), task.result()
            await asyncio.sleep(0.01)


async def test_a_catalogue_entry_two_workers_write_at_once_is_written_not_a_unique_violation(
    pg: tuple[Database, Database],
) -> None:
    first, second = pg
    async with first.writing() as conn:
        row = {"name": "sd-models", "body": "[]", "backend": "a", "fetched_at": 1.0}
        await conn.execute(insert(catalogue).values(**row))
        write = await _meets_a_held_row(first, CatalogueStore(second).put("sd-models", ["b"], "b"))
    await write
    assert await CatalogueStore(first).get("sd-models") == ["b"]


async def test_options_two_api_processes_post_at_once_are_merged_none_lost(
    pg: tuple[Database, Database],
) -> None:
    first, second = pg
    async with first.writing() as conn:
        held = {"version": 1, "options": {"a": 1}}
        await conn.execute(
            insert(controls).values(key=PENDING_OPTIONS, value=json.dumps(held), updated_at=1.0)
        )
        merge = CatalogueStore(second).merge_pending_options({"b": 2})
        write = await _meets_a_held_row(first, merge)
    assert await write == 2
    merged = await CatalogueStore(first).get_control(PENDING_OPTIONS)
    assert merged == {"version": 2, "options": {"a": 1, "b": 2}}


async def test_checkpoint_requests_made_at_once_get_versions_one_after_the_other(
    pg: tuple[Database, Database],
) -> None:
    first, second = pg
    async with first.writing() as conn:
        held = {"version": 1, "loaded": False, "at": 1.0}
        await conn.execute(
            insert(controls).values(key=CHECKPOINT_REQUEST, value=json.dumps(held), updated_at=1.0)
        )
        write = await _meets_a_held_row(first, CatalogueStore(second).request_checkpoint(True))
    assert await write == 2
    request = await CatalogueStore(first).get_control(CHECKPOINT_REQUEST)
    assert (request["version"], request["loaded"]) == (2, True)
