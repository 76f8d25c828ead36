"""The package is layered: no module imports (even lazily, inside a function) anything that imports it back.

Units are the top-level modules and subpackages of ``lightning_unlearn`` (``config``, ``federated``, ...);
imports within one unit do not count. A cycle between units is a module importing a higher layer.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_unlearn"


def unit_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "lightning_unlearn" and len(parts) > 1 else None


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        unit = unit_of(module) or "__init__"
        if module == "lightning_unlearn":
            unit = "__init__"
        targets = graph.setdefault(unit, set())
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                target = unit_of(name)
                if target and target != unit:
                    targets.add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_unit_imports_a_higher_layer():
    graph = import_graph()
    assert {"config", "federated", "evidence", "callbacks", "_io"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_lowest_layer_imports_nothing_of_the_package():
    graph = import_graph()
    for low in ("_io", "request", "config"):
        assert graph.get(low, set()) == set(), (low, graph.get(low))


def test_the_settings_are_a_leaf_every_step_builds_on():
    """``config`` imports no other unit (its validators live in it); the steps of the flow sit above it in order."""
    graph = import_graph()
    assert graph["config"] == set()
    for unit in ("scoring", "mask", "reset", "repair", "orchestration", "callbacks"):
        assert "config" in _reachable(graph, unit), unit
    assert "callbacks" not in _reachable(graph, "orchestration")
    assert "orchestration" in _reachable(graph, "callbacks")


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_a_cycle_is_found():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
