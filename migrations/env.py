"""Alembic environment: async engines for SQLite (aiosqlite) and PostgreSQL (asyncpg)."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from a1111_proxy.db.tables import metadata

config = context.config


def _url() -> str:
    url = config.attributes.get("database_url") or config.get_main_option("sqlalchemy.url")
    if not url:
        from a1111_proxy.settings import Settings

        url = Settings().database_url
    return url


def _run(connection: Connection) -> None:
    if connection.dialect.name == "sqlite":
        # Only takes effect before the first table is made (a new file): deleted jobs' pages
        # can then be given back with `PRAGMA incremental_vacuum`. Older files: see acb3018844d1.
        connection.exec_driver_sql("PRAGMA auto_vacuum=INCREMENTAL")
        # Batch migrations rebuild a table (copy, DROP, rename): with foreign keys on, the DROP
        # would cascade to every job's images, payload and deliveries. Off is SQLite's default;
        # said here so that no change of engine turns it on (tests/integration/test_migrations.py).
        connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
        connection.commit()  # leave no transaction open: alembic would not commit its own
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_async() -> None:
    engine = create_async_engine(_url())
    async with engine.connect() as connection:
        await connection.run_sync(_run)
    await engine.dispose()


if context.is_offline_mode():
    context.configure(url=_url(), target_metadata=metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(_run_async())
