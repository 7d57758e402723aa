"""The import graph of the bailong package has no cycle, at two grains.

Every ``import`` counts, including those inside functions (a deferred import is still a dependency). Module
grain: no module reaches itself. Package grain (``bailong.data``, ``bailong.eval``, ``bailong.stages``, each
top-level module on its own): no package reaches itself, leaving out command-line entry points (``__main__``
modules), which may import the composition root ``bailong.config`` that imports every package's schema. And
no module imports an entry point.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "bailong"


def module_files() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imported_modules(path: Path, modules: dict[str, Path]) -> set[str]:
    """The bailong modules ``path`` imports: ``from a.b import c`` is module ``a.b.c`` when that is a module."""

    def known(name: str) -> str:
        while name not in modules:  # an attribute of a module: the module
            name = name.rpartition(".")[0]
        return name

    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {known(a.name) for a in node.names if a.name.split(".")[0] == "bailong"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "bailong":
            found |= {
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else known(node.module)
                for a in node.names
            }
    return found


def module_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imported_modules(path, modules) - {name} for name, path in modules.items()}


def package_of(module: str) -> str:
    return ".".join(module.split(".")[:2])


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    packages: dict[str, set[str]] = {}
    for module, imports in graph.items():
        if module.endswith(".__main__"):
            continue
        packages.setdefault(package_of(module), set()).update(package_of(m) for m in imports)
    return {p: deps - {p} for p, deps in packages.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each strongly connected component with more than one node (Tarjan), its members sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_deferred_and_from_imports():
    graph = module_graph()
    assert "bailong.data.windows" in graph["bailong.eval.bpc"]  # from bailong.data.windows import ...
    assert "bailong.stages.common" in graph["bailong.stages.pretrain"]
    assert "bailong.summary" in graph["bailong.stages.common"]  # imported inside finish_run


def test_no_module_import_cycle():
    assert cycles(module_graph()) == []


def test_no_package_import_cycle():
    assert cycles(package_graph(module_graph())) == []


@pytest.mark.parametrize("entry", sorted(m for m in module_files() if m.endswith(".__main__")))
def test_no_module_imports_an_entry_point(entry):
    importers = sorted(m for m, imports in module_graph().items() if entry in imports)
    assert importers == [], f"{entry} is a command-line entry point; move what {importers} need out of it"
