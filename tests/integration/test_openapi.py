"""Swagger UI at /doc, and fuzzing the running server against the OpenAPI document. The document
itself is checked in tests/unit/test_openapi.py."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from a1111_proxy.app import create_app
from a1111_proxy.migrate import upgrade
from a1111_proxy.openapi import OPERATIONS
from a1111_proxy.settings import Settings
from tests.servers import serve


@pytest.fixture(scope="module")
def live_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('fuzz')}/jobs.db"
    upgrade(url)
    app_settings = Settings(
        _env_file=None,
        database_url=url,
        wait_seconds_max=0.05,  # type: ignore[call-arg]
        max_body_bytes=2_000_000,
    )
    with serve(create_app(app_settings)) as base:
        yield base


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def test_no_input_makes_the_server_fail_or_answer_off_the_document(live_api: str) -> None:
    """schemathesis against the running server: about 12 generated requests per operation
    (valid and invalid bodies, parameters and headers). No 5xx; every answer as documented."""
    schema = schemathesis.openapi.from_url(f"{live_api}/openapi.json")
    for result in schema.get_all_operations():
        operation = result.ok()
        documented = operation.definition.raw["responses"]
        # A documented 503 (/health with no worker) is an answer, not a failure.
        checks = CHECKS if not any(c.startswith("5") for c in documented) else CHECKS[1:]

        try:
            _fuzz(operation, checks)
        except Exception as exc:
            raise AssertionError(f"{operation.method.upper()} {operation.path}: {exc}") from exc


def _fuzz(operation: schemathesis.APIOperation, checks: list) -> None:  # type: ignore[type-arg]
    @given(case=operation.as_strategy())
    @settings(
        max_examples=20, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    def fuzz(case: schemathesis.Case) -> None:
        case.call_and_validate(checks=checks)

    fuzz()


def test_swagger_ui_is_served_from_local_assets(live_api: str) -> None:
    page = httpx.get(f"{live_api}/doc")
    assert page.status_code == 200 and "/doc/static/swagger-ui-bundle.js" in page.text
    assert "http" not in page.text.split("<body>")[1].replace("/openapi.json", "")  # no CDN
    bundle = httpx.get(f"{live_api}/doc/static/swagger-ui-bundle.js")
    assert bundle.status_code == 200 and len(bundle.content) > 100_000


def _chromium() -> str | None:
    return (
        shutil.which("chromium")
        or shutil.which("chromium-browser")
        or shutil.which("google-chrome")
    )


@pytest.mark.skipif(
    _chromium() is None,
    reason="no headless Chromium on this machine "
    "(install one, e.g. `apt-get install chromium`, to run the Swagger UI browser test)",
)
def test_swagger_ui_lists_the_operations_and_a_txt2img_try_out_returns_a_job(
    live_api: str, tmp_path: Path
) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=_chromium(),
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            page = browser.new_page()
            page.goto(f"{live_api}/doc")
            page.wait_for_selector("#operations-generation-post_sdapi_v1_txt2img", timeout=20_000)
            assert page.locator(".opblock").count() == len(OPERATIONS)
            page.click("#operations-generation-post_sdapi_v1_txt2img .opblock-summary")
            # "Try it out" is on from the start (tryItOutEnabled): fill the body and execute.
            page.fill(
                "#operations-generation-post_sdapi_v1_txt2img textarea.body-param__text",
                json.dumps({"prompt": "from the browser", "steps": 4}),
            )
            page.click("#operations-generation-post_sdapi_v1_txt2img .execute")
            status = page.locator(
                "#operations-generation-post_sdapi_v1_txt2img .live-responses-table tbody "
                ".response-col_status"
            ).first
            status.wait_for(timeout=20_000)
            assert status.inner_text().strip() == "202"
        finally:
            browser.close()
    jobs = httpx.get(f"{live_api}/sdapi/v1/jobs").json()["jobs"]
    assert any(job["request"].get("prompt") == "from the browser" for job in jobs)
