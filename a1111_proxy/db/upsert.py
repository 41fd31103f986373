"""INSERT ... ON CONFLICT on either database, for rows that several processes (workers, API
processes) may write at once. On PostgreSQL an UPDATE that found no row followed by an INSERT
fails with a unique violation when another transaction inserted the row meanwhile; these wait for
that transaction and then update the row (or leave it)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Table
from sqlalchemy.dialects import postgresql, sqlite

from a1111_proxy.db.engine import Database


def upsert(db: Database, table: Table, values: dict[str, Any]) -> Any:
    """Insert the row, or set its other columns to `values` when its primary key exists."""
    key = [column.name for column in table.primary_key]
    statement = _insert(db, table, values)
    return statement.on_conflict_do_update(
        index_elements=key, set_={k: v for k, v in values.items() if k not in key}
    )


def insert_missing(db: Database, table: Table, values: dict[str, Any]) -> Any:
    """Insert the row unless its primary key exists (then leave that row as it is)."""
    return _insert(db, table, values).on_conflict_do_nothing()


def _insert(db: Database, table: Table, values: dict[str, Any]) -> Any:
    dialect = sqlite if db.is_sqlite else postgresql
    return dialect.insert(table).values(**values)
