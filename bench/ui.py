"""The web UI's budget: the jobs page's first meaningful paint with 100,000 stored jobs, and the
screenshots in docs/images. Prints figures, asserts nothing.

paint   Stores N jobs (100,000 by default; bench/load.py's seed_jobs, rows inserted from the
        table metadata, plus a small image for each completed job among the newest 1,000), starts
        the API (`a1111-proxy serve`, default settings, tokens off, no worker), and loads
        /ui/#/jobs in headless Chromium (playwright, the system's Chromium) R times, each in a
        fresh browser context (an empty cache: the page, its modules and the first page of jobs
        are all fetched). The first meaningful paint is when the first job row's text was painted
        (Element Timing, `elementtiming` on that row), from the navigation's start. Also printed:
        first contentful paint, when the page's own `jobs-painted` mark was set, and when the
        answer to GET /sdapi/v1/jobs ended. Target: <= 300 ms.
shots   A deployment with BACKEND=fake (2 slots) and a worker: a few jobs done, two running and
        some waiting; saves the queue page and a job's page as ui-queue.png and ui-job.png in
        --shots-dir (docs/images).

Run: `.venv/bin/python bench/ui.py [--only paint,shots] [--jobs 100000] [--runs 10]`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import ROOT, clean_environ, deployment, section  # first: puts the repo on sys.path
from load import seed_jobs, sync_engine
from sqlalchemy import insert, select

from a1111_proxy.backends.fake import tiny_png
from a1111_proxy.db.tables import job_images, jobs
from tests.servers import wait_for

CHROMIUM = (
    shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
)
BUDGET_MS = 300

# What the page measured, once its first page of jobs is painted.
TIMINGS = """async () => {
  const rows = await new Promise((resolve) => {
    new PerformanceObserver((list) => resolve(list.getEntries()))
      .observe({ type: "element", buffered: true });
  });
  const at = (name) => performance.getEntriesByName(name)[0];
  const jobs = performance.getEntriesByType("resource")
    .find((r) => r.name.includes("/sdapi/v1/jobs?"));
  return {
    fmp: Math.max(...rows.map((e) => e.renderTime || e.loadTime)),
    fcp: at("first-contentful-paint")?.startTime,
    mark: at("jobs-painted")?.startTime,
    html: performance.getEntriesByType("navigation")[0].responseEnd,
    jobs: jobs?.responseEnd,
    jobs_request_ms: jobs ? jobs.responseEnd - jobs.requestStart : null,
  };
}"""


def add_images(database_url: str, newest: int = 1000) -> int:
    """A small image for each completed job among the newest `newest` (seed_jobs stores none)."""
    engine = sync_engine(database_url)
    try:
        with engine.begin() as conn:
            seqs = conn.execute(
                select(jobs.c.seq)
                .where(jobs.c.status == "completed")
                .order_by(jobs.c.seq.desc())
                .limit(newest)
            ).scalars()
            rows = [{"job_seq": seq, "n": 0, "data": tiny_png(f"bench {seq}", 32)} for seq in seqs]
            conn.execute(insert(job_images), rows)
    finally:
        engine.dispose()
    return len(rows)


def part_paint(root: Path, args: argparse.Namespace) -> None:
    from playwright.sync_api import sync_playwright

    section(f"paint: /ui/#/jobs with {args.jobs:,} jobs stored, {args.runs} cold loads")

    def seed(database_url: str) -> None:
        t0 = time.perf_counter()
        counts = seed_jobs(database_url, args.jobs)
        images = add_images(database_url)
        took = time.perf_counter() - t0
        print(f"  stored {args.jobs:,} jobs ({counts}) and {images} images in {took:.1f} s")

    with (
        deployment(root, "paint", log_level=args.log_level, seed=seed) as d,
        sync_playwright() as p,
    ):
        browser = p.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            results = [load_jobs_page(browser, d.api_url) for _ in range(args.runs + 1)][1:]
        finally:
            browser.close()
    for name, label in [
        ("fmp", "first meaningful paint (first job row painted)"),
        ("fcp", "first contentful paint"),
        ("mark", "the page's jobs-painted mark"),
        ("jobs", "GET /sdapi/v1/jobs answered"),
        ("jobs_request_ms", "  of which the request itself"),
        ("html", "the page's HTML received"),
    ]:
        values = [r[name] for r in results if r[name] is not None]
        print(f"  {label:<48} p50 {statistics.median(values):6.0f} ms   max {max(values):6.0f} ms")
    fmp = statistics.median(r["fmp"] for r in results)
    verdict = "within" if fmp <= BUDGET_MS else "OVER"
    print(f"  => first meaningful paint p50 {fmp:.0f} ms: {verdict} the {BUDGET_MS} ms budget")
    print(
        f"  (load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}, {os.cpu_count()} CPUs)"
    )


def load_jobs_page(browser: Any, base: str) -> dict[str, float]:
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    try:
        page = context.new_page()
        page.goto(f"{base}/ui/#/jobs")
        page.wait_for_function("() => performance.getEntriesByName('jobs-painted').length")
        return dict(page.evaluate(TIMINGS))
    finally:
        context.close()


# --- screenshots ----------------------------------------------------------------------------

PROMPTS = [
    "a lighthouse at dusk, volumetric light, highly detailed",
    "a red fox in fresh snow, morning light, 85mm",
    "isometric city block at night, neon signs, rain",
    "an astronaut reading in a greenhouse, film grain",
    "a bowl of ramen, studio photo, steam",
]


def part_shots(root: Path, args: argparse.Namespace) -> None:
    from playwright.sync_api import sync_playwright

    out = Path(args.shots_dir)
    out.mkdir(parents=True, exist_ok=True)
    section(f"shots: the queue and a job's page, into {out}")
    env = {
        "A1111_PROXY_BACKEND": "fake",
        "A1111_PROXY_FAKE_SLOTS": "2",
        "A1111_PROXY_FAKE_SECONDS": "60",
        "A1111_PROXY_PROGRESS_SECONDS": "0.2",
    }
    with (
        deployment(root, "shots", log_level=args.log_level, workers=1, env=env) as d,
        sync_playwright() as p,
    ):
        api = d.stack.api
        assert api is not None
        done = [
            submit(
                api,
                prompt=prompt,
                seed=1000 + i,
                steps=28,
                batch_size=4 if i == 0 else 2,
                cfg_scale=6.5,
                sampler_name="DPM++ 2M",
                scheduler="karras",
                width=768,
                height=512,
                fake_seconds=1.5,
                override_settings={"sd_model_checkpoint": "fake-model.safetensors [f4ce0f4ce0]"},
            )
            for i, prompt in enumerate(PROMPTS[:3])
        ]
        for job_id in done:
            d.stack.wait_status(job_id, "completed", timeout=60)
        for prompt in PROMPTS[3:]:
            submit(api, prompt=prompt, steps=30)
        for n in range(4):
            submit(
                api,
                prompt=f"{PROMPTS[n]}, variation {n + 1}",
                priority=1 if n == 0 else 0,
                fake_seconds=30,
            )
        wait_for(
            lambda: len(running(api)) == 2 and all(j["progress"] > 0.2 for j in running(api)),
            timeout=60,
            what="two jobs well under way",
        )
        browser = p.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 720})
            page.goto(f"{d.api_url}/ui/#/queue")
            page.wait_for_selector("article.slot img.preview:not([hidden])")
            page.wait_for_timeout(1500)  # a few progress events in
            page.screenshot(path=out / "ui-queue.png")
            page.goto(f"{d.api_url}/ui/#/jobs/{done[0]}")
            page.wait_for_function(
                "() => [...document.querySelectorAll('figure img')].every(i => i.naturalWidth)"
            )
            page.set_viewport_size({"width": 1100, "height": 1100})
            page.screenshot(path=out / "ui-job.png")
        finally:
            browser.close()
    for name in ("ui-queue.png", "ui-job.png"):
        print(f"  {out / name}: {(out / name).stat().st_size / 1024:.0f} KiB")


def submit(api: Any, **body: Any) -> str:
    answer = api.post("/sdapi/v1/txt2img", json=body)
    assert answer.status_code == 202, answer.text
    return str(answer.json()["id"])


def running(api: Any) -> list[dict[str, Any]]:
    return list(api.get("/sdapi/v1/queue").json()["running"])


PARTS = {"paint": part_paint, "shots": part_shots}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only", default="paint", help=f"parts to run: {','.join(PARTS)} (default paint)"
    )
    parser.add_argument("--jobs", type=int, default=100_000, help="jobs stored (paint)")
    parser.add_argument("--runs", type=int, default=10, help="cold page loads measured (paint)")
    parser.add_argument("--shots-dir", default=str(ROOT / "docs" / "images"), help="where shots go")
    parser.add_argument("--log-level", default="warning", help="A1111_PROXY_LOG_LEVEL")
    args = parser.parse_args(argv)
    if CHROMIUM is None:
        print("no Chromium found (install one, e.g. `apt-get install chromium`)", file=sys.stderr)
        return 2
    clean_environ()
    root = Path(tempfile.mkdtemp(prefix="a1111-proxy-bench-ui-"))
    try:
        for name in args.only.split(","):
            PARTS[name.strip()](root, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
