"""`a1111-proxy serve | worker | migrate | up | openapi`: the only place settings are read."""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import ValidationError

from a1111_proxy import logs
from a1111_proxy.db.check import DatabaseProblem, check_database
from a1111_proxy.redaction import backend_name
from a1111_proxy.settings import Settings
from a1111_proxy.supervise import CONFIG_ERROR, Child, Supervisor

log = logging.getLogger("a1111_proxy")
PARAMETER_LOGGERS = logs.PARAMETER_LOGGERS


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="a1111-proxy", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the API server")
    serve.add_argument("--host", help="overrides A1111_PROXY_HOST")
    serve.add_argument("--port", type=int, help="overrides A1111_PROXY_PORT")
    commands.add_parser("worker", help="run the worker (claims and runs jobs)")
    commands.add_parser("migrate", help="bring the database schema up to date")
    up = commands.add_parser("up", help="migrate, then run the API server and a worker")
    up.add_argument("--host", help="overrides A1111_PROXY_HOST")
    up.add_argument("--port", type=int, help="overrides A1111_PROXY_PORT")
    commands.add_parser("openapi", help="print the OpenAPI document")
    args = parser.parse_args(argv)

    try:
        settings = Settings(**_overrides(args))
    except ValidationError as exc:
        print(f"a1111-proxy: invalid settings:\n{exc}", file=sys.stderr)
        return CONFIG_ERROR
    _configure_logging(settings)
    handler = {
        "serve": serve_api,
        "worker": run_worker,
        "migrate": migrate,
        "up": up_all,
        "openapi": print_openapi,
    }[args.command]
    try:
        return handler(settings)
    except DatabaseProblem as problem:
        print(f"a1111-proxy: {problem}", file=sys.stderr)
        return CONFIG_ERROR if problem.lasting else 1


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k in ("host", "port") if (v := getattr(args, k, None)) is not None}


def _configure_logging(settings: Settings) -> None:
    logs.configure(settings.log_level, settings.log_format)


def require_database(settings: Settings) -> None:
    """Raise DatabaseProblem unless the database can be reached and written."""
    asyncio.run(check_database(settings.database_url))


def skip_missing_sniffio() -> None:
    """httpcore tries `import sniffio` for every lock it makes (several per HTTP request) and,
    where that optional package is not installed, Python searches the whole sys.path each
    time: about 50 us a try, a few percent of a worker's CPU with many backends. A None in
    sys.modules makes the failed import immediate (the import system's own negative entry)."""
    if "sniffio" not in sys.modules and importlib.util.find_spec("sniffio") is None:
        sys.modules["sniffio"] = None  # type: ignore[assignment]


def tune_gc() -> None:
    """Long-lived imports and app objects out of the collector's way: without this, full
    collections that free nothing stall every request for ~50 ms every second or so."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)


def serve_api(settings: Settings) -> int:
    import uvicorn

    from a1111_proxy.app import create_app

    if problem := settings.auth_problem():
        print(f"a1111-proxy: refusing to start: {problem}", file=sys.stderr)
        return CONFIG_ERROR
    require_database(settings)
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level.lower(),
        "proxy_headers": True,
        "timeout_graceful_shutdown": 10,
        "log_config": None,  # uvicorn's lines go through our handler (JSON or text)
    }
    processes = settings.api_processes()
    if processes > 1:
        # uvicorn binds the port once, starts the processes (each builds its app with
        # `app_in_process`), and restarts one that dies. Wait mode, event streams and limits
        # work across them: each process learns of changes from the database.
        # The processes read the environment: give them what the command line overrode.
        os.environ.update(A1111_PROXY_HOST=settings.host, A1111_PROXY_PORT=str(settings.port))
        uvicorn.run("a1111_proxy.cli:app_in_process", factory=True, workers=processes, **options)
        return 0
    app = create_app(settings)
    skip_missing_sniffio()
    tune_gc()
    uvicorn.run(app, **options)
    return 0


def app_in_process() -> Any:
    """The app of one of SERVE_PROCESSES API processes (uvicorn's factory): its settings come
    from the same environment as the parent's, read when the process starts."""
    from a1111_proxy.app import create_app

    settings = Settings()
    _configure_logging(settings)
    skip_missing_sniffio()
    tune_gc()
    return create_app(settings)


def run_worker(settings: Settings) -> int:
    from worker.main import run

    require_database(settings)
    skip_missing_sniffio()
    tune_gc()
    with asyncio.Runner(loop_factory=fast_event_loop()) as runner:
        return runner.run(run(settings))


def fast_event_loop() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop where it is installed (uvicorn[standard] brings it, and the API's
    uvicorn runs on it the same way), else asyncio's own. The worker's work is many small
    socket round trips (A1111, the database), where uvloop's loop costs less CPU."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def migrate(settings: Settings) -> int:
    from a1111_proxy.migrate import upgrade

    require_database(settings)
    upgrade(settings.database_url)
    log.info("database schema is up to date")
    return 0


def print_openapi(settings: Settings) -> int:
    from a1111_proxy.openapi import build_spec

    print(json.dumps(build_spec(), indent=2))
    return 0


def up_all(settings: Settings) -> int:
    """Migrate, then run `serve` and `worker` as two supervised processes (restarted when they
    die); SIGINT or SIGTERM stops both, then `up` exits 0."""
    if problem := settings.auth_problem():
        print(f"a1111-proxy: refusing to start: {problem}", file=sys.stderr)
        return CONFIG_ERROR
    migrate(settings)
    env = {**os.environ, "A1111_PROXY_HOST": settings.host, "A1111_PROXY_PORT": str(settings.port)}
    me = [sys.executable, "-m", "a1111_proxy"]
    children = [Child(command, [*me, command], env) for command in ("serve", "worker")]
    print(
        f"a1111-proxy: API on http://{settings.host}:{settings.port} (docs at /doc), worker "
        f"on {', '.join(map(backend_name, settings.a1111_urls))}; Ctrl-C stops both",
        file=sys.stderr,
    )
    # Long enough for the worker to finish its jobs (then release them) and the API its requests.
    return Supervisor(children, stop_timeout=settings.shutdown_grace_seconds + 15).run()
