"""Query plans of the statements the job store sends, as the database would run them: SQLite's
EXPLAIN QUERY PLAN; on PostgreSQL the generic plan, which a prepared statement (asyncpg keeps
them) settles on after five runs, when the values it was planned for no longer show."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncConnection

from a1111_proxy.db.engine import Database


@contextlib.contextmanager
def sent(db: Database, picks: Callable[[str], bool]) -> Iterator[list[tuple[str, Any]]]:
    """The statements (with their parameters) sent on `db`'s write engine that `picks` picks:
    through SQLAlchemy, and on SQLite also those the store runs with sqlite3 itself on the
    connection's thread (the submit path), as sqlite3 traces them (their values written in)."""
    found: list[tuple[str, Any]] = []

    def listen(_conn: Any, _cursor: Any, statement: str, params: Any, *_: Any) -> None:
        if picks(statement):
            found.append((statement, params))

    def trace(statement: str) -> None:
        if picks(statement):
            found.append((statement, ()))

    def on_checkout(dbapi_connection: Any, *_: Any) -> None:
        dbapi_connection.driver_connection._conn.set_trace_callback(trace)

    def on_checkin(dbapi_connection: Any, *_: Any) -> None:
        dbapi_connection.driver_connection._conn.set_trace_callback(None)

    engine = db.write_engine.sync_engine
    event.listen(engine, "before_cursor_execute", listen)
    if db.is_sqlite:
        event.listen(engine, "checkout", on_checkout)
        event.listen(engine, "checkin", on_checkin)
    try:
        yield found
    finally:
        event.remove(engine, "before_cursor_execute", listen)
        if db.is_sqlite:
            event.remove(engine, "checkout", on_checkout)
            event.remove(engine, "checkin", on_checkin)


async def plan(db: Database, statement: str, params: Any) -> str:
    """The plan of `statement` (nothing of it is kept: it runs in a transaction rolled back)."""
    async with db.write_engine.connect() as conn:
        transaction = await conn.begin()
        try:
            if db.is_sqlite:
                rows = await conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", params)
                return "\n".join(str(row[-1]) for row in rows.all())
            await conn.exec_driver_sql(f"PREPARE plan_of AS {statement}")
            try:
                await conn.exec_driver_sql("SET LOCAL plan_cache_mode = force_generic_plan")
                values = ", ".join(_sql_literal(value) for value in params)
                rows = await conn.exec_driver_sql(f"EXPLAIN (COSTS OFF) EXECUTE plan_of({values})")
                return "\n".join(str(row[0]) for row in rows.all())
            finally:
                await conn.exec_driver_sql("DEALLOCATE plan_of")
        finally:
            await transaction.rollback()


def _sql_literal(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    if isinstance(value, list) and all(item is None for item in value):
        return "'{" + ",".join("NULL" for _ in value) + "}'"  # of the parameter's array type
    if isinstance(value, list):
        return "ARRAY[" + ", ".join(_sql_literal(item) for item in value) + "]"
    return repr(value)


async def count_round_trips(conn: AsyncConnection) -> list[Any]:
    """Every call that the SQLite driver connection under `conn` sends to its thread, from now
    on (also after `conn` is given back: the pool keeps the driver connection)."""
    driver = (await conn.get_raw_connection()).driver_connection
    sent: list[Any] = []
    forward = driver._execute

    async def counted(fn: Any, *args: Any, **kwargs: Any) -> Any:
        sent.append(fn)
        return await forward(fn, *args, **kwargs)

    driver._execute = counted
    return sent
