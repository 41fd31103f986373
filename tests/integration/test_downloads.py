"""Model downloads from end to end, in this process: the real API on uvicorn (admin routes), the
worker's Downloader over the same database, and a fake Civitai that is a real HTTP server on
loopback (tests/fakes/civitai.py): versions by id, hash and model, files with Range, a dropped
connection, a corrupted file and a held answer on demand."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from a1111_proxy.app import create_app
from a1111_proxy.catalogue import REFRESH_REQUESTED, CatalogueStore
from a1111_proxy.civitai import CivitaiClient
from a1111_proxy.db.engine import Database
from a1111_proxy.downloads import DownloadClaim, DownloadStore, Plan
from a1111_proxy.model_info import ModelInfoStore
from tests.fakes.civitai import FakeCivitai, model_bytes
from tests.servers import serve
from tests.sse import parse
from worker.downloader import DownloadConfig, Downloader

pytestmark = pytest.mark.anyio

ADMIN, TENANT = "admin-secret", "tenant-secret"
AS_ADMIN = {"Authorization": f"Bearer {ADMIN}"}
AS_TENANT = {"Authorization": f"Bearer {TENANT}"}
DOWNLOADS = "/sdapi/v1/models/downloads"
SIZE = 3 << 20  # three of the transfer's 1 MiB chunks
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class Setup:
    api: httpx.AsyncClient
    fake: FakeCivitai
    civitai_url: str
    db: Database
    models: Path
    config: DownloadConfig
    token: str = ""

    def downloader(self, **changes: Any) -> Downloader:
        client = CivitaiClient(self.civitai_url, changes.pop("token", self.token), min_interval=0)
        resolve = changes.pop("resolve", _loopback)
        return Downloader(
            DownloadStore(self.db),
            client,
            CatalogueStore(self.db),
            ModelInfoStore(self.db),
            replace(self.config, **changes),
            worker_id="test-worker",
            resolve=resolve,
        )

    async def add(self, source: str | int, **body: Any) -> dict[str, Any]:
        answer = await self.api.post(DOWNLOADS, json={"source": str(source), **body})
        assert answer.status_code == 202, answer.text
        assert answer.headers["location"] == f"{DOWNLOADS}/{answer.json()['id']}"
        return dict(answer.json())

    async def show(self, download_id: str) -> dict[str, Any]:
        answer = await self.api.get(f"{DOWNLOADS}/{download_id}")
        assert answer.status_code == 200, answer.text
        return dict(answer.json())

    async def fetch(self, source: str | int, **body: Any) -> dict[str, Any]:
        """Add a download, let one worker run it to its end, and show it."""
        added = await self.add(source, **body)
        downloader = self.downloader()
        try:
            await downloader.tick()
        finally:
            await downloader.aclose()
        return await self.show(added["id"])


async def _loopback(host: str, port: int) -> list[str]:
    return ["127.0.0.1"]


@pytest.fixture
def fake() -> Iterator[tuple[FakeCivitai, str]]:
    civitai = FakeCivitai(token="civitai-key")
    with serve(civitai.app) as url:
        try:
            yield civitai, url
        finally:
            civitai.release()


@pytest.fixture
async def setup(
    fake: tuple[FakeCivitai, str],
    db: Database,
    database_url: str,
    settings_for: Any,
    tmp_path: Path,
) -> AsyncIterator[Setup]:
    civitai, url = fake
    models = tmp_path / "models"
    models.mkdir()
    settings = settings_for(
        database_url=database_url,
        api_tokens=[f"alice:{TENANT}"],
        admin_tokens=[f"root:{ADMIN}"],
        civitai_url=url,
        models_dir=str(models),
    )
    config = DownloadConfig(
        models_dir=models, reserve_bytes=0, lease_seconds=30, heartbeat_seconds=0.02
    )
    with serve(create_app(settings)) as api_url:
        async with httpx.AsyncClient(base_url=api_url, headers=AS_ADMIN, timeout=30) as api:
            yield Setup(api, civitai, url, db, models, config)


async def until(check: Callable[[], Awaitable[Any]], what: str, timeout: float = 30) -> Any:
    """Wait (on events this loop can see: the API's answers) until `check` returns truth."""
    try:
        async with asyncio.timeout(timeout):
            while not (found := await check()):
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None
    return found


def files_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


# --- the whole way -------------------------------------------------------------------------------


async def test_a_civitai_version_is_downloaded_verified_and_placed_with_its_sidecars(
    setup: Setup,
) -> None:
    listed = setup.fake.add(101, "dreamshaper", model_bytes(SIZE))
    added = await setup.add(101)
    assert added["status"] == "queued" and added["kind"] is None and added["path"] is None
    assert added["links"]["events"] == f"{DOWNLOADS}/{added['id']}/events"

    downloader = setup.downloader()
    await downloader.tick()
    await downloader.aclose()
    done = await setup.show(added["id"])

    assert done["status"] == "completed", done
    assert (
        done["kind"] == "checkpoint" and done["path"] == "Stable-diffusion/dreamshaper.safetensors"
    )
    assert done["bytes_done"] == done["bytes_total"] == len(listed.data)
    assert done["sha256"] == listed.sha256 and done["progress"] == 1.0
    assert done["civitai"]["version_id"] == 101 and done["civitai"]["model_name"] == "dreamshaper"
    folder = setup.models / "Stable-diffusion"
    assert (folder / "dreamshaper.safetensors").read_bytes() == listed.data
    info = json.loads((folder / "dreamshaper.civitai.info").read_text())
    assert info["id"] == 101 and info["files"][0]["hashes"]["SHA256"] == listed.sha256.upper()
    assert (folder / "dreamshaper.preview.png").read_bytes().startswith(PNG_MAGIC)
    assert files_under(setup.models) == [
        "Stable-diffusion/dreamshaper.civitai.info",
        "Stable-diffusion/dreamshaper.preview.png",
        "Stable-diffusion/dreamshaper.safetensors",
    ]
    # The catalogue is asked to refresh (as POST /refresh-checkpoints does), and the file's
    # hash and Civitai's answer are recorded: `civitai` shows without asking Civitai again.
    refresh = await CatalogueStore(setup.db).get_control(REFRESH_REQUESTED)
    assert refresh["what"] == ["checkpoints"]
    info_store = ModelInfoStore(setup.db)
    [recorded] = await info_store.files()
    assert (recorded.kind, recorded.rel, recorded.sha256) == (
        "checkpoint",
        "dreamshaper.safetensors",
        listed.sha256,
    )
    lookup = (await info_store.lookups([listed.sha256]))[listed.sha256]
    assert lookup.summary is not None and lookup.summary["version_id"] == 101


async def test_a_dropped_connection_is_resumed_with_range_and_the_file_verified(
    setup: Setup,
) -> None:
    listed = setup.fake.add(102, "juggernaut", model_bytes(SIZE, seed=2))
    setup.fake.drop_next(after=(1 << 20) + 12345)
    done = await setup.fetch(102)
    assert done["status"] == "completed", done
    first, second = [r for r in setup.fake.file_requests if r.path.startswith("/files/")]
    assert first.range is None
    assert second.range is not None and second.range.startswith("bytes=")
    resumed_at = int(second.range.removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at <= (1 << 20) + 12345
    path = setup.models / "Stable-diffusion/juggernaut.safetensors"
    assert path.read_bytes() == listed.data


async def test_a_file_that_fails_its_sha256_is_removed_and_the_download_failed(
    setup: Setup,
) -> None:
    listed = setup.fake.add(103, "broken", model_bytes(SIZE, seed=3), kind="LORA")
    setup.fake.corrupt_next()
    failed = await setup.fetch(103)
    assert failed["status"] == "failed"
    assert "SHA256" in failed["error"] and listed.sha256 in failed["error"]
    assert "removed" in failed["error"]
    assert files_under(setup.models) == []  # no part file, no model, no sidecars

    again = await setup.fetch(103)  # the next answer is right
    assert again["status"] == "completed", again
    assert (setup.models / "Lora/broken.safetensors").read_bytes() == listed.data


# --- sources, kinds and folders --------------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    [
        "{url}/models/2000?modelVersionId=202",
        "https://civitai.com/models/2000/some-slug?modelVersionId=202",
        "{url}/api/download/models/202",
        "urn:air:sdxl:lora:civitai:2000@202",
        "{sha}",
    ],
)
async def test_each_form_of_source_names_its_version(setup: Setup, source: str) -> None:
    setup.fake.add(201, "detail", model_bytes(1000, seed=5), kind="LORA", model_id=2000)
    listed = setup.fake.add(202, "detail", model_bytes(1000, seed=6), kind="LORA", model_id=2000)
    listed.file_name = "detail_v2.safetensors"
    done = await setup.fetch(source.format(url=setup.civitai_url, sha=listed.sha256))
    assert done["status"] == "completed", done
    assert done["path"] == "Lora/detail_v2.safetensors" and done["civitai"]["version_id"] == 202


async def test_a_model_url_or_air_without_a_version_takes_the_newest_version(
    setup: Setup,
) -> None:
    setup.fake.add(301, "style", model_bytes(1000, seed=7), kind="LORA", model_id=3000)
    newest = setup.fake.add(302, "style", model_bytes(1000, seed=8), kind="LORA", model_id=3000)
    newest.file_name = "style_v2.safetensors"
    by_url = await setup.fetch(f"{setup.civitai_url}/models/3000/style")
    assert by_url["status"] == "completed" and by_url["path"] == "Lora/style_v2.safetensors"
    assert "/api/v1/models/3000" in setup.fake.api_requests
    (setup.models / "Lora/style_v2.safetensors").unlink()
    by_air = await setup.fetch("urn:air:sd1:lora:civitai:3000")
    assert by_air["status"] == "completed" and by_air["civitai"]["version_id"] == 302


@pytest.mark.parametrize(
    ("civitai_type", "folder"),
    [
        ("Checkpoint", "Stable-diffusion"),
        ("LORA", "Lora"),
        ("LoCon", "Lora"),
        ("Controlnet", "ControlNet"),
        ("VAE", "VAE"),
        ("TextualInversion", "embeddings"),
    ],
)
async def test_the_kind_comes_from_civitais_type_and_picks_the_folder(
    setup: Setup, civitai_type: str, folder: str
) -> None:
    setup.fake.add(401, "thing", model_bytes(1000), kind=civitai_type)
    done = await setup.fetch(401)
    assert done["status"] == "completed", done
    assert (setup.models / folder / "thing.safetensors").is_file()


async def test_a_kind_given_wins_over_civitais_and_an_unknown_type_needs_one(
    setup: Setup,
) -> None:
    setup.fake.add(402, "odd", model_bytes(1000), kind="Hypernetwork")
    refused = await setup.fetch(402)
    assert refused["status"] == "failed" and "Hypernetwork" in refused["error"]
    assert "`kind`" in refused["error"]
    placed = await setup.fetch(402, kind="embedding")
    assert placed["status"] == "completed" and placed["path"] == "embeddings/odd.safetensors"


# --- what is refused -------------------------------------------------------------------------


async def test_a_non_admin_gets_403_on_every_download_route(setup: Setup) -> None:
    setup.fake.add(501, "x", model_bytes(100))
    added = await setup.add(501)
    link = f"{DOWNLOADS}/{added['id']}"
    for method, path in [
        ("POST", DOWNLOADS),
        ("GET", DOWNLOADS),
        ("GET", link),
        ("POST", f"{link}/cancel"),
        ("GET", f"{link}/events"),
    ]:
        answer = await setup.api.request(method, path, json={"source": "501"}, headers=AS_TENANT)
        assert answer.status_code == 403, (method, path, answer.text)
        assert answer.json()["code"] == "admin_only"
    listed = (await setup.api.get(DOWNLOADS)).json()["downloads"]
    assert [d["id"] for d in listed] == [added["id"]]  # the tenant added nothing
    assert (await setup.show(added["id"]))["status"] == "queued"  # nor canceled it


@pytest.mark.parametrize(
    "file_name",
    ["../../../../evil.safetensors", "..\\..\\evil.safetensors", "sub/dir/evil.safetensors"],
)
async def test_a_file_name_with_folders_in_it_stays_inside_its_folder(
    setup: Setup, file_name: str, tmp_path: Path
) -> None:
    listed = setup.fake.add(601, "evil", model_bytes(1000), kind="LORA")
    listed.file_name = file_name
    done = await setup.fetch(601)
    assert done["status"] == "completed", done
    assert done["path"] == "Lora/evil.safetensors"
    assert files_under(setup.models) == [
        "Lora/evil.civitai.info",
        "Lora/evil.preview.png",
        "Lora/evil.safetensors",
    ]
    assert not any(p.name.startswith("evil") for p in tmp_path.iterdir())


async def test_a_pickle_is_refused_unless_allowed(setup: Setup) -> None:
    listed = setup.fake.add(701, "old", model_bytes(1000), pickle=True)
    listed.file_name = "old.ckpt"
    refused = await setup.fetch(701)
    assert refused["status"] == "failed"
    assert "pickle" in refused["error"] and "DOWNLOAD_ALLOW_PICKLE" in refused["error"]
    assert setup.fake.file_requests == [] and files_under(setup.models) == []

    added = await setup.add(701)
    downloader = setup.downloader(allow_pickle=True)
    await downloader.tick()
    await downloader.aclose()
    assert (await setup.show(added["id"]))["status"] == "completed"
    assert (setup.models / "Stable-diffusion/old.ckpt").read_bytes() == listed.data


async def test_a_download_that_would_fill_the_disk_fails_before_it_starts(setup: Setup) -> None:
    setup.fake.add(702, "huge", model_bytes(1000))
    added = await setup.add(702)
    downloader = setup.downloader(reserve_bytes=1 << 62)
    await downloader.tick()
    await downloader.aclose()
    failed = await setup.show(added["id"])
    assert failed["status"] == "failed" and "not enough free space" in failed["error"]
    assert "DOWNLOAD_RESERVE_BYTES" in failed["error"]
    assert setup.fake.file_requests == []


async def test_a_gated_model_needs_the_civitai_token(setup: Setup) -> None:
    setup.fake.add(703, "gated", model_bytes(1000), gated=True)
    refused = await setup.fetch(703)
    assert refused["status"] == "failed" and "CIVITAI_TOKEN" in refused["error"]
    setup.token = "civitai-key"
    done = await setup.fetch(703)
    assert done["status"] == "completed", done
    assert setup.fake.file_requests[-1].authorization == "Bearer civitai-key"


async def test_the_token_goes_to_civitai_only_never_to_the_storage_it_redirects_to(
    setup: Setup,
) -> None:
    storage = FakeCivitai()
    listed = setup.fake.add(704, "stored", model_bytes(1000), gated=True)
    storage.versions[704] = listed
    setup.token = "civitai-key"
    with serve(storage.app) as storage_url:
        setup.fake.storage = storage_url  # another host (port): not the trusted Civitai site
        blocked = await setup.fetch(704)  # the egress guard: loopback is internal
        assert blocked["status"] == "failed" and blocked["error"].startswith("blocked:")
        assert storage.file_requests == []
        setup.config = replace(setup.config, allow_private=True)  # WEBHOOK_ALLOW_PRIVATE
        done = await setup.fetch(704)
    assert done["status"] == "completed", done
    [download] = [r for r in setup.fake.file_requests if r.path.startswith("/api/download/")][-1:]
    assert download.authorization == "Bearer civitai-key"
    [stored] = storage.file_requests
    assert stored.authorization is None


async def test_a_direct_url_to_an_internal_address_is_blocked_by_the_egress_guard(
    setup: Setup,
) -> None:
    added = await setup.add("https://models.example/x.safetensors", kind="lora")
    downloader = setup.downloader()  # models.example resolves to 127.0.0.1 here
    await downloader.tick()
    await downloader.aclose()
    failed = await setup.show(added["id"])
    assert failed["status"] == "failed" and failed["error"].startswith("blocked:")
    assert "127.0.0.1" not in failed["error"]  # never says what a host resolves to
    assert files_under(setup.models) == []


async def test_the_api_refuses_sources_and_fields_it_cannot_use(setup: Setup) -> None:
    for body, field in [
        ({"source": "not a source"}, "source"),
        ({"source": "http://example.com/x.safetensors", "kind": "lora"}, "source"),
        ({"source": "https://example.com/x.safetensors"}, "kind"),
        ({"source": "https://civitai.com/articles/1"}, "source"),
        ({"source": "urn:air:sd1:lora:huggingface:1@2"}, "source"),
        ({"source": "101", "kind": "hypernetwork"}, "kind"),
        ({"source": "101", "colour": "red"}, "colour"),
        ({"source": "101", "sha256": "abc"}, "sha256"),
        ({}, "source"),
    ]:
        answer = await setup.api.post(DOWNLOADS, json=body)
        assert answer.status_code == 422, (body, answer.text)
        assert answer.json()["detail"][0]["loc"] == ["body", field], (body, answer.text)


# --- cancel, restart, events -----------------------------------------------------------------


async def test_cancel_stops_a_running_download_and_removes_its_part_file(setup: Setup) -> None:
    setup.fake.add(801, "long", model_bytes(SIZE))
    setup.fake.hold_next(after=1 << 20)
    added = await setup.add(801)
    downloader = setup.downloader()
    running = asyncio.create_task(downloader.tick())
    try:
        part = setup.models / "Stable-diffusion/long.safetensors.part"
        shown = await until(
            lambda: _shown_if(setup, added["id"], lambda d: d["bytes_done"] >= 1 << 20),
            "the download's progress",
        )
        assert shown["status"] == "running" and part.stat().st_size == 1 << 20
        assert shown["speed"] is None or shown["speed"] >= 0
        canceling = (await setup.api.post(f"{DOWNLOADS}/{added['id']}/cancel")).json()
        assert canceling["status"] == "running" and canceling["cancel_requested"]
        async with asyncio.timeout(30):
            await running
    finally:
        setup.fake.release()
        await downloader.aclose()
    canceled = await setup.show(added["id"])
    assert canceled["status"] == "canceled"
    assert files_under(setup.models) == []


async def test_a_queued_download_is_canceled_at_once_and_never_fetched(setup: Setup) -> None:
    setup.fake.add(802, "never", model_bytes(100))
    added = await setup.add(802)
    canceled = (await setup.api.post(f"{DOWNLOADS}/{added['id']}/cancel")).json()
    assert canceled["status"] == "canceled"
    downloader = setup.downloader()
    await downloader.tick()
    await downloader.aclose()
    assert setup.fake.file_requests == [] and setup.fake.api_requests == []
    missing = await setup.api.post(f"{DOWNLOADS}/nope/cancel")
    assert missing.status_code == 404 and missing.json()["code"] == "download_not_found"


async def test_a_stopped_worker_gives_the_download_back_and_the_next_resumes_it_with_range(
    setup: Setup,
) -> None:
    listed = setup.fake.add(803, "resumed", model_bytes(SIZE, seed=9))
    setup.fake.hold_next(after=(1 << 20) + 777)
    added = await setup.add(803)
    first = setup.downloader()
    running = asyncio.create_task(first.tick())
    part = setup.models / "Stable-diffusion/resumed.safetensors.part"
    await until(
        lambda: _shown_if(setup, added["id"], lambda d: d["bytes_done"] >= (1 << 20) + 777),
        "the first worker's bytes",
    )
    running.cancel()  # the worker stops (SIGTERM): the download goes back to the queue
    with contextlib.suppress(asyncio.CancelledError):
        await running
    await first.aclose()
    setup.fake.release()
    kept = part.stat().st_size
    assert kept == (1 << 20) + 777
    queued = await setup.show(added["id"])
    assert queued["status"] == "queued" and queued["attempts"] == 0

    second = setup.downloader()
    await second.tick()
    await second.aclose()
    done = await setup.show(added["id"])
    assert done["status"] == "completed", done
    assert setup.fake.file_requests[-1].range == f"bytes={kept}-"
    assert (setup.models / "Stable-diffusion/resumed.safetensors").read_bytes() == listed.data


async def test_events_stream_progress_then_the_final_event(setup: Setup) -> None:
    setup.fake.add(804, "watched", model_bytes(SIZE))
    setup.fake.hold_next(after=1 << 20)
    added = await setup.add(804)
    downloader = setup.downloader()
    running = asyncio.create_task(downloader.tick())
    events = []
    try:
        async with setup.api.stream("GET", f"{DOWNLOADS}/{added['id']}/events") as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            lines = []
            async for line in stream.aiter_lines():
                lines.append(line)
                events = list(parse(lines))
                if events and events[-1].data and events[-1].data.get("bytes_done", 0) > 0:
                    setup.fake.release()
                if events and events[-1].event in ("completed", "failed", "canceled"):
                    break
        await running
    finally:
        setup.fake.release()
        await downloader.aclose()
    named = [e.event for e in events if e.event != "ping"]
    assert named[0] == "progress" and named[-1] == "completed"
    assert events[-1].id == "final" and events[-1].data["status"] == "completed"
    progress = [e.data for e in events if e.event == "progress"]
    assert any(0 < p["bytes_done"] < p["bytes_total"] for p in progress)
    again = await setup.api.get(
        f"{DOWNLOADS}/{added['id']}/events", headers={"Last-Event-ID": "final"}
    )
    assert again.status_code == 204


async def test_the_listing_is_newest_first_and_filters_by_status(setup: Setup) -> None:
    setup.fake.add(901, "a", model_bytes(100))
    first = await setup.fetch(901)
    second = await setup.add(902)  # Civitai has no such version: it fails
    downloader = setup.downloader()
    await downloader.tick()
    await downloader.aclose()
    listed = (await setup.api.get(DOWNLOADS)).json()["downloads"]
    assert [d["id"] for d in listed] == [second["id"], first["id"]]
    failed = (await setup.api.get(DOWNLOADS, params={"status": "failed"})).json()["downloads"]
    assert [d["id"] for d in failed] == [second["id"]]
    assert "no model version" in failed[0]["error"]
    bad = await setup.api.get(DOWNLOADS, params={"status": "done"})
    assert bad.status_code == 422


# --- the store: one worker per download ---------------------------------------------------


async def test_a_download_is_claimed_by_one_worker_until_its_lease_expires(db: Database) -> None:
    now = [1000.0]
    store = DownloadStore(db, clock=lambda: now[0])
    added = await store.add("7", kind=None, file=None, sha256=None, requested_by="root")
    first = await store.claim("worker-a", lease_seconds=30)
    assert first is not None and first.id == added.id and first.record.attempts == 1
    assert await store.claim("worker-b", lease_seconds=30) is None  # held: nobody else
    assert not await store.has_due()
    touched = await store.touch(first, 30, bytes_done=10, bytes_total=100, speed=5.0)
    assert touched.held and not touched.cancel

    now[0] += 31  # worker-a died: its lease expired
    second = await store.claim("worker-b", lease_seconds=30)
    assert second is not None and second.id == added.id and second.record.attempts == 2
    assert second.record.bytes_done == 10  # where the first one got to
    # The first worker's writes are fenced off: it learns it lost the download.
    lost = await store.touch(first, 30, bytes_done=20, bytes_total=100, speed=5.0)
    assert not lost.held
    assert not await store.finish(first, "completed")
    assert await store.requeue(first, 0, "x") is None
    assert (await store.get(added.id)).status == "running"  # type: ignore[union-attr]
    assert await store.finish(second, "completed")
    assert (await store.get(added.id)).status == "completed"  # type: ignore[union-attr]


async def test_a_path_being_written_by_one_download_is_seen_by_another(db: Database) -> None:
    store = DownloadStore(db)
    for _ in range(2):
        await store.add("7", kind=None, file=None, sha256=None, requested_by="root")
    plan = Plan("lora", "https://x", "Lora/m.safetensors", None, None, None)
    one = await store.resolved(await _claimed(store), plan)
    two = await _claimed(store)
    assert one is not None
    assert await store.writer_of(two, "Lora/m.safetensors") == one.id
    assert await store.writer_of(one, "Lora/m.safetensors") is None  # not itself
    assert await store.finish(one, "completed")
    assert await store.writer_of(two, "Lora/m.safetensors") is None


async def test_a_download_requeued_too_often_fails(db: Database) -> None:
    store = DownloadStore(db, max_attempts=2)
    added = await store.add("7", kind=None, file=None, sha256=None, requested_by="root")
    assert await store.requeue(await _claimed(store), 0, "Civitai is down") == "queued"
    assert await store.requeue(await _claimed(store), 0, "Civitai is down") == "failed"
    failed = await store.get(added.id)
    assert failed is not None and failed.status == "failed"
    assert failed.error == "Civitai is down (gave up after 2 attempts)"


async def _claimed(store: DownloadStore) -> DownloadClaim:
    claim = await store.claim("w", lease_seconds=30)
    assert claim is not None
    return claim


async def _shown_if(
    setup: Setup, download_id: str, test: Callable[[dict[str, Any]], bool]
) -> dict[str, Any] | None:
    shown = await setup.show(download_id)
    return shown if test(shown) else None
