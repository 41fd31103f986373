"""The README and docs/: a short README, a configuration page that matches `Settings`, every
route in the API page, and links that lead somewhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from starlette.routing import Mount, Route

from a1111_proxy import settings_doc
from a1111_proxy.routes import ROUTES
from a1111_proxy.settings import Settings
from tests.servers import ROOT

DOCS = ROOT / "docs"
CONFIGURATION = DOCS / "configuration.md"
README_LIMIT = 10 * 1024
PATH_CHARS = r"[\w/{}.-]"
ANY_METHOD = {"GET", "POST", "PUT", "PATCH", "DELETE"}  # a catch-all route takes them all


def test_the_readme_stays_at_most_10_kb() -> None:
    size = len((ROOT / "README.md").read_bytes())
    assert size <= README_LIMIT, (
        f"README.md is {size} bytes, over {README_LIMIT}: move reference text into docs/ "
        "and link to it"
    )


def test_the_configuration_page_is_what_make_docs_generates_from_settings() -> None:
    text = CONFIGURATION.read_text(encoding="utf-8")
    assert text == settings_doc.updated(text), (
        f"docs/configuration.md is stale: run {settings_doc.REGENERATE}"
    )


def test_every_setting_has_a_description_for_the_configuration_page() -> None:
    missing = [name for name, info in Settings.model_fields.items() if not info.description]
    assert not missing, f"give these Settings fields a description=: {missing}"


@pytest.mark.parametrize("name", list(Settings.model_fields))
def test_every_setting_has_a_row_in_the_configuration_page(name: str) -> None:
    text = CONFIGURATION.read_text(encoding="utf-8")
    start = f"| `{settings_doc.env_name(name)}` |"
    row = next((line for line in text.splitlines() if line.startswith(start)), None)
    assert row is not None, f"no row for {settings_doc.env_name(name)} in docs/configuration.md"
    description = Settings.model_fields[name].description or ""
    assert description.replace("|", "\\|") in row


def test_the_generator_reports_a_stale_page_naming_the_command_then_rewrites_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    page = tmp_path / "configuration.md"
    page.write_text(f"intro\n\n{settings_doc.BEGIN}\n| old |\n{settings_doc.END}\noutro\n")

    assert settings_doc.main([str(page), "--check"]) == 1
    assert "make docs" in capsys.readouterr().err
    assert settings_doc.main([str(page)]) == 0
    assert settings_doc.main([str(page), "--check"]) == 0
    text = page.read_text()
    assert text.startswith("intro\n\n") and text.endswith(f"{settings_doc.END}\noutro\n")
    assert "| old |" not in text and "`A1111_PROXY_DATABASE_URL`" in text


def test_the_generator_refuses_a_page_without_its_markers(tmp_path: Path) -> None:
    page = tmp_path / "configuration.md"
    page.write_text("no markers here\n")
    with pytest.raises(ValueError, match="markers"):
        settings_doc.main([str(page)])


def _generic(path: str) -> str:
    """`/jobs/{job_id}/images/{n:int}` and `/jobs/{id}/images/{n}` read the same."""
    return re.sub(r"\{[^}]*\}", "{}", path)


def _named(needle: str, text: str) -> bool:
    pattern = f"(?<!{PATH_CHARS}){re.escape(needle)}(?!{PATH_CHARS})"
    return re.search(pattern, text) is not None


def _route_names() -> list[str]:
    """What docs/api.md must say for each route: `METHOD /path` (the path alone for a mount or
    a catch-all that takes any method)."""
    names = []
    for route in ROUTES:
        path = _generic(route.path)
        methods = set(route.methods or ()) - {"HEAD"} if isinstance(route, Route) else set()
        if isinstance(route, Mount) or methods >= ANY_METHOD:
            names.append(path)
        else:
            names += [f"{method} {path}" for method in sorted(methods)]
    return names


@pytest.mark.parametrize("name", _route_names())
def test_every_route_is_named_in_the_api_page(name: str) -> None:
    text = _generic((DOCS / "api.md").read_text(encoding="utf-8"))
    assert _named(name, text), f"docs/api.md does not name `{name}`: add it to 'Every route'"


def test_a_route_missing_from_the_page_is_noticed() -> None:
    assert _named("GET /sdapi/v1/jobs/{}", "`GET /sdapi/v1/jobs/{}`")
    assert not _named("GET /sdapi/v1/jobs", "`GET /sdapi/v1/jobs/{}`")
    assert not _named("/sdapi/v1/{}", "`GET /sdapi/v1/jobs/{}`")


def _outside_code(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def _anchors(page: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", _outside_code(page.read_text(encoding="utf-8")), re.M)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def _relative_links() -> list[tuple[str, str]]:
    links = []
    for page in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]:
        text = _outside_code(page.read_text(encoding="utf-8"))
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if not re.match(r"[a-z]+:", target):
                links.append((str(page.relative_to(ROOT)), target))
    return links


@pytest.mark.parametrize(("page", "target"), _relative_links())
def test_every_relative_link_leads_to_a_file_and_heading_that_exist(page: str, target: str) -> None:
    file, _, anchor = target.partition("#")
    destination = (ROOT / page).parent / file if file else ROOT / page
    assert destination.is_file(), f"{page} links to {target}: no such file"
    if anchor:
        assert anchor in _anchors(destination), f"{page} links to {target}: no such heading"
