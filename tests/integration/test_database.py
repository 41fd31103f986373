"""The database engines: pooled PostgreSQL connections that the server dropped are not handed
out (SQLite has no server to drop them)."""

from __future__ import annotations

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from a1111_proxy.db.engine import Database, unavailable
from tests.conftest import PG_ADMIN
from tests.servers import free_port

pytestmark = pytest.mark.anyio


async def drop_pooled_connection(db: Database) -> None:
    """Use one pooled connection, then have the server end it while it sits in the pool."""
    async with db.reading() as conn:
        pid = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
    await terminate(pid)


async def terminate(pid: int) -> None:
    """Have the server end the connection of backend `pid`, as a restart does."""
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


async def test_a_database_that_cannot_be_reached_is_unavailable_and_a_refused_statement_is_not(
    database_url: str,
) -> None:
    """What the API answers 503 for, and what a worker waits out, against what is a bug of
    ours (a 500, a job failed): told apart from the errors the drivers really raise."""
    db = Database(database_url)
    try:
        with pytest.raises(Exception) as refused_statement:
            async with db.writing() as conn:
                await conn.execute(text("SELECT * FROM no_such_table"))
        assert not unavailable(refused_statement.value)
    finally:
        await db.dispose()
    if database_url.startswith("sqlite"):
        return
    nobody = make_url(database_url).set(port=free_port()).render_as_string(hide_password=False)
    db = Database(nobody)
    try:
        with pytest.raises(Exception) as refused_connection:
            async with db.reading() as conn:
                await conn.execute(text("SELECT 1"))
        assert unavailable(refused_connection.value), repr(refused_connection.value)
    finally:
        await db.dispose()
    db = Database(database_url, ping_idle_seconds=3600)
    try:
        async with db.reading() as conn:
            await terminate((await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one())
            with pytest.raises(Exception) as dropped:
                await conn.execute(text("SELECT 1"))
        assert unavailable(dropped.value), repr(dropped.value)
    finally:
        await db.dispose()
