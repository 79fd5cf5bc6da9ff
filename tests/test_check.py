"""`isocompress check` (issue 5): limits from a config or flags, PASS/FAIL rows, JSON, baselines, exit codes.

The shipped recipes run once on the shipped digits model (a real subprocess, module-scoped); everything else uses a
small random model so that it stays fast."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from isocompress.api.recipe import load_recipe
from isocompress.api.shrink import shrink_file
from isocompress.check import run as check
from isocompress.check.run import CheckConfig, CheckSpec, parse_bytes, parse_count, parse_fraction, run_checks
from isocompress.cli import main
from isocompress.core.errors import IsocompressError
from isocompress.core.model import random_model
from isocompress.formats import io

ROOT = Path(__file__).resolve().parents[1]
MODELS, RECIPES = ROOT / "models", ROOT / "recipes"
RESULT_KEYS = {"status", "check", "name", "model", "recipe", "recipe_name", "recipe_version", "metric", "measure",
               "unit", "measured", "limit", "op", "passed", "excess", "excess_percent", "baseline", "change",
               "change_percent", "note", "advice"}


def invoke(args, cwd=None):
    """CliRunner in `cwd` (the config is discovered there)."""
    old = Path.cwd()
    os.chdir(cwd or old)
    try:
        return CliRunner().invoke(main, args, catch_exceptions=False)
    finally:
        os.chdir(old)


def error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("isocompress: error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture
def project(tmp_path):
    """A directory with a small model, its calibration inputs and labels, and a copy of the exact recipe."""
    model = random_model([6, 16, 16, 3], psi=True, o=(0.0, 1.0), seed=4)
    io.save(model, tmp_path / "small.pt", dtype=torch.float32)
    x = np.random.default_rng(0).normal(size=(40, 6)).astype(np.float32)
    np.save(tmp_path / "calib.npy", x)
    with torch.no_grad():
        np.save(tmp_path / "labels.npy", model(torch.from_numpy(x).double()).argmax(-1).numpy())
    shutil.copy(RECIPES / "exact.toml", tmp_path / "exact.toml")
    return tmp_path


def write_config(directory: Path, text: str, name: str = "isocompress.toml") -> Path:
    path = directory / name
    path.write_text(text)
    return path


# --- value parsing ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    (60000, 60000), ("60000", 60000), ("60 kB", 60000), ("60kB", 60000), ("60 KB", 60000), ("1.5 MiB", 1572864),
    ("1 KiB", 1024), ("2 GB", 2_000_000_000), ("12,345 B", 12345), ("0.5 kB", 500), (1e3, 1000),
])
def test_byte_sizes(text, expected):
    assert parse_bytes(text, "cfg") == expected


@pytest.mark.parametrize("text, message", [
    ("60 XB", "unit 'XB'"), ("-1", "write a size"), (0, "positive whole number"), ("abc", "write a size"),
    (True, "write a size"), ("1.5", "whole number"), ([60], "write a size"),
])
def test_bad_byte_sizes_name_the_key(text, message):
    with pytest.raises(IsocompressError, match=re.escape(message)) as info:
        parse_bytes(text, "cfg")
    assert str(info.value).startswith("cfg: 'max-bytes'")


def test_counts_and_fractions():
    assert parse_count(12_000, "c") == 12000 and parse_count("12,000", "c") == 12000
    assert parse_fraction("95%", "c") == pytest.approx(0.95) and parse_fraction(0.5, "c") == 0.5
    for bad in (0, -3, 1.5, True, "12k"):
        with pytest.raises(IsocompressError, match="'max-params'"):
            parse_count(bad, "c")
    for bad in (95, "95", "x%", -0.1):
        with pytest.raises(IsocompressError, match="'min-accuracy'"):
            parse_fraction(bad, "c")


# --- the config ------------------------------------------------------------------------------------------------
def test_spec_round_trips_through_its_toml_keys(tmp_path):
    data = {"name": "a", "model": "m.pt", "recipe": "r.toml", "calibration": "c.npy", "labels": "l.npy",
            "max-params": 10, "max-bytes": "1 kB", "max-error": "2.5%", "error-measure": "empirical",
            "min-accuracy": "90%"}
    spec = CheckSpec.from_dict(data, "cfg", base_dir=tmp_path)
    assert spec.model == str(tmp_path / "m.pt") and spec.max_bytes == 1000 and spec.max_error_percent == 2.5
    assert CheckSpec.from_dict(spec.to_dict(), "cfg") == spec
    config = CheckConfig((spec,), path="cfg")
    assert CheckConfig.from_dict(json.loads(json.dumps(config.to_dict())), "cfg").checks == config.checks


def test_max_error_defaults_to_the_certified_measure():
    spec = CheckSpec.from_dict({"model": "m.pt", "recipe": "r.toml", "max-error": 0.1})
    assert spec.error_measure == "certified" and spec.max_error == 0.1


@pytest.mark.parametrize("entry, message", [
    ({"model": "m.pt"}, "no limits; give at least one of max-params"),
    ({"model": "m.pt", "max_params": 3}, "unknown key 'max_params'; did you mean 'max-params'?"),
    ({"model": "m.pt", "max-error": 0.1}, "'max-error' needs a 'recipe'"),
    ({"model": "m.pt", "max-params": 3, "error-measure": "certified"}, "'error-measure' has no effect without"),
    ({"model": "m.pt", "recipe": "r", "max-error": 1, "error-measure": "worst"}, "'error-measure' is 'worst'"),
    ({"model": "m.pt", "max-params": 3, "labels": "l.npy"}, "'labels' needs 'calibration'"),
    ({"model": "m.pt", "min-accuracy": 0.9}, "'min-accuracy' needs 'calibration' and 'labels'"),
    ({"max-params": 3}, "'model' is missing"),
    ({"model": 3, "max-params": 3}, "'model' is 3"),
    ({"model": "m.pt", "max-params": 1.5}, "'max-params' is 1.5"),
])
def test_bad_entries_name_the_check_and_the_key(entry, message):
    with pytest.raises(IsocompressError, match=re.escape(message)) as info:
        CheckConfig.from_dict({"check": [entry]}, "isocompress.toml")
    assert str(info.value).startswith("isocompress.toml: check[1]: ")


def test_config_file_precedence_and_relative_paths(project):
    sub = project / "ci"
    sub.mkdir()
    write_config(sub, '[[check]]\nmodel = "../small.pt"\nmax-params = 1\n', "limits.toml")
    assert check.load_config(sub / "limits.toml").checks[0].model == str(project / "small.pt")
    write_config(project, '[project]\nname = "x"\n[[tool.isocompress.check]]\nmodel = "small.pt"\nmax-params = 2\n',
                 "pyproject.toml")
    assert check.load_config(cwd=project).checks[0].max_params == 2  # pyproject's [tool.isocompress]
    write_config(project, '[[check]]\nmodel = "small.pt"\nmax-params = 3\n')
    assert check.load_config(cwd=project).checks[0].max_params == 3  # isocompress.toml wins


# --- CLI: pass, fail, errors (small model) ---------------------------------------------------------------------
def test_pass_rows_and_exit_0(project):
    params = io.load(project / "small.pt").num_params()
    size = (project / "small.pt").stat().st_size
    write_config(project, f'[[check]]\nmodel = "small.pt"\nmax-params = {params}\nmax-bytes = "{size} B"\n')
    result = invoke(["check"], cwd=project)
    assert result.exit_code == 0, result.output
    rows = result.stdout.splitlines()
    assert rows[0].split() == ["PASS", "small.pt", "params", f"{params:,}", "≤", f"{params:,}"]
    assert rows[1].split()[:4] == ["PASS", "small.pt", "bytes", "(file)"]
    assert rows[-1] == "isocompress check: all 2 limits passed"
    assert "\x1b[" not in result.output  # no colour when stdout is not a terminal


def test_fail_states_measured_limit_excess_and_advice(project):
    params = io.load(project / "small.pt").num_params()
    limit = params - 100
    write_config(project, f'[[check]]\nmodel = "small.pt"\nmax-params = {limit}\nmax-bytes = "1 MiB"\n')
    result = invoke(["check"], cwd=project)
    assert result.exit_code == 1
    fail_row = next(line for line in result.stdout.splitlines() if line.startswith("FAIL"))
    assert f"{params:,} > {limit:,}" in fail_row
    assert f"over by 100 (+{100 * 100 / limit:.1f}%)" in fail_row
    assert "raise max-params" in fail_row
    assert result.stdout.splitlines()[-1] == "isocompress check: 1 of 2 limits FAILED"


def test_columns_are_aligned(project):
    write_config(project, '[[check]]\nmodel = "small.pt"\nmax-params = 10\nmax-bytes = "1 MiB"\n'
                          '[[check]]\nname = "a-much-longer-name"\nmodel = "small.pt"\nmax-params = 100000\n')
    rows = invoke(["check"], cwd=project).stdout.splitlines()[:-1]
    metric_columns = {re.search(r"  (params|bytes)", row).start() for row in rows}
    value_columns = {re.search(r"  (params|bytes).*?  +(?=\d)", row).end() for row in rows}
    assert len(rows) == 3 and len(metric_columns) == 1 and len(value_columns) == 1, rows


def test_single_model_flags(project):
    result = invoke(["check", str(project / "small.pt"), "--max-params", "1", "--quiet"])
    assert result.exit_code == 1 and result.stdout.startswith("FAIL")
    result = invoke(["check", str(project / "small.pt"), "--max-bytes", "1 MiB", "--recipe",
                     str(project / "exact.toml"), "--max-error", "1e-4", "--error-measure", "empirical", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "error (empirical)" in result.stdout and "[exact]" in result.stdout


@pytest.mark.parametrize("config, args, message", [
    ('[[check]]\nmodel = "small.pt"\nmax-param = 3\n', [],
     "isocompress.toml: check[1]: unknown key 'max-param'; did you mean 'max-params'?"),
    ('[[check]]\nmodel = "small.pt"\nmax-bytes = "60 XB"\n', [], "isocompress.toml: check[1]: 'max-bytes' has unit 'XB'"),
    ('[[check]]\nmodel = "missing.pt"\nmax-params = 3\n', [], "check[1]: model missing.pt: no such file"),
    ('[[check]]\nmodel = "small.pt"\nrecipe = "bad.toml"\nmax-params = 3\n', [],
     "check[1]: recipe bad.toml: unknown key 'budgt'; did you mean 'budget'?"),
    ('[[check]\nmodel = "small.pt"\n', [], "isocompress.toml: not valid TOML"),
    ('[checks]\n', [], "isocompress.toml: unknown key 'checks'; did you mean 'check'?"),
    (None, [], "no isocompress.toml and no [tool.isocompress] in pyproject.toml"),
    (None, ["small.pt", "--config", "x.toml"], "give either MODEL with limit flags or --config FILE"),
    (None, ["--max-params", "3"], "--max-params needs MODEL"),
    (None, ["small.pt", "--max-bytes", "lots"], "--max-bytes is 'lots'; write a size"),
    (None, ["small.pt", "--max-params", "3", "--baseline", "nope.json"], "nope.json: no such file"),
    (None, ["--config", "absent.toml"], "absent.toml: no such file; expected a check config"),
])
def test_config_and_input_errors_exit_2_with_one_line(project, config, args, message):
    (project / "bad.toml").write_text('budgt = "10%"\n')
    if config is not None:
        write_config(project, config)
    result = invoke(["check", *args], cwd=project)
    assert result.exit_code == 2, result.output
    assert message in error_line(result)
    assert result.stdout == ""


def test_bad_baseline_is_a_clear_error(project):
    (project / "base.json").write_text('{"nothing": 1}')
    result = invoke(["check", "small.pt", "--max-params", "3", "--baseline", "base.json"], cwd=project)
    assert result.exit_code == 2
    assert "base.json: not a `check --json` output or a shrink report.json" in error_line(result)


def test_a_failed_onnx_verification_is_a_failed_check(project):
    (project / "strict.toml").write_text('name = "strict"\nformats = ["onnx"]\nonnx-tol = 1e-30\n')
    write_config(project, '[[check]]\nmodel = "small.pt"\nrecipe = "strict.toml"\nmax-params = 100000\n')
    result = invoke(["check", "--quiet"], cwd=project)
    assert result.exit_code == 1
    row = result.stdout.splitlines()[0]
    assert row.startswith("FAIL") and "shrink" in row and "onnxruntime output differs" in row


def test_check_never_writes_outside_a_temporary_directory(project, tmp_path_factory, monkeypatch):
    scratch = tmp_path_factory.mktemp("scratch")
    monkeypatch.setattr("tempfile.tempdir", str(scratch))
    write_config(project, '[[check]]\nmodel = "small.pt"\nrecipe = "exact.toml"\nmax-params = 100000\n')
    before = sorted(p.name for p in project.iterdir())
    digest = (project / "small.pt").read_bytes()
    result = invoke(["check", "--quiet"], cwd=project)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in project.iterdir()) == before
    assert list(scratch.iterdir()) == []  # the shrunk files were removed again
    assert (project / "small.pt").read_bytes() == digest


def test_colour_only_when_asked():
    result = check.CheckResult(1, None, "m.pt", None, None, None, "params", None, "params", 5, 3, "<=", False,
                               excess=2, excess_percent=66.7, advice="do something")
    assert "\x1b[31" in check.format_results([result], color=True)
    assert "\x1b[" not in check.format_results([result], color=False)


# --- baselines -------------------------------------------------------------------------------------------------
def test_baseline_from_an_earlier_json_output_shows_the_change(project):
    write_config(project, '[[check]]\nmodel = "small.pt"\nmax-params = 100000\nmax-bytes = "1 MiB"\n')
    first = invoke(["check", "--json", "--quiet"], cwd=project)
    earlier = json.loads(first.stdout)
    params = earlier[0]["measured"]
    earlier[0]["measured"] = params - 50  # the model grew by 50 parameters since then
    (project / "base.json").write_text(json.dumps(earlier))
    result = invoke(["check", "--baseline", "base.json", "--quiet"], cwd=project)
    assert result.exit_code == 0
    rows = result.stdout.splitlines()
    assert f"baseline {params - 50:,}: +50 (+{100 * 50 / (params - 50):.1f}%)" in rows[0]
    assert rows[1].endswith("±0 B (0.0%)")
    data = json.loads(invoke(["check", "--baseline", "base.json", "--json", "--quiet"], cwd=project).stdout)
    assert data[0]["baseline"] == params - 50 and data[0]["change"] == 50
    assert data[0]["change_percent"] == pytest.approx(100 * 50 / (params - 50))


def test_baseline_from_a_shrink_report(project, monkeypatch):
    report = shrink_file(project / "small.pt", project / "out", load_recipe(project / "exact.toml").to_options(),
                         progress=False, recipe={"path": "exact.toml"})
    write_config(project, '[[check]]\nmodel = "small.pt"\nrecipe = "exact.toml"\nmax-params = 100000\n'
                          'max-bytes = "1 MiB"\nmax-error = 1e-3\n')
    monkeypatch.chdir(project)  # the report names the model as it was given (absolute here); matching falls back to the name
    results = run_checks(baseline=project / "out" / "report.json", cwd=project)
    by_metric = {r.metric: r for r in results}
    assert by_metric["params"].baseline == report["params_after"] and by_metric["params"].change == 0
    assert by_metric["bytes"].baseline == sum(report["bytes_after"].values())
    assert by_metric["error"].baseline == pytest.approx(report["probe"]["saved_file"]["max_abs"])


# --- the Python API --------------------------------------------------------------------------------------------
def test_run_checks_mirrors_the_cli(project):
    results = run_checks(checks=[{"model": "small.pt", "max-params": 1, "max-bytes": "1 MiB"}], cwd=project)
    assert [(r.metric, r.status) for r in results] == [("params", "FAIL"), ("bytes", "PASS")]
    assert check.exit_code(results) == 1
    assert set(results[0].to_dict()) == RESULT_KEYS
    with pytest.raises(IsocompressError, match="no limits"):
        run_checks(checks=[{"model": "small.pt"}], cwd=project)


def test_min_accuracy_on_the_model_file(project):
    results = run_checks(checks=[{"model": "small.pt", "calibration": "calib.npy", "labels": "labels.npy",
                                  "min-accuracy": "99%"}], cwd=project)
    assert results[0].metric == "accuracy" and results[0].measured == pytest.approx(1.0) and results[0].passed


# --- every shipped recipe on the shipped digits model, in a real process ---------------------------------------
def isocompress_command() -> list[str]:
    return [sys.executable, "-m", "isocompress.cli"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """One `isocompress check --json` subprocess: each shipped recipe on models/digits.pt with its calibration data,
    plus the model file itself; one limit is set to fail."""
    work = tmp_path_factory.mktemp("digits")
    entries = []
    for recipe in sorted(RECIPES.glob("*.toml")):
        entries.append(f'[[check]]\nmodel = "{MODELS / "digits.pt"}"\nrecipe = "{recipe}"\n'
                       f'calibration = "{MODELS / "digits.calib.npy"}"\nlabels = "{MODELS / "digits.calib.labels.npy"}"\n'
                       'max-params = 15_200\nmax-bytes = "100 kB"\nmax-error = "1%"\nmin-accuracy = "95%"\n')
    entries.append(f'[[check]]\nname = "too-small-limit"\nmodel = "{MODELS / "digits.pt"}"\nmax-params = 150_000\n')
    config = write_config(work, "\n".join(entries), "ci.toml")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread, as in the test processes: no oversubscription
    proc = subprocess.run([*isocompress_command(), "check", "--config", str(config), "--json"], cwd=work,
                          capture_output=True, text=True, timeout=300, env=env)
    return proc, work


def test_every_shipped_recipe_runs_on_digits(digits_run):
    proc, work = digits_run
    assert proc.returncode == 1, proc.stderr  # the one deliberately failing limit
    results = json.loads(proc.stdout)
    names = {r["recipe_name"] for r in results if r["recipe_name"]}
    assert names == {load_recipe(p).name for p in RECIPES.glob("*.toml")}  # every shipped recipe ran
    assert {"exact", "edge-10pct", "max-error-1pct"} <= names
    for r in results:
        assert set(r) == RESULT_KEYS
        assert r["status"] == ("PASS" if r["passed"] else "FAIL")
        assert r["op"] in ("<=", ">=")
        assert isinstance(r["measured"], (int, float)) and isinstance(r["limit"], (int, float))
    recipe_rows = [r for r in results if r["recipe_name"]]
    assert all(r["passed"] for r in recipe_rows), [r for r in recipe_rows if not r["passed"]]
    params = {r["recipe_name"]: r["measured"] for r in recipe_rows if r["metric"] == "params"}
    assert params["exact"] == 9330 and params["edge-10pct"] <= 15131 and params["max-error-1pct"] <= 9330
    bytes_rows = {r["recipe_name"]: r["measure"] for r in recipe_rows if r["metric"] == "bytes"}
    assert bytes_rows == {"exact": "safetensors+onnx", "edge-10pct": "onnx", "max-error-1pct": "safetensors+onnx"}
    failed = [r for r in results if not r["passed"]]
    assert [(f["name"], f["metric"], f["measured"], f["excess"]) for f in failed] == \
           [("too-small-limit", "params", 151319, 1319)]
    progress = proc.stderr.splitlines()  # one plain line per model (no carriage-return bar) when not a terminal
    assert len(progress) == 4 and "\r" not in proc.stderr, proc.stderr
    assert all(re.fullmatch(r"check \d/4: .*digits\.pt: (shrinking with .*|loading), \d+\.\d s", p) for p in progress)
    assert list(work.iterdir()) == [work / "ci.toml"]  # nothing written beside the config


def test_text_output_baseline_and_config_errors_in_a_real_process(project):
    write_config(project, '[[check]]\nmodel = "small.pt"\nmax-params = 100000\nmax-bytes = "1 MiB"\n')
    (project / "base.json").write_text(json.dumps([{"model": "small.pt", "recipe": None, "metric": "bytes",
                                                    "measure": "file", "unit": "bytes", "measured": 1000}]))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ok = subprocess.run([*isocompress_command(), "check", "--baseline", "base.json"], cwd=project, env=env,
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and re.fullmatch(r"check 1/1: small\.pt: loading, \d+\.\d s\n", ok.stderr), ok.stderr
    size = (project / "small.pt").stat().st_size
    rows = ok.stdout.splitlines()
    assert rows[0].startswith("PASS  small.pt  params") and rows[0].endswith("baseline: none")
    assert rows[1].endswith(f"baseline 1,000 B: +{size - 1000:,} B (+{100 * (size - 1000) / 1000:.1f}%)")
    write_config(project, '[[check]]\nmodel = "small.pt"\nmax-bytes = "1 parsec"\n')
    bad = subprocess.run([*isocompress_command(), "check"], cwd=project, env=env, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr == ("isocompress: error: isocompress.toml: check[1]: 'max-bytes' has unit 'parsec'; use B, kB,"
                          " MB, GB (powers of 1000) or KiB, MiB, GiB (1024)\n")


def test_the_repository_config_parses():
    """isocompress.toml at the root (run in CI) names existing files and shipped recipes."""
    config = check.load_config(ROOT / "isocompress.toml")
    assert len(config.checks) >= 2
    for spec in config.checks:
        recipe = check.prepare(spec)
        assert recipe is None or Path(spec.recipe).resolve().parent == RECIPES
