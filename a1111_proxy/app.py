"""The API application: routes, middleware, error handlers and a lifespan that owns resources."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware

from a1111_proxy.availability import BackendWatch
from a1111_proxy.catalogue import CatalogueStore
from a1111_proxy.cpu_pool import CpuPool
from a1111_proxy.db.engine import Database
from a1111_proxy.downloads import DownloadStore
from a1111_proxy.errors import EXCEPTION_HANDLERS
from a1111_proxy.jobs import JobRepository, TenantLimits
from a1111_proxy.jobs.intake import BatchKey
from a1111_proxy.middleware import BodyLimit, TokenAuth
from a1111_proxy.migrate import head_revision
from a1111_proxy.model_info import ModelInfoStore
from a1111_proxy.routes import ROUTES
from a1111_proxy.routes.context import State
from a1111_proxy.settings import Settings
from a1111_proxy.thumbnails import ThumbnailCache
from a1111_proxy.waiter import JobWaiter
from a1111_proxy.wakeup import NOTIFY_CHANNEL, PROGRESS_CHANNEL, make_wakeup


def batch_keys(settings: Settings) -> BatchKey | None:
    """The engine's batch key for each new job, when its worker batches (ENGINE_MAX_BATCH)."""
    if settings.backend != "diffusers" or settings.engine_max_batch < 2:
        return None
    from a1111_proxy.engine.compat import batch_key  # plain Python: no torch in the API

    return batch_key


def make_lifespan(
    settings: Settings,
) -> Callable[[Starlette], AbstractAsyncContextManager[State]]:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[State]:
        # The engine is made here so that it binds to the server's event loop.
        db = Database.for_settings(settings)
        db.start_checkpoints()
        catalogue = CatalogueStore(db)
        repo = JobRepository(
            db,
            max_attempts=settings.max_attempts,
            lease_seconds=settings.lease_seconds,
            catalogue=catalogue,
            limits=TenantLimits(settings.tenant_max_queued, settings.tenant_submits_per_minute),
            batch_key=batch_keys(settings),
        )
        # One wakeup source per process, shared by wait mode and every event stream.
        wakeup = make_wakeup(
            settings.database_url,
            settings.poll_seconds,
            channels=(NOTIFY_CHANNEL, PROGRESS_CHANNEL),
        )
        backends = BackendWatch(
            repo, grace=settings.backend_down_grace, stale_after=settings.worker_stale_seconds
        )
        waiter = JobWaiter(repo, wakeup, backends)
        cpu = CpuPool()  # decoding and checking what requests carry (images, PNG text)
        try:
            yield {
                "settings": settings,
                "repo": repo,
                "catalogue": catalogue,
                "model_info": ModelInfoStore(db),
                "downloads": DownloadStore(db),
                "waiter": waiter,
                "backends": backends,
                "schema_head": head_revision(),
                "cpu": cpu,
                "thumbnails": ThumbnailCache(settings.thumbnail_cache_bytes),
            }
        finally:
            cpu.close()
            await waiter.close()
            await db.dispose()

    return lifespan


# Headers a browser script may read from our answers, and send to us.
EXPOSED_HEADERS = ["Location", "X-Job-Id", "Idempotent-Replayed", "Preference-Applied"]
ALLOWED_HEADERS = [
    "Authorization",
    "Content-Type",
    "Idempotency-Key",
    "Prefer",
    "Cancel-After",
    "Last-Event-ID",
]


def create_app(settings: Settings | None = None) -> Starlette:
    settings = settings or Settings()
    return Starlette(
        routes=ROUTES,
        middleware=[
            *_cors(settings),
            Middleware(TokenAuth, tokens=settings.credentials()),
            Middleware(BodyLimit, max_bytes=settings.max_body_bytes),
        ],
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=make_lifespan(settings),
    )


def _cors(settings: Settings) -> list[Middleware]:
    """CORS_ORIGINS, outermost: a preflight (which carries no token) is answered before auth,
    and 401s carry the CORS headers too, so a browser can read them."""
    if not settings.cors_origins:
        return []
    return [
        Middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=ALLOWED_HEADERS,
            expose_headers=EXPOSED_HEADERS,
            max_age=600,
        )
    ]
