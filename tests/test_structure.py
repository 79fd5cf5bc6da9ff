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
    found = [f for path in sorted(PACKAGE.glob("*.py")) for f in long_functions(path)]
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
                       (("shrink", "m.pt", "--budget"), 2), (("check", "--error-measure", "nope"), 2)]:
        out = _cli_in_subprocess(*args)
        assert out.stderr.strip().splitlines()[-1] == f"torch not imported {code}", (args, out.stderr)


def test_a_command_that_computes_does_import_torch(tmp_path):
    """The other side of the test above: the probe notices torch when a command really loads it."""
    out = _cli_in_subprocess("inspect", str(tmp_path / "missing.pt"))
    assert out.stderr.strip().splitlines()[-1] == "torch imported 2", out.stderr


def test_lazy_package_names_still_resolve():
    import isocompress.api
    import isocompress.model

    assert isocompress.shrink_file is isocompress.api.shrink_file
    assert isocompress.Layer is isocompress.model.Layer
    assert set(isocompress.__all__) <= set(dir(isocompress))
    try:
        isocompress.no_such_name  # noqa: B018
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:
        raise AssertionError("an unknown name must raise AttributeError")


def test_the_check_commands_error_measures_are_the_configs():
    from isocompress import check_config, cli_check

    assert cli_check.ERROR_MEASURES == check_config.MEASURES
