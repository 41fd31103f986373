"""The web UI's server side over a real uvicorn: the page and its assets need no token (the API
still does), with their cache headers; `/` leads to the page; thumbnails of result images
(`GET /sdapi/v1/jobs/{id}/images/{n}?size=`), made on the CpuPool and kept in memory; and, in
Chromium, the page with tokens off. The page is driven through every feature, with tokens on,
against real processes in tests/processes/test_web_ui.py."""

from __future__ import annotations

import asyncio
import io
import re
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from PIL import Image

from a1111_proxy.app import create_app
from a1111_proxy.db.engine import Database
from a1111_proxy.jobs import JobRepository
from a1111_proxy.routes import ui
from tests.claims import claim_next
from tests.integration.test_input_images import GatedCpu
from tests.servers import ASYNC, serve

TOKENS = {"api_tokens": "alice:alice-token,bob:bob-token", "admin_tokens": "ops:ops-token"}
ALICE = {"Authorization": "Bearer alice-token"}
BOB = {"Authorization": "Bearer bob-token"}


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    return sqlite_url


@pytest.fixture
def base(sqlite_url: str, settings_for: Any) -> Iterator[str]:
    with serve(create_app(settings_for(database_url=sqlite_url, **TOKENS))) as url:
        yield url


# --- the page and its assets ---------------------------------------------------------------


def test_the_page_and_its_assets_need_no_token_while_the_api_does(base: str) -> None:
    page = httpx.get(f"{base}/ui/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assets = re.findall(r'(?:href|src)="(assets/[^"]+)"', page.text)
    assert {"js/main.js", "app.css", "icon.svg"} <= {a.split("/", 2)[2] for a in assets}
    for asset in assets:
        answer = httpx.get(f"{base}/ui/{asset}")
        assert answer.status_code == 200, asset
    assert httpx.get(f"{base}/sdapi/v1/jobs").status_code == 401
    assert httpx.get(f"{base}/uix").status_code == 401  # /ui is open, not what starts with it
    assert httpx.get(f"{base}/sdapi/v1/jobs", headers=ALICE).status_code == 200


def test_slash_and_ui_without_its_slash_lead_to_the_page(base: str) -> None:
    for path in ("/", "/ui"):
        answer = httpx.get(f"{base}{path}")
        assert answer.status_code == 307 and answer.headers["location"] == "/ui/", path
    assert httpx.get(f"{base}/", follow_redirects=True).url.path == "/ui/"


def test_the_page_is_revalidated_and_its_assets_are_cached_under_their_version(
    base: str,
) -> None:
    page = httpx.get(f"{base}/ui/")
    assert page.headers["cache-control"] == "no-cache"
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    again = httpx.get(f"{base}/ui/", headers={"If-None-Match": page.headers["etag"]})
    assert again.status_code == 304 and again.content == b""
    script = httpx.get(f"{base}/ui/assets/{ui.version()}/js/main.js")
    assert script.headers["content-type"].startswith(("text/javascript", "application/javascript"))
    assert script.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert f"assets/{ui.version()}/js/main.js" in page.text
    outside = f"{base}/ui/assets/{ui.version()}/%2e%2e/%2e%2e/routes/ui.py"
    assert httpx.get(outside).status_code == 404


def test_the_page_loads_nothing_from_another_origin(base: str) -> None:
    page = httpx.get(f"{base}/ui/").text
    assert not re.search(r"(src|href)=\"(https?:)?//", page)
    assert "default-src 'self'" in httpx.get(f"{base}/ui/").headers["content-security-policy"]


# --- thumbnails -----------------------------------------------------------------------------


def png(size: tuple[int, int], mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, (200, 40, 40) if mode == "RGB" else (200, 40, 40, 128)).save(out, "PNG")
    return out.getvalue()


def completed_with(database_url: str, job_id: str, images: list[bytes]) -> None:
    """The job, as a worker would leave it: completed with these images."""

    async def complete() -> None:
        db = Database(database_url)
        try:
            repo = JobRepository(db)
            claim = await claim_next(repo, "test-worker", "http://a1111")
            assert claim is not None and claim.id == job_id
            result = {"images": [], "parameters": {}, "info": "{}"}
            assert await repo.complete(claim, result, images)
        finally:
            await db.dispose()

    asyncio.run(complete())


def submitted(base: str, headers: dict[str, str]) -> str:
    answer = httpx.post(
        f"{base}/sdapi/v1/txt2img", json={"prompt": "a fox"}, headers={**ASYNC, **headers}
    )
    assert answer.status_code == 202, answer.text
    return str(answer.json()["id"])


def thumbnail(base: str, job_id: str, n: int, size: Any, headers: dict[str, str]) -> Any:
    return httpx.get(
        f"{base}/sdapi/v1/jobs/{job_id}/images/{n}", params={"size": size}, headers=headers
    )


def test_a_thumbnail_is_the_image_scaled_to_its_longer_side_and_cached_privately(
    base: str, sqlite_url: str
) -> None:
    job_id = submitted(base, ALICE)
    completed_with(sqlite_url, job_id, [png((1024, 512)), png((100, 300), "RGBA")])
    wide = thumbnail(base, job_id, 0, 256, ALICE)
    assert wide.status_code == 200 and wide.headers["content-type"] == "image/webp"
    assert wide.headers["cache-control"] == "private, max-age=86400"
    assert wide.headers["vary"] == "Authorization"
    image = Image.open(io.BytesIO(wide.content))
    assert image.format == "WEBP" and image.size == (256, 128)
    tall = Image.open(io.BytesIO(thumbnail(base, job_id, 1, 64, ALICE).content))
    assert tall.size == (21, 64) and tall.mode == "RGBA"  # transparency kept
    small = Image.open(io.BytesIO(thumbnail(base, job_id, 1, 512, ALICE).content))
    assert small.size == (100, 300)  # never enlarged
    full = httpx.get(f"{base}/sdapi/v1/jobs/{job_id}/images/0", headers=ALICE)
    assert full.headers["content-type"] == "image/png" and full.content == png((1024, 512))


def test_a_thumbnail_is_refused_for_a_size_not_offered_or_an_image_the_job_lacks(
    base: str, sqlite_url: str
) -> None:
    job_id = submitted(base, ALICE)
    assert thumbnail(base, job_id, 0, 256, ALICE).status_code == 404  # still queued
    completed_with(sqlite_url, job_id, [png((64, 64)), b"not an image"])
    for size in ("100", "0", "-1", "big", "2048"):
        refused = thumbnail(base, job_id, 0, size, ALICE)
        assert refused.status_code == 422, size
        assert refused.json()["detail"][0]["loc"] == ["query", "size"]
        assert "64, 128, 256, 512" in refused.json()["detail"][0]["msg"]
    assert thumbnail(base, job_id, 2, 64, ALICE).status_code == 404
    broken = thumbnail(base, job_id, 1, 64, ALICE)
    assert broken.status_code == 422 and broken.json()["code"] == "thumbnail_unavailable"


def test_another_tenants_thumbnail_answers_404_even_once_it_is_cached(
    base: str, sqlite_url: str
) -> None:
    job_id = submitted(base, ALICE)
    completed_with(sqlite_url, job_id, [png((64, 64))])
    assert thumbnail(base, job_id, 0, 128, ALICE).status_code == 200  # now in the cache
    refused = thumbnail(base, job_id, 0, 128, BOB)
    assert refused.status_code == 404 and refused.json()["code"] == "job_not_found"
    assert thumbnail(base, job_id, 0, 128, {}).status_code == 401


def test_thumbnails_are_made_on_the_cpu_pool_once_while_the_api_answers(
    sqlite_url: str, settings_for: Any
) -> None:
    gate = GatedCpu()
    app = gate.wrap(create_app(settings_for(database_url=sqlite_url)))
    with serve(app) as url, ThreadPoolExecutor(1) as client:
        job_id = submitted(url, {})
        completed_with(sqlite_url, job_id, [png((800, 800))])
        first = client.submit(thumbnail, url, job_id, 0, 128, {})
        assert gate.entered.wait(30)  # the image is being scaled, on the pool
        assert httpx.get(f"{url}/ready").status_code == 200 and not first.done()
        gate.opened.set()
        made = first.result(timeout=60)
        again = thumbnail(url, job_id, 0, 128, {})
        other_size = thumbnail(url, job_id, 0, 64, {})
    assert made.status_code == again.status_code == other_size.status_code == 200
    assert made.content == again.content
    assert [name for name, _ in gate.ran] == ["make_thumbnail", "make_thumbnail"]  # 128, 64
    assert all(thread.startswith("cpu-pool") for _, thread in gate.ran)


def test_with_no_thumbnail_cache_each_thumbnail_is_made_again(
    sqlite_url: str, settings_for: Any
) -> None:
    gate = GatedCpu()
    gate.opened.set()
    settings = settings_for(database_url=sqlite_url, thumbnail_cache_bytes=0)
    with serve(gate.wrap(create_app(settings))) as url:
        job_id = submitted(url, {})
        completed_with(sqlite_url, job_id, [png((64, 64))])
        for _ in range(2):
            assert thumbnail(url, job_id, 0, 64, {}).status_code == 200
    assert [name for name, _ in gate.ran] == ["make_thumbnail", "make_thumbnail"]


# --- tokens off, in a browser -----------------------------------------------------------------

CHROMIUM = (
    shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
)


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="no headless Chromium on this machine (install one, e.g. `apt-get install chromium`, "
    "to run the web UI's browser tests)",
)
def test_with_tokens_off_the_page_lists_jobs_at_once_and_says_no_token_is_needed(
    sqlite_url: str, settings_for: Any
) -> None:
    from playwright.sync_api import expect, sync_playwright

    with serve(create_app(settings_for(database_url=sqlite_url))) as url, sync_playwright() as p:
        job_id = submitted(url, {})
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(f"{url}/")
            expect(page.locator(f'li[data-id="{job_id}"]')).to_contain_text("a fox")
            expect(page.locator("#who")).to_have_text("tokens off: admin")
            expect(page.get_by_role("button", name="Sign out")).to_be_hidden()
            page.goto(f"{url}/ui/#/signin")
            expect(page.get_by_text("This server has tokens off")).to_be_visible()
        finally:
            browser.close()
