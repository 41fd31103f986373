"""The web UI's files (a1111_proxy/ui/static): shipped in the package, loading nothing from another
origin (it works air-gapped), ES modules that import only each other, all preloaded by the page,
and never writing data into the page as HTML."""

from __future__ import annotations

import re
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UI = ROOT / "a1111_proxy" / "ui"
STATIC = UI / "static"
FILES = sorted(p for p in STATIC.rglob("*") if p.is_file())
MODULES = sorted(STATIC.glob("js/*.js"))
SVG_NAMESPACE = "http://www.w3.org/2000/svg"  # a name, never fetched


def test_the_package_data_ships_every_file_of_the_ui() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["a1111_proxy.ui"]
    missing = [
        str(path.relative_to(UI))
        for path in FILES
        if not any(fnmatch(path.relative_to(UI).as_posix(), glob) for glob in globs)
    ]
    assert not missing, f"add these to [tool.setuptools.package-data] in pyproject.toml: {missing}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_no_file_refers_to_another_origin(path: Path) -> None:
    text = path.read_text(encoding="utf-8").replace(SVG_NAMESPACE, "")
    assert not re.search(r"https?://|(src|href)=\"//", text), f"{path.name} names another origin"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_modules_import_only_modules_of_the_ui_that_exist(path: Path) -> None:
    for target in re.findall(r"^import .*? from \"([^\"]+)\";$", path.read_text(), re.M | re.S):
        assert target.startswith("./") and (path.parent / target).is_file(), target


def test_the_page_loads_main_which_loads_each_page_and_preloads_what_the_first_needs() -> None:
    page = (STATIC / "index.html").read_text()
    loaded = set(re.findall(r"assets/\{\{version\}\}/js/([\w.]+\.js)", page))
    assert {"main.js", "jobs.js"} <= loaded
    jobs = (STATIC / "js" / "jobs.js").read_text()
    assert set(re.findall(r'from "\./([\w.]+)";', jobs)) <= loaded  # no waterfall on /ui/
    main = (STATIC / "js" / "main.js").read_text()
    lazily = set(re.findall(r'import\("\./([\w.]+)"\)', main))
    imported = {name for m in MODULES for name in re.findall(r'from "\./([\w.]+)";', m.read_text())}
    assert loaded | lazily | imported == {path.name for path in MODULES}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_no_module_writes_html_from_strings(path: Path) -> None:
    """Job prompts, errors and model names are text: elements are built with dom.h."""
    text = path.read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in text, f"{path.name} uses {sink}"
