"""The engine's module structure: its import graph has no cycle (plain Python, no torch)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "a1111_proxy.engine"
ROOT = Path(__file__).resolve().parents[2] / "a1111_proxy" / "engine"


def _module_names() -> dict[Path, str]:
    names = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[path] = ".".join((PACKAGE, *parts))
    return names


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The absolute names an import statement may load: `from X import a` counts X and X.a."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = module if is_package else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        base = base.rpartition(".")[0]
    source = node.module or ""
    if node.level:
        source = f"{base}.{source}" if source else base
    return [source, *(f"{source}.{alias.name}" for alias in node.names)]


def import_graph() -> dict[str, set[str]]:
    """Engine module -> the engine modules it imports, at any level (inside functions too)."""
    names = _module_names()
    known = set(names.values())
    graph: dict[str, set[str]] = {}
    for path, module in names.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        edges = graph.setdefault(module, set())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                found = _imported(node, module, path.name == "__init__.py")
                edges.update(name for name in found if name in known and name != module)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None when the graph is acyclic."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return None
        path.append(node)
        for target in sorted(graph.get(node, ())):
            cycle = visit(target)
            if cycle is not None:
                return cycle
        path.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = visit(start)
        if cycle is not None:
            return cycle
    return None


def test_the_engine_modules_import_each_other_without_a_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, (
        "import cycle inside the engine: "
        + " -> ".join(cycle or [])
        + " (function-level imports count; move what both sides need into a leaf module, "
        "as the errors live in engine/errors.py)"
    )


def test_the_import_graph_sees_imports_at_every_level_and_in_every_form() -> None:
    graph = import_graph()
    assert f"{PACKAGE}.lora" in graph[f"{PACKAGE}.params"]  # from a1111_proxy.engine import x
    assert f"{PACKAGE}.catalog" in graph[f"{PACKAGE}.lora"]  # from a1111_proxy.engine.x import y
    assert f"{PACKAGE}.preprocessors" in graph[f"{PACKAGE}.detect"]  # inside a function


def test_the_engine_errors_module_is_a_leaf() -> None:
    assert import_graph()[f"{PACKAGE}.errors"] == set()


@pytest.mark.parametrize(
    ("graph", "cycle"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
        ({"a": {"a"}}, ["a", "a"]),
    ],
)
def test_find_cycle_names_the_modules_of_a_cycle(
    graph: dict[str, set[str]], cycle: list[str] | None
) -> None:
    assert find_cycle(graph) == cycle
