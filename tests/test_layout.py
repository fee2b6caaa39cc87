"""The layout stays what the README says: small modules, dependencies pointing one way, no import circles.

Imports are read from the source (also those inside functions, where lazy imports hide), so a circle cannot
be smuggled in through a function body.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import ROOT

PACKAGES = ("retrieval", "indexer", "cli", "training", "webui")
MAX_LINES = 400
# Which top-level packages each may import (besides itself): dependencies point down.
ALLOWED = {
    "retrieval": set(),
    "indexer": {"retrieval"},
    "training": {"retrieval"},
    "webui": {"retrieval"},
    "cli": {"retrieval", "indexer", "training", "webui"},
}


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Project modules `path` imports anywhere in its body (a `from pkg import mod` counts as pkg.mod)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".")[: -node.level] if not path.name == "__init__.py" else name.split(".")
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(path, name, set(mods)) for name, path in mods.items()}


def test_no_module_over_400_lines() -> None:
    long = {n: len(p.read_text().splitlines()) for n, p in modules().items()}
    assert {n: k for n, k in long.items() if k > MAX_LINES} == {}


def test_dependencies_point_down() -> None:
    wrong = {(a, b) for a, deps in graph().items() for b in deps
             if b.split(".")[0] != a.split(".")[0] and b.split(".")[0] not in ALLOWED[a.split(".")[0]]}
    assert wrong == set()


def test_no_import_circles() -> None:
    g = graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(g[node]):
            if nxt not in g or nxt == node.rpartition(".")[0] or node == nxt.rpartition(".")[0]:
                continue  # a package and its own submodules (the __init__ re-exporting) are one unit
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for n in sorted(g):
        if n not in state:
            visit(n, [])
    assert cycles == []


def test_the_checker_sees_a_circle(tmp_path: Path) -> None:
    """The import reader itself: both directions of a circle are found, inside functions too."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("def f():\n    from pkg import b\n")
    b.write_text("import pkg.a as a\n")
    known = {"pkg", "pkg.a", "pkg.b"}
    assert imports(a, "pkg.a", known) == {"pkg", "pkg.b"} and imports(b, "pkg.b", known) == {"pkg.a"}
