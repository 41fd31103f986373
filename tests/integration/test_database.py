"""The database engines: pooled PostgreSQL connections that the server dropped are not handed
out (SQLite has no server to drop them)."""

from __future__ import annotations

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from a1111_proxy.db.engine import Database
from tests.conftest import PG_ADMIN

pytestmark = pytest.mark.anyio


async def drop_pooled_connection(db: Database) -> None:
    """Use one pooled connection, then have the server end it while it sits in the pool."""
    async with db.reading() as conn:
        pid = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
    admin = await asyncpg.connect(PG_ADMIN)
    try:
        await admin.execute("SELECT pg_terminate_backend($1, 10000)", pid)
    finally:
        await admin.close()


async def test_a_pooled_connection_the_server_ended_while_it_sat_idle_is_replaced(
    database_url: str,
) -> None:
    if database_url.startswith("sqlite"):
        pytest.skip("SQLite: no server ends a connection")
    db = Database(database_url, ping_idle_seconds=0)  # every connection counts as idle
    try:
        await drop_pooled_connection(db)
        async with db.writing() as conn:
            assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1
    finally:
        await db.dispose()


async def test_a_connection_used_a_moment_ago_is_handed_out_without_a_ping(
    database_url: str,
) -> None:
    """What the ping costs is saved while connections are busy: a dropped one then fails its
    next statement (the pool starts afresh after it)."""
    if database_url.startswith("sqlite"):
        pytest.skip("SQLite: no server ends a connection")
    db = Database(database_url, ping_idle_seconds=3600)
    try:
        await drop_pooled_connection(db)
        with pytest.raises(DBAPIError) as raised:
            async with db.writing() as conn:
                await conn.execute(text("SELECT 1"))
        assert raised.value.connection_invalidated
        async with db.writing() as conn:
            assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1
    finally:
        await db.dispose()
