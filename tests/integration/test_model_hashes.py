"""Hashing real model files in a temporary MODELS_DIR, checked against hashlib, and the hash cache
(SQLite, then PostgreSQL) that spares a restart from hashing again. How one file is hashed is in
tests/unit/test_model_hashes.py."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from a1111_proxy.db.engine import Database
from a1111_proxy.hashes import FileHashes, hash_file
from a1111_proxy.model_info import ModelFile, ModelInfoStore
from tests.fakes.civitai import safetensors_bytes
from worker.hasher import ModelHasher

pytestmark = pytest.mark.anyio

CHECKPOINT_DATA = os.urandom(2 * 1024 * 1024 + 123)  # more than one 1 MiB chunk
LORA_DATA = os.urandom(40_000)


@pytest.fixture
async def store(sqlite_url: str) -> AsyncIterator[ModelInfoStore]:
    db = Database(sqlite_url)
    yield ModelInfoStore(db)
    await db.dispose()


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    """A1111's layout: a checkpoint in a subfolder, a .ckpt, a LoRA with kohya metadata, and a
    file A1111 would not list."""
    root = tmp_path / "models"
    (root / "Stable-diffusion" / "SDXL").mkdir(parents=True)
    (root / "Lora").mkdir()
    (root / "Stable-diffusion" / "SDXL" / "juggernaut.safetensors").write_bytes(
        safetensors_bytes(CHECKPOINT_DATA)
    )
    (root / "Stable-diffusion" / "old.ckpt").write_bytes(b"pickle" * 1000)
    (root / "Lora" / "add_detail.safetensors").write_bytes(
        safetensors_bytes(LORA_DATA, {"ss_output_name": "add_detail"})
    )
    (root / "Lora" / "notes.txt").write_text("not a model")
    return root


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def by_rel(files: list[ModelFile]) -> dict[str, ModelFile]:
    """The latest row for each file (older rows of changed files linger a while)."""
    return {f.rel: f for f in sorted(files, key=lambda f: f.hashed_at)}


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def test_the_hasher_stores_every_model_file_with_hashes_that_match_hashlib(
    store: ModelInfoStore, models_dir: Path
) -> None:
    hasher = ModelHasher(store, models_dir)
    await hasher.tick()
    await hasher.aclose()
    files = by_rel(await store.files())
    assert set(files) == {"SDXL/juggernaut.safetensors", "old.ckpt", "add_detail.safetensors"}
    checkpoint = files["SDXL/juggernaut.safetensors"]
    on_disk = models_dir / "Stable-diffusion" / "SDXL" / "juggernaut.safetensors"
    assert checkpoint.kind == "checkpoint" and checkpoint.sha256 == sha256(on_disk.read_bytes())
    assert checkpoint.size == on_disk.stat().st_size and checkpoint.path == str(on_disk)
    assert files["old.ckpt"].sha256 == sha256(b"pickle" * 1000) and files["old.ckpt"].autov3 is None
    lora = files["add_detail.safetensors"]
    assert lora.kind == "lora" and lora.autov3 == sha256(LORA_DATA)[:12]
    assert lora.sha256 == sha256((models_dir / "Lora" / "add_detail.safetensors").read_bytes())


async def test_a_restart_does_not_hash_again_until_size_or_mtime_change(
    store: ModelInfoStore, models_dir: Path
) -> None:
    first = ModelHasher(store, models_dir)
    await first.tick()
    await first.aclose()
    assert first.hashed == 3
    # Same size and mtime, other bytes: only a hash of the file itself would notice.
    lora = models_dir / "Lora" / "add_detail.safetensors"
    stat = lora.stat()
    other_bytes = safetensors_bytes(os.urandom(len(LORA_DATA)), {"ss_output_name": "add_detail"})
    lora.write_bytes(other_bytes)
    os.utime(lora, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    remembered = by_rel(await store.files())["add_detail.safetensors"].sha256

    restarted = ModelHasher(store, models_dir)
    await restarted.tick()
    assert restarted.hashed == 0
    assert by_rel(await store.files())["add_detail.safetensors"].sha256 == remembered

    os.utime(lora, (stat.st_atime + 10, stat.st_mtime + 10))
    await restarted.tick()
    await restarted.aclose()
    assert restarted.hashed == 1
    [latest] = [f for f in await store.files() if f.mtime_ns == lora.stat().st_mtime_ns]
    assert latest.rel == "add_detail.safetensors" and latest.sha256 == sha256(lora.read_bytes())


async def test_rows_of_files_no_worker_has_seen_for_a_month_are_forgotten(
    sqlite_url: str, models_dir: Path
) -> None:
    db = Database(sqlite_url)
    clock = Clock()
    store = ModelInfoStore(db, clock=clock)
    hasher = ModelHasher(store, models_dir)
    await hasher.tick()
    (models_dir / "Stable-diffusion" / "old.ckpt").unlink()
    clock.now += 20 * 24 * 3600
    await hasher.tick()
    still_there = set(by_rel(await store.files()))
    clock.now += 20 * 24 * 3600
    await hasher.tick()
    await hasher.aclose()
    remaining = set(by_rel(await store.files()))
    await db.dispose()
    assert hasher.hashed == 3
    assert "old.ckpt" in still_there and "old.ckpt" not in remaining
    assert remaining == {"SDXL/juggernaut.safetensors", "add_detail.safetensors"}


async def test_workers_on_two_machines_share_the_cache_without_hashing_each_others_files(
    store: ModelInfoStore, models_dir: Path, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "other-machine"
    (elsewhere / "Lora").mkdir(parents=True)
    (elsewhere / "Lora" / "add_detail.safetensors").write_bytes(safetensors_bytes(LORA_DATA))
    here, there = ModelHasher(store, models_dir), ModelHasher(store, elsewhere)
    for hasher in (here, there, here, there):
        await hasher.tick()
    await here.aclose()
    await there.aclose()
    assert (here.hashed, there.hashed) == (3, 1)
    assert len([f for f in await store.files() if f.rel == "add_detail.safetensors"]) == 2


async def test_a_missing_models_dir_is_not_an_error(store: ModelInfoStore, tmp_path: Path) -> None:
    hasher = ModelHasher(store, tmp_path / "nowhere")
    await hasher.tick()
    await hasher.aclose()
    assert await store.files() == []


async def test_hashing_a_large_file_leaves_the_event_loop_free(
    store: ModelInfoStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    big = tmp_path / "models" / "Stable-diffusion" / "big.ckpt"
    big.parent.mkdir(parents=True)
    with big.open("wb") as file:
        file.truncate(128 * 1024 * 1024)  # sparse: cheap to make, still 128 MiB to hash
    # The hash holds until this test's coroutine lets it go on: that can only happen if the
    # event loop runs while the file is being hashed.
    hashing, go_on = threading.Event(), threading.Event()

    def held(path: Path, stop: threading.Event | None = None) -> FileHashes:
        hashing.set()
        assert go_on.wait(30), "the event loop did not run while the file was hashed"
        return hash_file(path, stop)

    monkeypatch.setattr("worker.hasher.hash_file", held)
    hasher = ModelHasher(store, tmp_path / "models")
    ticking = asyncio.create_task(hasher.tick())
    async with asyncio.timeout(30):
        while not hashing.is_set():
            await asyncio.sleep(0.005)
    go_on.set()
    await asyncio.wait_for(ticking, 30)
    await hasher.aclose()
    assert hasher.hashed == 1


async def test_the_file_and_lookup_caches_work_on_both_databases(
    database_url: str, tmp_path: Path
) -> None:
    db = Database(database_url)
    store = ModelInfoStore(db)
    # Unique per test: the PostgreSQL database is shared by the session.
    path = str(tmp_path / "Lora" / "unique.safetensors")
    file = ModelFile(
        path=path,
        size=5_000_000_000,
        mtime_ns=1_700_000_000_123_456_789,
        kind="lora",
        rel="unique.safetensors",
        sha256="a" * 64,
        autov3="b" * 12,
    )
    await store.save_file(file)
    await store.save_file(file)  # saving again replaces
    await store.mark_seen([file.key])
    [stored] = [f for f in await store.files() if f.path == path]
    await store.forget_unseen(-60)  # everything seen until a minute from now
    remaining = [f for f in await store.files() if f.path == path]
    hash_ = hashlib.sha256(path.encode()).hexdigest()
    await store.save_lookup(hash_, None, ttl=60)
    await store.save_lookup(hash_, {"model_name": "Found later"}, ttl=60)
    lookup = await store.lookups([hash_, "f" * 64])
    await db.dispose()
    assert list(lookup) == [hash_] and lookup[hash_].found
    assert lookup[hash_].summary == {"model_name": "Found later"}
    assert (stored.size, stored.mtime_ns, stored.sha256, stored.autov3) == (
        file.size,
        file.mtime_ns,
        file.sha256,
        file.autov3,
    )
    assert remaining == []
