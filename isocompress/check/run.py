"""`isocompress check`: size and error limits for CI, the way size-limit guards JavaScript bundles.

A config (`isocompress.toml`, `[tool.isocompress]` in `pyproject.toml`, or `--config FILE`) lists `[[check]]` entries:

    [[check]]
    model = "models/digits.pt"
    recipe = "recipes/edge-10pct.toml"   # optional: shrink into a temporary directory first, then check the result
    calibration = "models/digits.calib.npy"
    labels = "models/digits.calib.labels.npy"
    max-params = 12000
    max-bytes = "60 kB"                  # kB = 1000 B, KiB = 1024 B; the sum of the exported files (or the model file)
    max-error = 0.02                     # |Δy| (L2 over the output), or "1%" of the largest |y|
    error-measure = "certified"          # or "empirical"
    min-accuracy = "95%"                 # on the calibration data with its labels

Paths in a config are relative to the config file's directory. `run_checks` returns one `CheckResult` per limit;
`format_results` writes the aligned PASS/FAIL rows, `CheckResult.to_dict` the JSON objects (schema in docs/ci.md).
Every config or input problem is an `IsocompressError` (exit 2) raised before any model is shrunk.

This module runs the checks; the concerns live beside it: `check_config` (the entries and their limits),
`check_measure` (measuring a model or a recipe's output against them), `check_baseline` (`--baseline`) and
`check_format` (the PASS/FAIL rows).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from isocompress.api.recipe import COMMAND_LINE, Recipe, fail, load_recipe
from isocompress.check.baseline import attach_baseline, load_baseline
from isocompress.check.config import (  # noqa: F401  (the config API, re-exported)
    CONFIG_NAME,
    MEASURES,
    CheckConfig,
    CheckSpec,
    display_path,
    find_config,
    load_config,
    parse_bytes,
    parse_config_text,
    parse_count,
    parse_fraction,
    spec_from_flags,
)
from isocompress.check.format import exit_code, format_results, summary  # noqa: F401  (re-exported)
from isocompress.check.measure import CheckResult, measure_model, measure_recipe, results_for
from isocompress.core.errors import CheckFailed, IsocompressError
from isocompress.formats import io


# --- running -----------------------------------------------------------------------------------------------------
def prepare(spec: CheckSpec) -> Recipe | None:
    """Everything a check needs exists and parses (before anything is shrunk). Returns its recipe."""
    for key in ("model", "calibration", "labels"):
        path = getattr(spec, key)
        if path is not None and not Path(path).is_file():
            raise IsocompressError(f"{_prefix(spec)}{key} {path}: no such file; check the path")
    suffix = Path(spec.model).suffix.lower()
    if suffix not in io.SUFFIXES:
        raise IsocompressError(f"{_prefix(spec)}model {spec.model}: unsupported file type {suffix or '(none)'!r};"
                               " use .pt, .pth or .safetensors")
    try:
        recipe = load_recipe(spec.recipe) if spec.recipe is not None else None
    except IsocompressError as exc:
        raise IsocompressError(f"{_prefix(spec)}recipe {exc}") from None
    check_accuracy_labels(spec, recipe)
    return recipe


def check_accuracy_labels(spec: CheckSpec, recipe: Recipe | None) -> None:
    """min-accuracy measured on test data needs its labels: test-labels, or a test file holding x and y."""
    from isocompress.check.measure import labels_of_test_data

    if spec.min_accuracy is None or spec.test_data is None or spec.labels is not None:
        return
    if not Path(spec.test_data).is_file():
        raise IsocompressError(f"{_prefix(spec)}test-data {spec.test_data}: no such file; check the path")
    if labels_of_test_data(spec.test_data, spec.test_labels) is None:
        raise fail(spec.where, "min-accuracy", f"needs labels: {spec.test_data} holds none (an .npz holding x and y"
                   " has them); give test-labels, or calibration with labels")


def run_checks(config: str | os.PathLike | CheckConfig | None = None, *, checks: list | None = None,
               baseline: str | os.PathLike | None = None, cwd: str | os.PathLike | None = None,
               progress: Callable[[str], None] | None = None) -> list[CheckResult]:
    """`isocompress check` as a function: the config (path, CheckConfig, or discovered in `cwd`) or explicit `checks`
    (CheckSpecs or dicts of TOML keys, paths relative to `cwd`). Returns one CheckResult per limit; raises
    IsocompressError for config and input errors (before anything is shrunk)."""
    cwd = Path(cwd) if cwd is not None else Path.cwd()
    specs = resolve_specs(config, checks, cwd)
    recipes = [prepare(spec) for spec in specs]
    entries = load_baseline(baseline) if baseline is not None else None
    results, cache = [], {}
    for index, (spec, recipe) in enumerate(zip(specs, recipes), 1):
        results += run_one(index, spec, recipe, cache, progress, len(specs), cwd)
    for result in results:
        _display_paths(result, cwd)
    if entries is not None:
        attach_baseline(results, entries)
    return results


def resolve_specs(config, checks, cwd: Path) -> list[CheckSpec]:
    if checks is not None and config is not None:
        raise IsocompressError("give either a config or explicit checks, not both")
    if checks is not None:
        specs = [c if isinstance(c, CheckSpec) else CheckSpec.from_dict(c, f"check[{i}]", cwd)
                 for i, c in enumerate(checks, 1)]
        return list(CheckConfig(tuple(specs), path="checks").checks)
    if isinstance(config, CheckConfig):
        return list(config.checks)
    return list(load_config(config, cwd).checks)


def run_one(index: int, spec: CheckSpec, recipe: Recipe | None, cache: dict, progress, total: int, cwd: Path) -> list:
    key = (spec.model, spec.recipe, spec.calibration, spec.labels, spec.precision)
    try:
        if key not in cache:
            if progress is not None:
                how = f"shrinking with {recipe.name} (v{recipe.version}) in a temporary directory" if recipe else "loading"
                progress(f"check {index}/{total}: {display_path(Path(spec.model), cwd)}: {how}")
            cache[key] = measure_recipe(spec, recipe) if recipe is not None else measure_model(spec)
    except CheckFailed as exc:  # the recipe's own verification (ONNX vs torch) failed: a failed check, not bad input
        return [shrink_failure(index, spec, recipe, str(exc))]
    except IsocompressError as exc:
        raise IsocompressError(f"{_prefix(spec)}{exc}") from None
    return results_for(index, spec, recipe, cache[key])


def _prefix(spec: CheckSpec) -> str:
    return "" if spec.where == COMMAND_LINE else f"{spec.where}: "


def shrink_failure(index: int, spec: CheckSpec, recipe: Recipe, message: str) -> CheckResult:
    return CheckResult(index, spec.name, spec.model, spec.recipe, recipe.name, recipe.version, "shrink", None, "",
                       None, None, "", passed=False, note=message,
                       advice="fix the recipe (e.g. raise onnx-tol if this is float32 rounding) or report a bug")


def _display_paths(result: CheckResult, cwd: Path) -> None:
    result.model = str(display_path(Path(result.model), cwd))
    if result.recipe is not None:
        result.recipe = str(display_path(Path(result.recipe), cwd))
