"""The layering the design promises, read from the source with ``ast`` (nothing is imported).

Rules (issue 15 item 5):

- ``normtool/io`` (bytes, formats, atomic publishing) imports nothing of normtool outside
  ``normtool.io`` and ``normtool.errors``: what a Model, a graph or a history is lives above it.
- normtool's modules import each other without a cycle. Every import statement counts, wherever
  it stands: a function-level import made to dodge a cycle is still a cycle (the design has one
  module depending on another both ways). ``from pkg import name`` is an edge to ``pkg.name``
  when that is a module, else to ``pkg``. A submodule's implicit import of its own package's
  ``__init__`` is not an edge: a package that re-exports its submodules would otherwise be a
  cycle by construction.
- Product code imports no development code (``tests``, ``scripts``, ``devkit``); ``scripts/``
  and ``devkit/`` import nothing from ``tests/`` (what tests and scripts share lives in
  ``devkit``).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "normtool"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> Iterator[tuple[str, list[str], int]]:
    """``(module, [imported names], line)`` for every import statement in ``path``; relative
    imports resolved against the file's package."""
    own = _module_name(path).split(".")
    package = own if path.name == "__init__.py" else own[:-1]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[: len(package) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            yield base, [a.name for a in node.names], node.lineno


def _targets(module: str, names: list[str], known: set[str]) -> set[str]:
    """The normtool modules one import statement depends on."""
    if not names:  # ``import a.b.c``: the deepest known module it names
        while module and module not in known:
            module = module.rpartition(".")[0]
        return {module} if module else set()
    return {f"{module}.{n}" if f"{module}.{n}" in known else module for n in names} & known


def import_graph() -> dict[str, dict[str, int]]:
    """normtool module → {normtool module it imports: line of the (first) import}."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    known = set(files)
    graph: dict[str, dict[str, int]] = {m: {} for m in files}
    for mod, path in files.items():
        for target, names, line in _imports(path):
            if target.split(".")[0] == "normtool":
                for t in _targets(target, names, known) - {mod}:
                    graph[mod].setdefault(t, line)
    return graph


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One cycle ``[a, b, …, a]`` in ``graph``, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if start in state:
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, {}))))
    return None


def _describe(graph: dict[str, dict[str, int]], cycle: list[str]) -> str:
    steps = [f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:], strict=False)]
    return " -> ".join([*steps, cycle[-1]])


def test_cycle_finder_finds_planted_cycles():
    """The check below can fail: a two-step and a self-reaching three-step cycle are found."""
    assert find_cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {}}) is None
    assert find_cycle({"a": {"b": 1}, "b": {"a": 1}}) == ["a", "b", "a"]
    cyc = find_cycle({"x": {"a": 1}, "a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}})
    assert cyc == ["a", "b", "c", "a"]


def test_import_graph_sees_known_edges():
    """The graph is read correctly (so an empty graph cannot pass the rules vacuously):
    module-level, relative-free and function-level imports all appear."""
    graph = import_graph()
    assert len(graph) > 50
    assert "normtool.io.store" in graph["normtool.load"]  # from normtool.io.store import …
    assert "normtool.io.writer" in graph["normtool.commands.common"]  # inside a function
    assert "normtool.commands" in graph["normtool.cli"]  # from normtool.commands import X


def test_normtool_imports_are_acyclic():
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + _describe(graph, cycle)


def test_io_imports_nothing_above_it():
    allowed = ("normtool.io", "normtool.errors")
    bad = [
        f"{mod} imports {target} (line {line})"
        for mod, targets in import_graph().items()
        if mod.startswith("normtool.io")
        for target, line in targets.items()
        if not target.startswith(allowed)
    ]
    assert not bad, "\n".join(bad)


def _foreign_imports(folder: Path, forbidden: set[str]) -> list[str]:
    return [
        f"{path.relative_to(ROOT)}:{line} imports {target}"
        for path in sorted(folder.rglob("*.py"))
        for target, _, line in _imports(path)
        if target.split(".")[0] in forbidden
    ]


#: Modules in tests/ by bare name too: a script that put tests/ on sys.path could import them.
TEST_MODULES = {"tests"} | {p.stem for p in (ROOT / "tests").glob("*.py")}


@pytest.mark.parametrize(
    ("folder", "forbidden"),
    [
        ("normtool", {"tests", "scripts", "devkit", "benchmd", "conftest"}),
        ("scripts", TEST_MODULES),
        ("devkit", TEST_MODULES | {"scripts"}),
    ],
)
def test_no_imports_of_development_code(folder, forbidden):
    assert (ROOT / folder).is_dir()
    bad = _foreign_imports(ROOT / folder, forbidden)
    assert not bad, "\n".join(bad)
