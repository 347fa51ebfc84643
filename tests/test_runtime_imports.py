"""ssl_runtime's modules import one another without a circle, counting imports inside functions too
(a deferred import hides a circle from Python, not from the reader)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ssl_runtime"
MODULES = {path.stem for path in PACKAGE.glob("*.py")} - {"__init__", "__main__"}


def imported_modules(source: str) -> set[str]:
    """The ssl_runtime modules a module's source imports, wherever the import statement is."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[1] for alias in node.names
                      if alias.name.startswith("ssl_runtime.")}
        elif isinstance(node, ast.ImportFrom):
            if node.level == 1 or node.module == "ssl_runtime":
                base = node.module if node.level == 1 else None
            elif node.level == 0 and (node.module or "").startswith("ssl_runtime."):
                base = node.module.split(".")[1]
            else:
                continue
            found |= {base} if base else {alias.name for alias in node.names}
    return found & MODULES


def import_graph() -> dict[str, set[str]]:
    return {name: imported_modules((PACKAGE / f"{name}.py").read_text()) for name in sorted(MODULES)}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A list of modules [a, b, ..., a] that import each other in a circle, or None."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        for target in sorted(graph.get(node, ())):
            cycle = visit(target, path + [node])
            if cycle:
                return cycle
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = visit(start, [])
        if cycle:
            return cycle
    return None


def test_imports_are_read_at_module_level_and_inside_functions():
    source = ("from . import device as devices\nfrom .errors import UserError\nimport ssl_runtime.knn\n"
              "import torch\n\ndef later():\n    from ssl_runtime import distributed\n"
              "    from ssl_runtime.data import build_loader\n")
    assert imported_modules(source) == {"device", "errors", "knn", "distributed", "data"}


def test_the_cycle_finder_finds_a_circle_and_only_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_ssl_runtime_has_no_import_cycle():
    graph = import_graph()
    assert graph["distributed"] >= {"device", "errors"}  # the graph is really read
    cycle = find_cycle(graph)
    assert cycle is None, "ssl_runtime modules import each other in a circle: " + " -> ".join(cycle)
