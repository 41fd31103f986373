"""The database engines: pooled PostgreSQL connections that the server dropped are not handed
out (SQLite has no server to drop them)."""

from __future__ import annotations

import asyncpg
import pytest
from sqlalchemy import text

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


async def test_a_connection_used_a_moment_ago_is_handed_out_without_a_ping_unless_it_was_closed(
    database_url: str,
) -> None:
    """What the ping costs (a round trip) is saved while connections are busy; one the server
    closed meanwhile is still never handed out (the driver knows, no round trip needed)."""
    if database_url.startswith("sqlite"):
        pytest.skip("SQLite: no server ends a connection")
    db = Database(database_url, ping_idle_seconds=3600)
    pings = []
    dialect = db.write_engine.dialect
    ping = dialect.do_ping
    dialect.do_ping = lambda connection: pings.append(connection) or ping(connection)  # type: ignore[method-assign]
    try:
        await drop_pooled_connection(db)
        async with db.writing() as conn:
            assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1
        async with db.writing() as conn:
            assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1
        assert pings == []
    finally:
        await db.dispose()
