"""The package's shape: imports point down a table of layers, nothing imports in a circle, and
modules and functions stay short enough to read (docs/design.md, "Layers")."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "moelora"

# Bottom to top: a module may import from its own layer and the ones below it. The first entry
# whose prefix matches a module's dotted name (after `moelora.`) gives its layer.
LAYERS = [
    ("errors", "log", "paths", "signals", "atomic"),
    ("adapters",),
    ("config",),
    ("data", "modeling", "hardware", "launch"),
    ("evaluate", "analysis", "rundir", "resume", "run_lock"),
    ("train", "export"),
    ("cli", "__main__"),
]
MAX_MODULE_LINES = 300
MAX_FUNCTION_LINES = 40


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    inside = module.removeprefix("moelora").removeprefix(".")
    for level, prefixes in enumerate(LAYERS):
        if any(inside == p or inside.startswith(p + ".") for p in prefixes):
            return level
    raise AssertionError(f"{module} is in no layer; add it to LAYERS")


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package modules `path` imports, at any depth of its code (lazy imports included):
    `from moelora.x import y` counts as moelora.x.y when that is a module, else moelora.x."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("moelora"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in modules else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("moelora")}
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    return {name: imports_of(path, modules) - {name} for name, path in files.items()}


def test_every_import_points_down_the_layers(graph: dict[str, set[str]]) -> None:
    upward = [
        f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
        for module, targets in sorted(graph.items())
        for target in sorted(targets)
        if target != "moelora" and layer_of(target) > layer_of(module)
    ]
    assert upward == []


def test_no_import_circle(graph: dict[str, set[str]]) -> None:
    """A package's `__init__` importing its own modules (to re-export or register them) is not
    a circle; any other path back to a module is."""
    edges = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}

    def reachable(start: str) -> set[str]:
        seen, todo = set(), list(edges[start])
        while todo:
            module = todo.pop()
            if module not in seen:
                seen.add(module)
                todo.extend(edges.get(module, ()))
        return seen

    assert sorted(m for m in edges if m in reachable(m)) == []


def test_modules_and_functions_stay_short() -> None:
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        name = path.relative_to(REPO)
        if text.count("\n") > MAX_MODULE_LINES:
            too_long.append(f"{name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}:{node.lineno} {node.name}: {length} lines")
    assert too_long == []


def test_the_layer_table_names_only_real_modules() -> None:
    """A layer entry that matches nothing is a stale row (a module renamed or removed)."""
    names = {module_name(p).removeprefix("moelora.") for p in PACKAGE.rglob("*.py")}
    stale = [
        prefix
        for prefixes in LAYERS
        for prefix in prefixes
        if not any(n == prefix or n.startswith(prefix + ".") for n in names)
    ]
    assert stale == []
