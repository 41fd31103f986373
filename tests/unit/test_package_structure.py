"""The package's structure: every API error lives in a1111_proxy/errors.py, and no module reaches
into another's private names. Read from the source (plain Python, no torch)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("a1111_proxy", "worker")
ERRORS_MODULE = Path("a1111_proxy", "errors.py")


def _modules(root: Path) -> Iterator[tuple[str, Path, ast.Module]]:
    """(dotted name, path relative to root, syntax tree) of every module of the packages."""
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            relative = path.relative_to(root)
            parts = relative.with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            yield ".".join(parts), relative, tree


def _base_names(node: ast.ClassDef) -> set[str]:
    return {
        base.id if isinstance(base, ast.Name) else base.attr
        for base in node.bases
        if isinstance(base, ast.Name | ast.Attribute)
    }


def proxy_errors_elsewhere(root: Path) -> list[str]:
    """Classes deriving from ProxyError (by name, through any chain of subclasses in any
    module) that are defined anywhere but a1111_proxy/errors.py."""
    classes = [
        (path, node)
        for _, path, tree in _modules(root)
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef)
    ]
    errors = {"ProxyError"}
    while more := {node.name for _, node in classes if _base_names(node) & errors} - errors:
        errors |= more
    return [
        f"{path}:{node.lineno} {node.name}"
        for path, node in classes
        if node.name in errors - {"ProxyError"} and path != ERRORS_MODULE
    ]


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _ours(module: str) -> bool:
    return module.split(".")[0] in PACKAGES


def _source(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module a `from ... import` reads from (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    base = module if is_package else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        base = base.rpartition(".")[0]
    return f"{base}.{node.module}" if node.module else base


def private_imports(root: Path) -> list[str]:
    """`from <our module> import _name`, and `<our module>._name` through an imported module."""
    found = []
    for module, path, tree in _modules(root):
        aliases: set[str] = set()  # local names bound to our modules (or names from them)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                source = _source(node, module, path.name == "__init__.py")
                if not _ours(source):
                    continue
                for alias in node.names:
                    if _is_private(alias.name):
                        found.append(f"{path}:{node.lineno} {source}.{alias.name}")
                    aliases.add(alias.asname or alias.name)
            elif isinstance(node, ast.Import):
                aliases.update(
                    alias.asname or alias.name.split(".")[0]
                    for alias in node.names
                    if _ours(alias.name)
                )
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and _is_private(node.attr)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
            ):
                found.append(f"{path}:{node.lineno} {node.value.id}.{node.attr}")
    return found


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def test_every_api_error_class_is_defined_in_the_errors_module() -> None:
    assert proxy_errors_elsewhere(ROOT) == []


def test_no_module_imports_a_private_name_from_another_module() -> None:
    assert private_imports(ROOT) == []


def test_an_api_error_defined_in_a_route_module_is_found_through_its_parents(
    tmp_path: Path,
) -> None:
    _write(
        tmp_path,
        {
            "a1111_proxy/errors.py": "class ProxyError(Exception): ...\n"
            "class JobNotFound(ProxyError): ...\n",
            "a1111_proxy/routes/a1111.py": "from a1111_proxy import errors\n"
            "class Missing(errors.ProxyError): ...\n",
            "worker/x.py": "from a1111_proxy.errors import JobNotFound\n"
            "class Gone(JobNotFound): ...\n"
            "class Fine(Exception): ...\n",
        },
    )
    assert proxy_errors_elsewhere(tmp_path) == [
        "a1111_proxy/routes/a1111.py:2 Missing",
        "worker/x.py:2 Gone",
    ]


def test_a_private_name_taken_from_another_module_is_found_however_it_is_imported(
    tmp_path: Path,
) -> None:
    _write(
        tmp_path,
        {
            "a1111_proxy/__init__.py": "",
            "a1111_proxy/routes/__init__.py": "",
            "a1111_proxy/routes/jobs.py": "def _int_param(): ...\n",
            "a1111_proxy/routes/queue.py": "from a1111_proxy.routes.jobs import _int_param\n"
            "from .jobs import _int_param as p\n"
            "from __future__ import annotations\n",
            "worker/loop.py": "import a1111_proxy.routes.jobs\n"
            "from a1111_proxy.routes import jobs\n"
            "from os import _exit\n"
            "jobs._int_param(); a1111_proxy.routes; jobs.__name__; _exit\n",
        },
    )
    assert sorted(private_imports(tmp_path)) == [
        "a1111_proxy/routes/queue.py:1 a1111_proxy.routes.jobs._int_param",
        "a1111_proxy/routes/queue.py:2 a1111_proxy.routes.jobs._int_param",
        "worker/loop.py:4 jobs._int_param",
    ]
