"""Is the configured database usable? Asked once at start-up by `serve`, `worker`, `migrate` and
`up`, so that a wrong URL, a missing folder, a file that is not a database or a read-only one is
one paragraph on stderr (what, why, what to do), not a traceback nor a server that answers 500.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator

from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection

from a1111_proxy.db.engine import Database, sqlite_path

SETTING = "A1111_PROXY_DATABASE_URL"


class DatabaseProblem(Exception):
    """The database cannot be used; `str()` is the paragraph for the operator. `lasting`: it
    would fail the same way on every try (fix the configuration), rather than maybe pass later
    (a server that is down, a lock held too long)."""

    def __init__(self, url: str, reason: str, advice: str, *, lasting: bool) -> None:
        super().__init__(f"cannot use the database {SETTING}={redact(url)}: {reason}. {advice}")
        self.lasting = lasting


def redact(url: str) -> str:
    """The URL as an operator may read it in a log: the password replaced by ***."""
    try:
        parsed = make_url(url)
    except SQLAlchemyError:
        return "(not a database URL)"
    return url if parsed.password is None else parsed.render_as_string(hide_password=True)


async def check_database(url: str) -> None:
    """Connect, and write in a transaction that is rolled back (SQLite), or ask whether the
    session may write (PostgreSQL); raise DatabaseProblem saying why not. Needs no schema."""
    try:
        db = Database(url)
    except OSError as exc:  # the SQLite file's folder could not be made
        raise _folder_problem(url, exc) from None
    path = sqlite_path(url) if db.is_sqlite else None
    if path is not None and os.path.isdir(path):
        # Said before connecting: aiosqlite's thread, ending after a failed connect, may
        # outlive the event loop and print a traceback under the explanation.
        await db.dispose()
        raise _sqlite_problem(url, path, IsADirectoryError(str(path)))
    try:
        async with db.write_engine.connect() as conn:
            await (_probe_sqlite(conn) if db.is_sqlite else _probe_postgres(url, conn))
    except (OSError, SQLAlchemyError) as exc:
        raise explain(url, exc) from None
    finally:
        await db.dispose()


async def _probe_sqlite(conn: AsyncConnection) -> None:
    """BEGIN IMMEDIATE succeeds on a read-only file; rewriting the header's user_version does
    not, and rolled back it changes nothing."""
    async with conn.begin() as transaction:
        version = (await conn.exec_driver_sql("PRAGMA user_version")).scalar_one()
        await conn.exec_driver_sql(f"PRAGMA user_version = {int(version)}")
        await transaction.rollback()


async def _probe_postgres(url: str, conn: AsyncConnection) -> None:
    if (await conn.execute(text("SHOW transaction_read_only"))).scalar_one() == "on":
        raise DatabaseProblem(
            url,
            "the server lets this session only read (a standby, or "
            "default_transaction_read_only is on)",
            f"Point {SETTING} at the primary server, or turn default_transaction_read_only off "
            "for this database or user.",
            lasting=True,
        )


def explain(url: str, exc: BaseException) -> DatabaseProblem:
    """What a connection or probe error means for this URL, and what to do about it."""
    if isinstance(exc, DatabaseProblem):
        return exc
    path = sqlite_path(url) if make_url(url).get_backend_name() == "sqlite" else None
    if path is not None:
        return _sqlite_problem(url, path, exc)
    if (code := _sqlstate(exc)) is not None:
        return _postgres_problem(url, code, exc)
    return _unreachable_problem(url, exc)


def _folder_problem(url: str, exc: OSError) -> DatabaseProblem:
    path = sqlite_path(url)
    folder = path.parent if path is not None else "?"
    return DatabaseProblem(
        url,
        f"its folder {folder} does not exist and cannot be made ({_os_reason(exc)})",
        f"Create the folder (writable by {_user()}), or set {SETTING} to a file in a folder "
        "that exists.",
        lasting=True,
    )


def _sqlite_problem(url: str, path: os.PathLike[str], exc: BaseException) -> DatabaseProblem:
    error = _sqlite_error(exc)
    # The primary code: SQLITE_READONLY_DIRECTORY is a SQLITE_READONLY.
    name = "_".join(getattr(error, "sqlite_errorname", "").split("_")[:2])
    detail = str(error) if error is not None else _os_reason(exc)
    if os.path.isdir(path):
        return DatabaseProblem(
            url,
            f"{path} is a folder, not a file",
            f"Set {SETTING} to a file in it, such as {path}/a1111_proxy.db.",
            lasting=True,
        )
    if name == "SQLITE_NOTADB":
        return DatabaseProblem(
            url,
            f"{path} is not a SQLite database ({detail})",
            f"Set {SETTING} to a new file (it is created) or to an a1111-proxy database.",
            lasting=True,
        )
    if name in ("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM", "SQLITE_AUTH"):
        return DatabaseProblem(
            url,
            f"{path} cannot be opened for writing ({detail})",
            f"a1111-proxy writes to it all the time: make the file, and its folder (SQLite "
            f"creates {os.path.basename(path)}-wal and -shm beside it), writable by {_user()}, "
            "and do not open it with mode=ro.",
            lasting=True,
        )
    return DatabaseProblem(
        url,
        f"{path} cannot be used ({detail})",
        "Check the disk (free space, errors) and that no other program holds the file locked, "
        "then start again.",
        lasting=False,
    )


# PostgreSQL's SQLSTATEs that the same URL would meet again on every try, and what to do.
_LASTING_SQLSTATES = {
    "3D000": "Create the database (for example with createdb), or fix its name in {setting}.",
    "28P01": "Fix the user or password in {setting}.",
    "28000": "Fix the user in {setting}, or let it connect (pg_hba.conf).",
    "42501": "Grant this user the rights on the database, or use another user in {setting}.",
    "25006": "Point {setting} at the primary server.",
}


def _postgres_problem(url: str, code: str, exc: BaseException) -> DatabaseProblem:
    message = _innermost_message(exc)
    if code in _LASTING_SQLSTATES:
        advice = _LASTING_SQLSTATES[code].format(setting=SETTING)
        return DatabaseProblem(url, f"the server refused: {message}", advice, lasting=True)
    return DatabaseProblem(
        url,
        f"the server answered an error ({code}: {message})",
        "Check the PostgreSQL server's log, then start again.",
        lasting=False,
    )


def _unreachable_problem(url: str, exc: BaseException) -> DatabaseProblem:
    parsed = make_url(url)
    where = f"{parsed.host or 'localhost'}:{parsed.port or 5432}"
    return DatabaseProblem(
        url,
        f"the server at {where} cannot be reached ({_innermost_message(exc)})",
        f"Check that PostgreSQL runs there and that the host and port in {SETTING} are right.",
        lasting=False,
    )


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The error, its causes and contexts, and the driver errors SQLAlchemy wraps (`.orig`)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        orig = getattr(current, "orig", None)
        todo += [orig if isinstance(orig, BaseException) else None]
        todo += [current.__cause__, current.__context__]


def _sqlite_error(exc: BaseException) -> sqlite3.Error | None:
    return next((e for e in _chain(exc) if isinstance(e, sqlite3.Error)), None)


def _sqlstate(exc: BaseException) -> str | None:
    codes = (getattr(e, "sqlstate", None) for e in _chain(exc))
    return next((code for code in codes if isinstance(code, str)), None)


def _innermost_message(exc: BaseException) -> str:
    """The driver's own words: the last error in the chain that says something."""
    said = [str(e).splitlines()[0] for e in _chain(exc) if str(e).strip()]
    return said[-1] if said else type(exc).__name__


def _os_reason(exc: BaseException) -> str:
    error = next((e for e in _chain(exc) if isinstance(e, OSError)), None)
    if error is None:
        return _innermost_message(exc)
    where = f": {error.filename}" if error.filename else ""
    return f"{error.strerror or error}{where}"


def _user() -> str:
    return f"this user (uid {os.geteuid()})"
