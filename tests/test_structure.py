"""The package's import graph has no cycles: a lower floor never imports a higher one (even inside a function)."""

import ast
from pathlib import Path

import isocompress

PACKAGE = Path(isocompress.__file__).parent


def imported_modules(path: Path) -> set[str]:
    """isocompress modules imported anywhere in `path` (top level or inside functions)."""
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "isocompress":
            parts = node.module.split(".")
            deps |= {a.name for a in node.names} if len(parts) == 1 else {parts[1]}
        elif isinstance(node, ast.Import):
            deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("isocompress.")}
    return deps


def import_graph() -> dict[str, set[str]]:
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    return {m: (imported_modules(PACKAGE / f"{m}.py") & modules) - {m} for m in modules}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep, path + [dep])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_find_cycle_detects_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_package_has_no_import_cycles():
    graph = import_graph()
    assert "api" in graph and "prune" in graph  # the graph was really read
    assert find_cycle(graph) is None, f"import cycle: {' → '.join(find_cycle(graph))}"
