"""Build a Worker from Settings and run it until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from pathlib import Path

from a1111_proxy.backends import Backend
from a1111_proxy.backends.a1111 import A1111Backend
from a1111_proxy.backends.fake import FakeBackend
from a1111_proxy.catalogue import CatalogueStore
from a1111_proxy.civitai import CivitaiClient
from a1111_proxy.db.engine import Database
from a1111_proxy.deliveries import outbox_wakeup
from a1111_proxy.downloads import DownloadStore
from a1111_proxy.jobs import JobRepository
from a1111_proxy.model_info import ModelInfoStore
from a1111_proxy.settings import Settings
from a1111_proxy.wakeup import WORK_CHANNEL, make_wakeup
from a1111_proxy.webhooks import RetryPolicy
from worker.catalogue import CatalogueKeeper
from worker.downloader import DownloadConfig, Downloader
from worker.enricher import CivitaiEnricher
from worker.execute import Timing
from worker.hasher import ModelHasher
from worker.loop import Chore, Worker
from worker.sender import SenderConfig, WebhookSender
from worker.upkeep import Deadlines, Retention

log = logging.getLogger("a1111_proxy.worker")


def build_worker(settings: Settings, db: Database) -> Worker:
    repo = JobRepository(
        db, max_attempts=settings.max_attempts, lease_seconds=settings.lease_seconds
    )
    backends: list[Backend]
    if settings.backend == "diffusers":
        backends = [_diffusers_backend(settings)]
    elif settings.backend == "fake":
        backends = list(fake_backends(settings))
    else:
        auth, retries = settings.a1111_basic_auth(), settings.connect_retries
        backends = [
            A1111Backend(url, auth=auth, connect_retries=retries) for url in settings.a1111_urls
        ]
    return Worker(
        repo=repo,
        backends=list(backends),
        wakeup=make_wakeup(settings.database_url, settings.poll_seconds, (WORK_CHANNEL,)),
        timing=Timing(
            progress_seconds=settings.progress_seconds,
            heartbeat_seconds=settings.heartbeat_seconds,
            interrupt_grace_seconds=settings.interrupt_grace_seconds,
            stall_seconds=settings.stall_seconds,
        ),
        reap_seconds=settings.reap_seconds,
        batch_wait_seconds=settings.engine_batch_wait_ms / 1000,
        shutdown_grace_seconds=settings.shutdown_grace_seconds,
        keeper=CatalogueKeeper(CatalogueStore(db), interval=settings.catalogue_seconds),
        chores=[*build_chores(settings, db), *build_upkeep(settings, repo)],
    )


def build_sender(settings: Settings, repo: JobRepository) -> WebhookSender:
    # Woken by the outbox only, not by every job's change; webhooks need no millisecond
    # latency: where there are no file events, poll less often than for jobs.
    wakeup = outbox_wakeup(settings.database_url, max(settings.poll_seconds, 0.05))
    return WebhookSender(repo, wakeup, sender_config(settings))


def sender_config(settings: Settings) -> SenderConfig:
    return SenderConfig(
        default_secret=settings.webhook_secret.get_secret_value(),
        allow_private=settings.webhook_allow_private,
        ca_bundle=settings.webhook_ca_bundle,
        images=settings.webhook_images,
        public_url=settings.public_base_url(),
        lease_seconds=settings.webhook_lease_seconds,
        policy=RetryPolicy(schedule=(0.0, *settings.webhook_retry_seconds)),
    )


def build_chores(settings: Settings, db: Database) -> list[Chore]:
    """The model hasher (it idles while MODELS_DIR is missing), the model downloader and, unless
    Civitai is turned off, the Civitai enricher."""
    info = ModelInfoStore(db)
    chores: list[Chore] = [ModelHasher(info, Path(settings.models_dir))]
    token = settings.civitai_token.get_secret_value()
    chores.append(build_downloader(settings, db, CivitaiClient(settings.civitai_url, token)))
    if settings.civitai_enabled:
        client = CivitaiClient(settings.civitai_url, token)
        chores.append(
            CivitaiEnricher(CatalogueStore(db), info, client, ttl=settings.civitai_ttl_seconds)
        )
    return chores


def build_downloader(settings: Settings, db: Database, civitai: CivitaiClient) -> Downloader:
    """Model downloads into MODELS_DIR, one at a time per worker process; the egress guard's
    settings are the webhooks'."""
    config = DownloadConfig(
        models_dir=Path(settings.models_dir),
        allow_pickle=settings.download_allow_pickle,
        reserve_bytes=settings.download_reserve_bytes,
        allow_private=settings.webhook_allow_private,
        ca_bundle=settings.webhook_ca_bundle,
        lease_seconds=settings.lease_seconds,
        heartbeat_seconds=min(1.0, settings.heartbeat_seconds),
        civitai_ttl=settings.civitai_ttl_seconds,
    )
    return Downloader(
        DownloadStore(db),
        civitai,
        CatalogueStore(db),
        ModelInfoStore(db),
        config,
        worker_id=f"{socket.gethostname()}:{os.getpid()}:downloads",
    )


def build_upkeep(settings: Settings, repo: JobRepository) -> list[Chore]:
    """Deadlines and retention (RETENTION_SECONDS=0 keeps finished jobs forever)."""
    return [
        Deadlines(repo, settings.deadline_check_seconds),
        Retention(repo, settings.retention_seconds, settings.retention_check_seconds),
    ]


def fake_backends(settings: Settings) -> list[FakeBackend]:
    """FAKE_SLOTS in-process fakes. A backend is one job at a time across workers, by name: a
    fake lives in its process, so its name says which one."""
    prefix = f"fake:{socket.gethostname()}:{os.getpid()}"
    return [
        FakeBackend(f"{prefix}/{i}", service_time=settings.fake_seconds)
        for i in range(settings.fake_slots)
    ]


def _diffusers_backend(settings: Settings) -> Backend:
    """One slot on the bundled engine; torch is imported only here, never by the API."""
    try:
        from a1111_proxy.backends.diffusers import DiffusersBackend
        from a1111_proxy.engine.config import EngineConfig
    except ImportError as exc:
        raise SystemExit(
            f"a1111-proxy: A1111_PROXY_BACKEND=diffusers needs the engine extra ({exc}); "
            "install it with: pip install 'a1111-proxy[engine]'"
        ) from None
    return DiffusersBackend(
        EngineConfig(
            models_dir=Path(settings.models_dir),
            device=settings.engine_device,
            dtype=settings.engine_dtype,
            cached_models=settings.engine_cached_models,
            compile=settings.engine_compile,
            compile_mode=settings.engine_compile_mode,
            cpu_offload=settings.engine_cpu_offload,
            preview_steps=settings.engine_preview_steps,
            max_batch=settings.engine_max_batch,
        )
    )


async def run(settings: Settings) -> int:
    db = Database.for_settings(settings)
    db.start_checkpoints()
    worker = build_worker(settings, db)
    sender = build_sender(settings, worker.repo)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, _stopper(worker, signum))
    try:
        await run_with_sender(worker, sender)
    finally:
        await db.dispose()
    return 0


async def run_with_sender(worker: Worker, sender: WebhookSender) -> None:
    """Run both; the sender stops after the worker, so jobs that end while it drains are
    announced too (what is left is sent by the next worker process)."""
    sending = asyncio.create_task(sender.run(), name="webhooks")
    try:
        await worker.run()
    finally:
        sender.stop()
        await sending


def _stopper(worker: Worker, signum: int):  # type: ignore[no-untyped-def]
    def stop() -> None:
        log.info(
            "%s: no new jobs; finishing running ones (then releasing them)",
            signal.Signals(signum).name,
        )
        worker.stop()

    return stop
