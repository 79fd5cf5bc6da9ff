"""The package's structure: subpackages by concern on floors, a lower floor never importing a higher one (even inside a
function), no import cycles between modules, and short functions."""

import ast
from pathlib import Path

import isocompress

PACKAGE = Path(isocompress.__file__).parent

# Each subpackage's floor: a module may import its own floor or a lower one, never a higher one. The top-level
# modules (the lazy __init__ and the `isocompress.nn` alias) stand above everything.
FLOORS = {
    "core": 0,
    "formats": 1,
    "exact": 2, "bounds": 2, "export": 2,
    "prune": 3,
    "api": 4,
    "check": 5, "train": 5,
    "cli": 6,
}
TOP_FLOOR = 7


def module_name(path: Path) -> str:
    """'core.model' for isocompress/core/model.py, 'cli' for isocompress/cli/__init__.py, 'nn' for isocompress/nn.py."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py") if module_name(p)}


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """isocompress modules imported anywhere in `path` (top level or inside functions), as module names."""
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "isocompress":
            base = node.module.removeprefix("isocompress").lstrip(".")
            for alias in node.names:
                name = f"{base}.{alias.name}" if base else alias.name
                deps.add(name if name in known else base)
        elif isinstance(node, ast.Import):
            deps |= {a.name.removeprefix("isocompress.") for a in node.names if a.name.startswith("isocompress.")}
    return {d for d in deps if d in known}


def import_graph() -> dict[str, set[str]]:
    found = modules()
    return {m: imported_modules(p, set(found)) - {m} for m, p in found.items()}


def floor(module: str) -> int:
    return FLOORS.get(module.split(".")[0], TOP_FLOOR) if "." in module or module in FLOORS else TOP_FLOOR


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """'a → b' for every import of a higher floor's module."""
    return sorted(f"{m} → {d}" for m, deps in graph.items() for d in deps if floor(d) > floor(m))


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
    assert "api.shrink" in graph and "prune.budget" in graph and "cli" in graph  # the graph was really read
    assert graph["cli"] >= {"cli.base", "cli.shrink"}
    assert find_cycle(graph) is None, f"import cycle: {' → '.join(find_cycle(graph))}"


def test_every_subpackage_has_a_floor_and_no_module_is_left_flat():
    found = modules()
    packages = {m.split(".")[0] for m in found if "." in m}
    assert packages == set(FLOORS), f"subpackages without a floor, or floors without a package: {packages ^ set(FLOORS)}"
    flat = sorted(m for m in found if "." not in m and m not in FLOORS)
    assert flat == ["__main__", "nn"], f"top-level modules besides `python -m isocompress` and the nn alias: {flat}"


def test_upward_imports_are_found():
    assert upward_imports({"core.model": {"api.shrink"}, "api.shrink": {"core.model"}}) == ["core.model → api.shrink"]


def test_no_lower_floor_imports_a_higher_one():
    found = upward_imports(import_graph())
    assert found == [], "imports from a lower floor to a higher one: " + "; ".join(found)


MAX_FUNCTION_LINES = 60


def long_functions(path: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """'file:line name (n lines)' for every function (methods and nested ones too) longer than `limit` lines, counted
    from the `def` line to the last line of its body (decorators not counted)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - node.lineno + 1
            if lines > limit:
                found.append(f"{path.name}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_long_functions_are_found(tmp_path):
    body = "\n".join(f"        x{i} = {i}" for i in range(70))
    src = tmp_path / "m.py"
    src.write_text(f"def short():\n    return 1\n\n\nclass C:\n    def long(self):\n{body}\n")
    assert long_functions(src) == ["m.py:6 long (71 lines)"]
    assert long_functions(src, limit=80) == []


def test_no_function_is_over_60_lines():
    found = [f for path in sorted(PACKAGE.rglob("*.py")) for f in long_functions(path)]
    assert found == [], "functions over 60 lines (split them): " + "; ".join(found)


# --- start-up: --help and usage errors do not import torch (issue 12) ------------------------------------------------
RUN_CLI = """
import sys
from isocompress.cli import main
sys.argv = ["isocompress", *sys.argv[1:]]
try:
    main()
except SystemExit as exc:
    code = exc.code
print("torch imported" if "torch" in sys.modules else "torch not imported", code, file=sys.stderr)
"""


def _cli_in_subprocess(*args: str):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", RUN_CLI, *args], capture_output=True, text=True, timeout=120)


def test_importing_the_cli_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, isocompress.cli, isocompress; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


def test_help_and_usage_errors_do_not_import_torch():
    for args, code in [(("--help",), 0), (("shrink", "--help"), 0), (("check", "--help"), 0), (("shrink",), 2),
                       (("shrink", "m.pt", "--budget"), 2), (("check", "--error-measure", "nope"), 2),
                       (("sweep", "--help"), 0), (("sweep",), 2)]:
        out = _cli_in_subprocess(*args)
        assert out.stderr.strip().splitlines()[-1] == f"torch not imported {code}", (args, out.stderr)


def test_a_command_that_computes_does_import_torch(tmp_path):
    """The other side of the test above: the probe notices torch when a command really loads it."""
    out = _cli_in_subprocess("inspect", str(tmp_path / "missing.pt"))
    assert out.stderr.strip().splitlines()[-1] == "torch imported 2", out.stderr


def test_lazy_package_names_still_resolve():
    import isocompress.api.shrink
    import isocompress.core.model

    assert isocompress.shrink_file is isocompress.api.shrink.shrink_file
    assert isocompress.Layer is isocompress.core.model.Layer
    assert set(isocompress.__all__) <= set(dir(isocompress))
    try:
        isocompress.no_such_name  # noqa: B018
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:
        raise AssertionError("an unknown name must raise AttributeError")


def test_the_check_commands_error_measures_are_the_configs():
    from isocompress.check import config as check_config
    from isocompress.cli import check as cli_check

    assert cli_check.ERROR_MEASURES == check_config.MEASURES
