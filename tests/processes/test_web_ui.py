"""The web UI in a real browser (playwright driving Chromium) against real `serve` and `worker`
processes with BACKEND=fake (one slot), tokens on (tenants alice and bob, admin ops) and a
webhook receiver: sign in, submit from the form and watch it run to its image, cancel a queued
job, see webhook attempts and send one again, filter the list, run the copied curl and Python,
and every page usable with labels, on a phone and in the dark.

A failed test saves a screenshot of the page (its path is printed with the test's output).
Skipped, saying why, where there is no Chromium."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fakes.civitai import version
from tests.fakes.webhook_sink import WebhookSink
from tests.servers import ASYNC, free_port, serve, wait_for
from tests.stack import Stack

pytestmark = pytest.mark.slow

CHROMIUM = (
    shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
)
if CHROMIUM is None:
    pytest.skip(
        "no headless Chromium on this machine (install one, e.g. `apt-get install chromium`, "
        "to run the web UI's browser tests)",
        allow_module_level=True,
    )

from playwright.sync_api import Browser, Page, expect, sync_playwright  # noqa: E402

ALICE, BOB, OPS = "alice-token", "bob-token", "ops-token"
TOKEN_KEY = "a1111-proxy.token"  # where the page keeps the token (js/api.js)
MODEL = "fake-model.safetensors [f4ce0f4ce0]"
MODEL_SHA256 = "f4ce0f4ce0" + "0" * 54
WAIT_MS = 60_000  # a bound only a real failure reaches
expect.set_options(timeout=WAIT_MS)


@dataclass
class Web:
    stack: Stack
    base: str
    sink: WebhookSink
    hooks: str

    def client(self, token: str) -> httpx.Client:
        headers = {**ASYNC, "Authorization": f"Bearer {token}"}
        return httpx.Client(base_url=self.base, headers=headers, timeout=30)

    def submit(self, token: str, **body: Any) -> str:
        with self.client(token) as client:
            answer = client.post("/sdapi/v1/txt2img", json={"steps": 5, **body})
        assert answer.status_code == 202, answer.text
        return str(answer.json()["id"])

    def job(self, token: str, job_id: str) -> dict[str, Any]:
        with self.client(token) as client:
            return dict(client.get(f"/sdapi/v1/jobs/{job_id}").json())

    def wait_status(self, job_id: str, *statuses: str) -> dict[str, Any]:
        return wait_for(  # type: ignore[no-any-return]
            lambda: (job := self.job(OPS, job_id))["status"] in statuses and job,
            timeout=60,
            what=f"job {job_id} to be {statuses}",
        )


def fake_civitai() -> Starlette:
    """Civitai's by-hash route, knowing the fake backend's one checkpoint."""

    async def by_hash(request: Request) -> Response:
        if request.path_params["hash"].lower() != MODEL_SHA256:
            return JSONResponse({"error": "Model not found"}, status_code=404)
        return JSONResponse(version(2000, "Fake Checkpoint", trainedWords=["fakestyle"]))

    return Starlette(routes=[Route("/api/v1/model-versions/by-hash/{hash}", by_hash)])


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Web]:
    sink = WebhookSink()
    with serve(sink.app) as hooks, serve(fake_civitai()) as civitai:
        stack = Stack(
            tmp_path_factory.mktemp("web-ui"),
            [f"http://127.0.0.1:{free_port()}"],  # not used: BACKEND=fake
            A1111_PROXY_BACKEND="fake",
            A1111_PROXY_FAKE_SECONDS="3",
            A1111_PROXY_FAKE_SLOTS="1",
            A1111_PROXY_API_TOKENS=f"alice:{ALICE},bob:{BOB}",
            A1111_PROXY_ADMIN_TOKENS=f"ops:{OPS}",
            A1111_PROXY_WEBHOOK_ALLOW_PRIVATE="true",
            A1111_PROXY_CIVITAI_ENABLED="true",
            A1111_PROXY_CIVITAI_URL=civitai,
        )
        try:
            stack.start_api()
            stack.start_worker()
            yield Web(stack, stack.base, sink, hooks)
        finally:
            stack.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        launched = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def open_page(browser: Browser, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """open_page(token=None, **context options): a page in a fresh browser context (its own
    sessionStorage), signed in with `token`. Uncaught script errors fail the test; a failed
    test leaves a screenshot of each page it opened."""
    pages: list[Page] = []
    errors: list[str] = []

    def make(token: str | None = None, **options: Any) -> Page:
        context = browser.new_context(**{"viewport": {"width": 1200, "height": 900}, **options})
        if token is not None:
            context.add_init_script(f"sessionStorage.setItem({TOKEN_KEY!r}, {json.dumps(token)})")
        page = context.new_page()
        page.set_default_timeout(WAIT_MS)
        page.on("pageerror", lambda error: errors.append(str(error)))
        pages.append(page)
        return page

    yield make
    report = getattr(request.node, "reports", {}).get("call")
    for n, page in enumerate(pages):
        if report is not None and report.failed:
            shot = tmp_path / f"failure-{n}.png"
            page.screenshot(path=shot, full_page=True)
            print(f"screenshot of the page when the test failed: {shot} ({page.url})")
        page.context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


def heading(page: Page) -> Any:
    return page.get_by_role("heading", level=1)


# --- signing in -----------------------------------------------------------------------------


def test_signing_in_takes_a_token_refuses_a_wrong_one_and_signing_out_forgets_it(
    web: Web, open_page: Any
) -> None:
    page = open_page()
    page.goto(f"{web.base}/")
    expect(heading(page)).to_have_text("Sign in")
    page.get_by_label("API token").fill("not-a-token")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("That token was refused")
    page.get_by_label("API token").fill(ALICE)
    page.get_by_role("button", name="Sign in").click()
    expect(heading(page)).to_have_text("Jobs")
    expect(page.locator("#who")).to_have_text("signed in: tenant")
    assert page.evaluate(f"sessionStorage.getItem({TOKEN_KEY!r})") == ALICE
    page.reload()  # the token outlives a reload of the tab
    expect(heading(page)).to_have_text("Jobs")
    page.get_by_role("button", name="Sign out").click()
    expect(heading(page)).to_have_text("Sign in")
    assert page.evaluate(f"sessionStorage.getItem({TOKEN_KEY!r})") is None


# --- the form, and the job live ------------------------------------------------------------


def test_a_job_submitted_from_the_form_runs_live_to_100_percent_and_shows_its_image(
    web: Web, open_page: Any
) -> None:
    prompt = f"a red fox in the snow {uuid.uuid4().hex[:8]}"
    page = open_page(ALICE)
    page.goto(f"{web.base}/ui/#/new")
    model = page.get_by_label("Model", exact=True)
    expect(model.locator("option", has_text="fake-model")).to_have_count(1)
    page.get_by_label("Prompt", exact=True).fill(prompt)
    model.select_option(MODEL)
    page.get_by_label("Sampler").select_option("Euler")
    page.get_by_role("button", name="Random").click()
    seed = page.get_by_label("Seed").input_value()
    assert seed not in ("", "-1")
    page.get_by_role("button", name="Generate").click()
    expect(page).to_have_url(re.compile(r"#/jobs/[0-9a-f-]{36}$"))
    job_id = page.url.rsplit("/", 1)[1]
    bar = "document.querySelector('main progress')"
    page.wait_for_function(f"() => {bar}?.value > 0 && {bar}.value < 100")
    page.wait_for_function(f"() => {bar}?.value === 100")
    expect(page.locator("main .title-row .chip")).to_have_text("completed")
    expect(page.locator("figure img")).to_have_count(1)
    page.wait_for_function(
        "() => [...document.querySelectorAll('figure img')].every(i => i.naturalWidth)"
    )
    expect(page.locator("figcaption")).to_contain_text(f"Seed: {seed}")
    download = page.get_by_role("link", name="Download image 1")
    expect(download).to_have_attribute("download", f"{job_id}-0.png")
    expect(download).to_have_attribute("href", re.compile("^data:image/png;base64,"))

    sent = web.job(ALICE, job_id)["request"]
    assert sent["prompt"] == prompt and sent["seed"] == int(seed)
    assert sent["sampler_name"] == "Euler" and sent["override_settings"] == {
        "sd_model_checkpoint": MODEL
    }
    # ...and it is listed with its thumbnail.
    page.goto(f"{web.base}/ui/#/jobs")
    row = page.locator(f'li[data-id="{job_id}"]')
    expect(row.locator(".chip")).to_have_text("completed")
    expect(row).to_contain_text(prompt)
    page.wait_for_function(
        "id => document.querySelector(`li[data-id='${id}'] img.thumb`)?.naturalWidth > 0",
        arg=job_id,
    )


def test_an_init_image_dropped_on_the_form_makes_an_img2img_job_that_runs_again_the_same(
    web: Web, open_page: Any
) -> None:
    out = io.BytesIO()
    Image.new("RGB", (64, 48), "teal").save(out, "PNG")
    page = open_page(ALICE)
    page.goto(f"{web.base}/ui/#/new")
    page.get_by_label("img2img").check()
    page.get_by_label("Prompt", exact=True).fill("the same, in autumn")
    page.evaluate(DROP, base64.b64encode(out.getvalue()).decode())
    expect(page.get_by_alt_text("The init image")).to_be_visible()
    expect(page.get_by_label("Width")).to_have_value("64")  # the image's own size
    expect(page.get_by_label("Height")).to_have_value("48")
    page.get_by_label("Denoising strength").fill("0.4")
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("main .title-row .chip")).to_have_text("completed")
    first = page.url.rsplit("/", 1)[1]
    sent = web.job(ALICE, first)
    assert sent["type"] == "img2img" and sent["request"]["denoising_strength"] == 0.4
    assert sent["request"]["init_images"][0].startswith("data:image/png;base64,")

    page.get_by_role("button", name="Run again").click()
    expect(page).not_to_have_url(re.compile(first))
    expect(page.locator("main .title-row .chip")).to_have_text("completed")
    again = web.job(ALICE, page.url.rsplit("/", 1)[1])
    assert again["type"] == "img2img" and again["request"] == sent["request"]


# Drops a PNG (base64) on the form's drop zone, as a file dragged from the desktop would.
DROP = """async (b64) => {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const data = new DataTransfer();
  data.items.add(new File([bytes], "init.png", { type: "image/png" }));
  const zone = document.querySelector(".drop");
  const event = (name) =>
    new DragEvent(name, { dataTransfer: data, bubbles: true, cancelable: true });
  zone.dispatchEvent(event("dragover"));
  zone.dispatchEvent(event("drop"));
}"""


def test_the_queue_shows_the_running_job_live_and_a_queued_job_is_canceled_from_its_page(
    web: Web, open_page: Any
) -> None:
    blocker = web.submit(ALICE, prompt="a long one", fake_seconds=120)
    web.wait_status(blocker, "processing")
    waiting = web.submit(ALICE, prompt="a waiting one")
    page = open_page(ALICE)
    try:
        page.goto(f"{web.base}/ui/#/queue")
        card = page.locator(f'article.slot[data-id="{blocker}"]')
        expect(card).to_be_visible()
        page.wait_for_function(
            "id => document.querySelector(`article[data-id='${id}'] progress`)?.value > 0",
            arg=blocker,
        )
        expect(card.locator("img.preview")).to_have_attribute("src", re.compile("^data:image/"))
        row = page.locator(f'tr[data-id="{waiting}"]')
        expect(row.locator("td").first).to_have_text("1")

        row.get_by_role("link").click()
        expect(page.get_by_text("Waiting: number 1 in the queue.")).to_be_visible()
        page.get_by_role("button", name="Cancel").click()
        expect(page.locator("main .title-row .chip")).to_have_text("canceled")
        assert web.job(ALICE, waiting)["status"] == "canceled"
        assert web.job(ALICE, waiting)["error"]["code"] == "canceled"
        assert web.job(ALICE, blocker)["status"] == "processing"  # the other one runs on
    finally:
        with web.client(ALICE) as client:
            client.post(f"/sdapi/v1/jobs/{blocker}/cancel")
        web.wait_status(blocker, "completed", "canceled", "error")


# --- webhooks --------------------------------------------------------------------------------


def test_a_jobs_webhook_attempts_are_shown_and_a_delivery_is_sent_again(
    web: Web, open_page: Any
) -> None:
    path = f"/hook-{uuid.uuid4().hex[:8]}"
    hook = web.hooks + path
    job_id = web.submit(ALICE, prompt="a hooked one", fake_seconds=0.1, webhook_url=hook)
    web.wait_status(job_id, "completed")
    wait_for(lambda: len(web.sink.at(path)) == 1, what="the first delivery")
    page = open_page(ALICE)
    page.goto(f"{web.base}/ui/#/jobs/{job_id}")
    delivery = page.locator(".deliveries > li").first
    expect(delivery.locator(".chip")).to_have_text("delivered")
    delivery.get_by_text("Attempts of job.completed").click()
    attempts = delivery.locator("tbody tr")
    expect(attempts).to_have_count(1)
    expect(attempts.first).to_contain_text("200")

    delivery.get_by_role("button", name="Redeliver").click()
    expect(attempts).to_have_count(2)  # shown as it lands,
    expect(attempts.nth(1)).to_contain_text("manual")
    expect(delivery.locator("details")).to_have_attribute("open", "")  # still open
    expect(attempts.nth(1)).to_be_visible()
    expect(delivery).to_contain_text("2 attempts")
    first, again = web.sink.at(path)
    assert first.headers["webhook-id"] == again.headers["webhook-id"]


# --- the list --------------------------------------------------------------------------------


def test_the_jobs_list_filters_by_prompt_model_and_status_and_shows_a_tenant_its_own(
    web: Web, open_page: Any
) -> None:
    tag = uuid.uuid4().hex[:8]
    whale = web.submit(
        ALICE,
        prompt=f"a blue whale {tag}",
        fake_seconds=0.05,
        override_settings={"sd_model_checkpoint": MODEL},
    )
    cat = web.submit(ALICE, prompt=f"a sleeping cat {tag}", fake_seconds=0.05)
    bobs = web.submit(BOB, prompt=f"bob's blue whale {tag}", fake_seconds=0.05)
    for job_id in (whale, cat, bobs):
        web.wait_status(job_id, "completed")
    page = open_page(ALICE)
    page.goto(f"{web.base}/ui/#/jobs")
    rows = page.locator(".job-list > li")
    page.get_by_label("Prompt contains").fill(tag)
    expect(rows).to_have_count(2)
    assert rows.evaluate_all("rows => rows.map(r => r.dataset.id)") == [cat, whale]
    expect(page).to_have_url(re.compile(f"prompt={tag}"))
    page.get_by_label("Model").select_option(MODEL)
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("a blue whale")
    page.get_by_label("Model").select_option("")
    page.get_by_label("Prompt contains").fill(f"whale {tag}")
    expect(rows).to_have_count(1)
    page.get_by_label("Status").select_option("canceled")
    expect(rows).to_have_count(0)
    expect(page.get_by_text("No jobs match.")).to_be_visible()

    # The address keeps the filters; an admin sees every tenant's jobs.
    admin = open_page(OPS)
    admin.goto(f"{web.base}/ui/#/jobs?prompt=whale+{tag}")
    expect(admin.locator(".job-list > li")).to_have_count(2)
    expect(admin.locator(f'li[data-id="{bobs}"]')).to_contain_text("by bob")


# --- as code ---------------------------------------------------------------------------------


def test_the_copied_curl_and_python_make_the_same_job_again(
    web: Web, open_page: Any, tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:8]
    original = web.submit(ALICE, prompt=f"a snippet {tag}", seed=7, steps=4, fake_seconds=0.05)
    web.wait_status(original, "completed")
    page = open_page(ALICE)
    page.goto(f"{web.base}/ui/#/jobs/{original}")
    snippets = page.locator("details.snippet")
    expect(snippets).to_have_count(2)
    curl, python = (snippets.nth(n).locator("pre").text_content() or "" for n in range(2))
    env = {"PATH": "/usr/bin:/bin", "A1111_PROXY_TOKEN": ALICE}

    made = subprocess.run(
        [sys.executable, "-c", python], cwd=tmp_path, env=env, capture_output=True, timeout=120
    )
    assert made.returncode == 0, made.stderr.decode()
    assert (tmp_path / "image-0.png").is_file()
    if shutil.which("curl"):
        answer = subprocess.run(["bash", "-c", curl], env=env, capture_output=True, timeout=60)
        assert answer.returncode == 0, answer.stderr.decode()
        again = web.job(ALICE, json.loads(answer.stdout)["id"])
        assert again["request"] == web.job(ALICE, original)["request"]
    with web.client(ALICE) as client:
        listed = client.get("/sdapi/v1/jobs", params={"prompt": tag}).json()["jobs"]
    by_python = [job for job in listed if job["id"] != original and job["request"].get("seed") == 7]
    assert by_python, "the Python call made no job with the same seed"


# --- models ---------------------------------------------------------------------------------


def test_models_show_what_civitai_says_and_only_an_admin_is_offered_a_refresh(
    web: Web, open_page: Any
) -> None:
    def enriched() -> bool:
        with web.client(ALICE) as client:
            listed = client.get("/sdapi/v1/sd-models").json()  # 503 before the first fetch
        return isinstance(listed, list) and "civitai" in listed[0]

    wait_for(enriched, timeout=60, what="the worker to ask the fake Civitai")
    page = open_page(ALICE)
    page.goto(f"{web.base}/ui/#/models")
    card = page.locator(".models > li").first
    for text in ("fake-model", "Fake Checkpoint · v1.0", "SD 1.5", "fakestyle", "f4ce0f4ce0"):
        expect(card).to_contain_text(text)
    expect(page.get_by_role("button", name="Refresh models")).to_be_hidden()
    page.get_by_label("Filter models").fill("fakestyle")
    expect(card).to_be_visible()
    page.get_by_label("Filter models").fill("no such model")
    expect(card).to_be_hidden()
    page.goto(f"{web.base}/ui/#/new")
    page.get_by_label("Model", exact=True).select_option(MODEL)
    expect(page.locator(".model-info")).to_contain_text("Fake Checkpoint · v1.0 (SD 1.5)")

    admin = open_page(OPS)
    admin.goto(f"{web.base}/ui/#/models")
    refresh = admin.get_by_role("button", name="Refresh models")
    refresh.click()
    expect(admin.get_by_text("Asked the workers to rescan their models")).to_be_visible()
    expect(refresh).to_be_enabled()  # the lists were fetched again and shown
    expect(admin.locator(".models > li").first).to_contain_text("Fake Checkpoint")


# --- every page: names, phones, dark ---------------------------------------------------------

# The controls on screen that have no accessible name (a label, aria-label, or their text).
UNNAMED = """() => [...document.querySelectorAll('input, select, textarea, button, a[href]')]
  .filter(el => el.getClientRects().length)
  .filter(el => !(el.getAttribute('aria-label')
    || [...(el.labels || [])].map(l => l.textContent).join('').trim()
    || (['BUTTON', 'A'].includes(el.tagName) && el.textContent.trim())))
  .map(el => el.outerHTML.slice(0, 120))"""

PAGES = {
    "#/queue": ".counts .count-list",
    "#/jobs": ".job-list > li",
    "#/new": "select[name=sampler_name] option:nth-child(2)",
    "#/models": ".models",
    "#/backends": ".backends",
}


def test_every_page_names_its_controls_fits_a_phone_and_follows_a_dark_system_theme(
    web: Web, open_page: Any
) -> None:
    job_id = web.submit(OPS, prompt="a page to look at", fake_seconds=0.05)
    web.wait_status(job_id, "completed")
    pages = {**PAGES, f"#/jobs/{job_id}": "figure img"}
    for viewport in ({"width": 1200, "height": 900}, {"width": 375, "height": 740}):
        page = open_page(OPS, viewport=viewport, color_scheme="dark")
        for route, ready in pages.items():
            page.goto(f"{web.base}/ui/{route}")
            page.wait_for_selector(ready, state="attached")
            assert page.evaluate(UNNAMED) == [], route
            overflow = page.evaluate("document.documentElement.scrollWidth - innerWidth")
            assert overflow <= 0, f"{route} is {overflow} px wider than {viewport['width']}"
        background = page.evaluate("getComputedStyle(document.documentElement).backgroundColor")
        assert background == "rgb(17, 20, 24)"
        page.reload()
        page.keyboard.press("Tab")  # the first stop skips to the content
        assert page.evaluate("document.activeElement.textContent") == "Skip to content"
