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
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from isocompress import api, io
from isocompress.errors import CheckFailed, IsocompressError
from isocompress.recipe import (
    COMMAND_LINE, Recipe, check_keys, fail, is_number, load_recipe, parse_choice, parse_max_error, parse_path,
    parse_percent, parse_text, read_toml, show,
)

CONFIG_NAME = "isocompress.toml"
CHECK_KEYS = ("name", "model", "recipe", "calibration", "labels", "max-params", "max-bytes", "max-error",
              "error-measure", "min-accuracy", "ref-intrinsic-length")
LIMIT_KEYS = ("max-params", "max-bytes", "max-error", "min-accuracy")
MEASURES = ("certified", "empirical")
BYTE_UNITS = {"b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "kib": 1024, "mib": 1024**2, "gib": 1024**3}
BYTES_RE = re.compile(r"^\s*([0-9][0-9_,]*(?:\.[0-9]+)?|\.[0-9]+)\s*([A-Za-z]*)\s*$")
PERCENT_OF_Y = "% of max |y|"


# --- value parsers -----------------------------------------------------------------------------------------------
def parse_bytes(value, where: str, key: str = "max-bytes") -> int:
    """60000, "60000", "60 kB" (1000), "1.5 MiB" (1024²) → bytes."""
    if is_number(value):
        number, unit = float(value), "b"
    elif isinstance(value, str) and (match := BYTES_RE.match(value)):
        number, unit = float(match.group(1).replace("_", "").replace(",", "")), match.group(2) or "B"
    else:
        raise fail(where, key, f"is {show(value)}; write a size like 60000, \"60 kB\" or \"1.5 MiB\"")
    if unit.lower() not in BYTE_UNITS:
        raise fail(where, key, f"has unit {show(unit)}; use B, kB, MB, GB (powers of 1000) or KiB, MiB, GiB (1024)")
    unit = unit.lower()
    total = number * BYTE_UNITS[unit]
    if not (0 < total < 2**63) or total != math.floor(total) and unit == "b":
        raise fail(where, key, f"is {show(value)}; it must be a positive whole number of bytes")
    return int(round(total))


def parse_count(value, where: str, key: str = "max-params") -> int:
    if isinstance(value, str) and re.fullmatch(r"\s*[0-9][0-9_,]*\s*", value):
        value = int(value.replace("_", "").replace(",", ""))
    if not isinstance(value, int) or isinstance(value, bool) or not (0 < value < 2**63):
        raise fail(where, key, f"is {show(value)}; it must be a positive whole number of parameters")
    return value


def parse_fraction(value, where: str, key: str = "min-accuracy") -> float:
    """0.95 or "95%" → 0.95 (a fraction in [0, 1])."""
    if isinstance(value, str) and value.strip().endswith("%"):
        value = parse_percent(value, where, key)
    elif isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise fail(where, key, f"is {show(value)}; use a fraction (0.95) or a percentage (\"95%\")") from None
    if not is_number(value) or not (0 <= value <= 1):
        raise fail(where, key, f"is {show(value)}; use a fraction between 0 and 1 (0.95) or a percentage (\"95%\")")
    return float(value)


# --- one check entry ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CheckSpec:
    """One `[[check]]` entry: a model, an optional recipe, inputs, limits. Validates itself; `where` names it."""

    model: str
    recipe: str | None = None
    calibration: str | None = None
    labels: str | None = None
    max_params: int | None = None
    max_bytes: int | None = None
    max_error: float | None = None
    max_error_percent: float | None = None
    error_measure: str | None = None
    min_accuracy: float | None = None
    name: str | None = None
    ref_intrinsic_length: str | None = None  # how a reference checkpoint's intrinsic_length is read: log | raw
    where: str = field(default="check", compare=False)

    def __post_init__(self) -> None:
        where = self.where
        for key in ("model", "recipe", "calibration", "labels"):
            if getattr(self, key) is not None:
                parse_path(getattr(self, key), where, key, None)
        if self.name is not None:
            parse_text(self.name, where, "name")
        if not self.limits():
            raise IsocompressError(f"{where}: no limits; give at least one of {', '.join(LIMIT_KEYS)}")
        self._validate_limits()
        self._validate_dependencies()

    def _validate_limits(self) -> None:
        where = self.where
        if self.max_params is not None:
            object.__setattr__(self, "max_params", parse_count(self.max_params, where))
        if self.max_bytes is not None:
            object.__setattr__(self, "max_bytes", parse_bytes(self.max_bytes, where))
        if self.max_error is not None and self.max_error_percent is not None:
            raise fail(where, "max-error", "is given both as a number and as a percentage")
        for value in (self.max_error, self.max_error_percent):
            if value is not None and not (is_number(value) and 0 <= value < math.inf):
                raise fail(where, "max-error", f"is {show(value)}; it must be a finite number ≥ 0")
        if self.min_accuracy is not None:
            object.__setattr__(self, "min_accuracy", parse_fraction(self.min_accuracy, where))

    def _validate_dependencies(self) -> None:
        where = self.where
        has_error = self.max_error is not None or self.max_error_percent is not None
        if self.error_measure is not None:
            parse_choice(self.error_measure, MEASURES, where, "error-measure")
            if not has_error:
                raise fail(where, "error-measure", "has no effect without 'max-error'; add one or drop it")
        elif has_error:
            object.__setattr__(self, "error_measure", "certified")
        if has_error and self.recipe is None:
            raise fail(where, "max-error", "needs a 'recipe': the error is that of the compression the recipe makes")
        if self.labels is not None and self.calibration is None:
            raise fail(where, "labels", "needs 'calibration' (the inputs the labels belong to)")
        if self.min_accuracy is not None and self.labels is None:
            raise fail(where, "min-accuracy", "needs 'calibration' and 'labels' to measure accuracy on")

    def limits(self) -> list[str]:
        values = {"max-params": self.max_params, "max-bytes": self.max_bytes, "min-accuracy": self.min_accuracy,
                  "max-error": self.max_error if self.max_error is not None else self.max_error_percent}
        return [key for key in LIMIT_KEYS if values[key] is not None]

    def to_dict(self) -> dict:
        """The entry as its TOML keys (what `from_dict` reads back)."""
        data = {"name": self.name, "model": self.model, "recipe": self.recipe, "calibration": self.calibration,
                "labels": self.labels, "max-params": self.max_params, "max-bytes": self.max_bytes,
                "max-error": self.max_error, "error-measure": self.error_measure, "min-accuracy": self.min_accuracy,
                "ref-intrinsic-length": self.ref_intrinsic_length}
        if self.max_error_percent is not None:
            percent = self.max_error_percent
            data["max-error"] = f"{int(percent) if percent == int(percent) and percent < 1e15 else percent!r}%"
        return {k: v for k, v in data.items() if v is not None}

    @classmethod
    def from_dict(cls, data, where: str = "check", base_dir: Path | None = None) -> "CheckSpec":
        if not isinstance(data, dict):
            raise IsocompressError(f"{where}: a check must be a table of keys, got {type(data).__name__}")
        check_keys(data, CHECK_KEYS, where)
        if "model" not in data:
            raise fail(where, "model", "is missing; name the model file to check")
        kwargs = {key.replace("-", "_"): parse_path(data[key], where, key, base_dir)
                  for key in ("model", "recipe", "calibration", "labels") if key in data}
        kwargs["where"] = where
        if "name" in data:
            kwargs["name"] = parse_text(data["name"], where, "name")
        if "max-params" in data:
            kwargs["max_params"] = parse_count(data["max-params"], where)
        if "max-bytes" in data:
            kwargs["max_bytes"] = parse_bytes(data["max-bytes"], where)
        if "max-error" in data:
            kwargs["max_error"], kwargs["max_error_percent"] = parse_max_error(data["max-error"], where)
        if "error-measure" in data:
            kwargs["error_measure"] = parse_choice(data["error-measure"], MEASURES, where, "error-measure")
        if "min-accuracy" in data:
            kwargs["min_accuracy"] = parse_fraction(data["min-accuracy"], where)
        if "ref-intrinsic-length" in data:
            kwargs["ref_intrinsic_length"] = parse_choice(data["ref-intrinsic-length"], ("log", "raw"), where,
                                                          "ref-intrinsic-length")
        return cls(**kwargs)


# --- the config --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CheckConfig:
    checks: tuple[CheckSpec, ...]
    path: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "checks", tuple(self.checks))
        if not self.checks:
            raise IsocompressError(f"{self.path or 'config'}: no [[check]] entries; add at least one")

    def to_dict(self) -> dict:
        return {"check": [spec.to_dict() for spec in self.checks]}

    @classmethod
    def from_dict(cls, data, where: str = "config", base_dir: Path | None = None) -> "CheckConfig":
        if not isinstance(data, dict):
            raise IsocompressError(f"{where}: the config must be a table, got {type(data).__name__}")
        check_keys(data, ("check",), where)
        entries = data.get("check")
        if not isinstance(entries, list) or not entries:
            raise IsocompressError(f"{where}: no [[check]] entries; add at least one (see docs/ci.md)")
        checks = [CheckSpec.from_dict(entry, f"{where}: check[{i}]", base_dir) for i, entry in enumerate(entries, 1)]
        return cls(tuple(checks), path=where)


def parse_config_text(text: str, where: str = "config", base_dir: Path | None = None,
                      pyproject: bool = False) -> CheckConfig:
    """A config from TOML text; with `pyproject`, the `[tool.isocompress]` table of it."""
    from isocompress.recipe import parse_toml_text

    data = parse_toml_text(text, where, "config")
    if pyproject:
        data = _tool_table(data, where)
        if data is None:
            raise IsocompressError(f"{where}: has no [tool.isocompress] table; add one with [[tool.isocompress.check]]")
    return CheckConfig.from_dict(data, where, base_dir)


def _tool_table(data: dict, where: str):
    tool = data.get("tool")
    if tool is None:
        return None
    if not isinstance(tool, dict):
        raise IsocompressError(f"{where}: 'tool' must be a table")
    return tool.get("isocompress")


def find_config(cwd: Path) -> Path | None:
    """./isocompress.toml, else ./pyproject.toml if it has [tool.isocompress], else None."""
    own = cwd / CONFIG_NAME
    if own.exists():
        return own
    pyproject = cwd / "pyproject.toml"
    if pyproject.is_file() and _tool_table(read_toml(pyproject, "pyproject.toml"), str(pyproject)) is not None:
        return pyproject
    return None


def load_config(path: str | os.PathLike | None = None, cwd: str | os.PathLike | None = None) -> CheckConfig:
    """The config at `path`, or the one `find_config` finds in `cwd`. Paths inside are relative to its directory."""
    cwd = Path(cwd) if cwd is not None else Path.cwd()
    found = Path(path) if path is not None else find_config(cwd)
    found = _display(found, Path.cwd()) if found is not None else None  # keeps messages and paths short
    if found is None:
        raise IsocompressError(
            f"{cwd}: no {CONFIG_NAME} and no [tool.isocompress] in pyproject.toml; write one (docs/ci.md),"
            " pass --config FILE, or check one model: isocompress check MODEL --max-params N")
    data = read_toml(found, "check config")
    if found.name == "pyproject.toml":
        data = _tool_table(data, str(found))
        if data is None:
            raise IsocompressError(f"{found}: has no [tool.isocompress] table; add [[tool.isocompress.check]] entries")
    return CheckConfig.from_dict(data, str(found), base_dir=found.parent)


# --- results -----------------------------------------------------------------------------------------------------
@dataclass
class CheckResult:
    """One limit of one check, measured. `op` is "<=" (a maximum) or ">=" (a minimum)."""

    check: int
    name: str | None
    model: str
    recipe: str | None
    recipe_name: str | None
    recipe_version: str | None
    metric: str  # params | bytes | error | accuracy | shrink
    measure: str | None  # bytes: "file" or the exported formats ("safetensors+onnx"); error: certified | empirical
    unit: str  # "params", "bytes", "|Δy|", "% of max |y|", "fraction", ""
    measured: float | int | None
    limit: float | int | None
    op: str
    passed: bool
    excess: float | int | None = None
    excess_percent: float | None = None
    baseline: float | int | None = None
    change: float | int | None = None
    change_percent: float | None = None
    note: str | None = None
    advice: str | None = None

    @property
    def status(self) -> str:
        return "PASS" if self.passed else "FAIL"

    def to_dict(self) -> dict:
        return {"status": self.status, **asdict(self)}


@dataclass
class Measurement:
    params: int
    bytes: int
    bytes_measure: str
    errors: dict = field(default_factory=dict)  # measure -> (|Δy|, note)
    output_scale: float | None = None
    accuracy: float | None = None
    accuracy_note: str | None = None


def limit_result(index: int, spec: CheckSpec, recipe: Recipe | None, metric: str, measured, limit, op: str,
                 **extra) -> CheckResult:
    passed = measured <= limit if op == "<=" else measured >= limit
    result = CheckResult(index, spec.name, spec.model, spec.recipe, recipe.name if recipe else None,
                         recipe.version if recipe else None, metric, measured=measured, limit=limit, op=op,
                         passed=bool(passed), **extra)
    if not passed:
        result.excess = measured - limit if op == "<=" else limit - measured
        result.excess_percent = 100.0 * result.excess / limit if limit else None
        result.advice = advice(metric, recipe is not None)
    return result


def advice(metric: str, has_recipe: bool) -> str:
    if metric == "params":
        return ("shrink harder (a smaller budget in the recipe), or raise max-params if the growth is intended"
                if has_recipe else "shrink the model (isocompress shrink), or raise max-params if the growth is intended")
    if metric == "bytes":
        return ("export fewer formats, a smaller dtype or a smaller budget in the recipe, or raise max-bytes"
                if has_recipe else "shrink the model or save it in a smaller dtype, or raise max-bytes if intended")
    if metric == "error":
        return ("prune less (a larger budget or max-error in the recipe), give calibration data (a tighter domain and"
                " the data-aware basis), or raise max-error")
    return "prune less (a larger budget in the recipe), or lower min-accuracy"


def results_for(index: int, spec: CheckSpec, recipe: Recipe | None, m: Measurement) -> list[CheckResult]:
    results = []
    if spec.max_params is not None:
        results.append(limit_result(index, spec, recipe, "params", m.params, spec.max_params, "<=", measure=None,
                                    unit="params"))
    if spec.max_bytes is not None:
        results.append(limit_result(index, spec, recipe, "bytes", m.bytes, spec.max_bytes, "<=",
                                    measure=m.bytes_measure, unit="bytes"))
    if spec.max_error is not None or spec.max_error_percent is not None:
        results.append(error_result(index, spec, recipe, m))
    if spec.min_accuracy is not None:
        results.append(limit_result(index, spec, recipe, "accuracy", m.accuracy, spec.min_accuracy, ">=",
                                    measure=None, unit="fraction", note=m.accuracy_note))
    return results


def error_result(index: int, spec: CheckSpec, recipe: Recipe | None, m: Measurement) -> CheckResult:
    value, note = m.errors[spec.error_measure]
    if spec.max_error_percent is None:
        return limit_result(index, spec, recipe, "error", value, spec.max_error, "<=", measure=spec.error_measure,
                            unit="|Δy|", note=note)
    percent = 100.0 * value / m.output_scale if m.output_scale else (0.0 if value == 0 else math.inf)
    note = f"{note}; max |y| = {m.output_scale:.4g}" if m.output_scale is not None else note
    return limit_result(index, spec, recipe, "error", percent, spec.max_error_percent, "<=",
                        measure=spec.error_measure, unit=PERCENT_OF_Y, note=note)


# --- measuring ---------------------------------------------------------------------------------------------------
def measure_model(spec: CheckSpec) -> Measurement:
    """No recipe: the model file as it is."""
    model = io.load(spec.model, ref_intrinsic_length=spec.ref_intrinsic_length)
    m = Measurement(params=model.num_params(), bytes=Path(spec.model).stat().st_size, bytes_measure="file")
    if spec.labels is not None:
        x, labels = load_labelled(spec.calibration, spec.labels, model.widths[0])
        with torch.no_grad():
            m.accuracy = accuracy(model(x), labels)
        m.accuracy_note = f"the model on {len(labels)} calibration inputs"
    return m


def measure_recipe(spec: CheckSpec, recipe: Recipe) -> Measurement:
    """Shrink with the recipe into a temporary directory (never into the repository), then measure the result."""
    calibration = spec.calibration or recipe.calibration
    labels = spec.labels or (recipe.labels if spec.calibration is None else None)
    with tempfile.TemporaryDirectory(prefix="isocompress-check-") as tmp:
        options = recipe.to_options()
        if spec.ref_intrinsic_length is not None:
            options = replace(options, ref_intrinsic_length=spec.ref_intrinsic_length)
        report = api.shrink_file(spec.model, Path(tmp) / "out", options, calibration=calibration,
                                 labels=labels, progress=False, recipe=recipe.provenance())
        m = measurement_of_report(report)
        if labels is not None:
            x, y = load_labelled(calibration, labels, report["widths_before"][0])
            m.accuracy = accuracy(saved_outputs(report, x), y)
            m.accuracy_note = f"the saved {'safetensors' if 'safetensors' in report['files'] else 'ONNX'} file" \
                              f" on {len(y)} calibration inputs"
    return m


def measurement_of_report(report: dict) -> Measurement:
    """params, bytes and errors of a shrink report (also how a report.json baseline is read)."""
    probe = report["probe"]
    saved = float(probe["saved_file"]["max_abs"])
    empirical_note = f"max |Δy| of the saved file on {probe['inputs']}"
    if "pruning" in report:
        certified = (float(report["pruning"]["certified"]["max_abs"]),
                     f"certified for |x| ≤ {report['pruning']['radius']:.4g} ({report['pruning']['radius_source']})")
    else:
        certified = (saved, f"exact recipe: no bound needed; measured {empirical_note}")
    bytes_after = report["bytes_after"]
    return Measurement(params=int(report["params_after"]), bytes=int(sum(bytes_after.values())),
                       bytes_measure="+".join(bytes_after), errors={"certified": certified,
                                                                   "empirical": (saved, empirical_note)},
                       output_scale=probe["float64"].get("max_norm_reference"))


def load_labelled(calibration: str, labels: str, n_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = api.load_inputs(calibration, n_in), api.load_labels(labels)
    if len(x) != len(y):
        raise IsocompressError(f"{labels}: has {len(y)} labels but {calibration} has {len(x)} inputs; they must match")
    return x, y


def accuracy(outputs: torch.Tensor, labels: torch.Tensor) -> float:
    return float((outputs.argmax(-1) == labels).double().mean())


def saved_outputs(report: dict, x: torch.Tensor) -> torch.Tensor:
    """Outputs of the file the recipe wrote: safetensors through isocompress, else ONNX through onnxruntime."""
    files = report["files"]
    if "safetensors" in files:
        with torch.no_grad():
            return io.load(files["safetensors"])(x)
    import numpy as np

    from isocompress import onnx_export

    session = onnx_export.ort_session(files["onnx"])
    dtype = np.float64 if report.get("onnx", {}).get("dtype") == "float64" else np.float32
    feed = {onnx_export.INPUT_NAME: x.numpy().astype(dtype)}
    return torch.from_numpy(np.asarray(session.run([onnx_export.OUTPUT_NAME], feed)[0]))


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
    if spec.recipe is None:
        return None
    try:
        return load_recipe(spec.recipe)
    except IsocompressError as exc:
        raise IsocompressError(f"{_prefix(spec)}recipe {exc}") from None


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
    key = (spec.model, spec.recipe, spec.calibration, spec.labels)
    try:
        if key not in cache:
            if progress is not None:
                how = f"shrinking with {recipe.name} (v{recipe.version}) in a temporary directory" if recipe else "loading"
                progress(f"check {index}/{total}: {_display(Path(spec.model), cwd)}: {how}")
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


def _display(path: Path, cwd: Path) -> Path:
    """A path relative to cwd when it lies below it (stable across machines), else as it is."""
    try:
        return Path(os.path.relpath(path, cwd)) if Path(os.path.abspath(path)).is_relative_to(os.path.abspath(cwd)) \
            else path
    except ValueError:
        return path


def _display_paths(result: CheckResult, cwd: Path) -> None:
    result.model = str(_display(Path(result.model), cwd))
    if result.recipe is not None:
        result.recipe = str(_display(Path(result.recipe), cwd))


# --- baselines ---------------------------------------------------------------------------------------------------
def load_baseline(path: str | os.PathLike) -> list[dict]:
    """Entries {model, recipe, metric, measure, unit, measured} from a `check --json` output (a list) or from a
    shrink report.json (an object)."""
    path = Path(path)
    if not path.is_file():
        raise IsocompressError(f"{path}: no such file; --baseline takes a `check --json` output or a report.json")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise IsocompressError(f"{path}: not a JSON baseline ({str(exc).splitlines()[0][:120]}); write it with"
                               " `isocompress check --json > FILE`") from None
    try:
        entries = _baseline_from_results(data) if isinstance(data, list) else _baseline_from_report(data)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise IsocompressError(f"{path}: not a `check --json` output or a shrink report.json (bad or missing"
                               f" {show(str(exc), 80)}); regenerate it") from None
    return entries


def _baseline_from_results(items: list) -> list[dict]:
    entries = []
    for item in items:
        measured = item["measured"]
        if measured is not None and not is_number(measured):
            raise ValueError("measured")
        if not isinstance(item["model"], str) or not isinstance(item["metric"], str):
            raise ValueError("model/metric")
        entries.append({"model": item["model"], "recipe": item.get("recipe"), "metric": item["metric"],
                        "measure": item.get("measure"), "unit": item.get("unit"), "measured": measured})
    return entries


def _baseline_from_report(report: dict) -> list[dict]:
    m = measurement_of_report(report)
    recipe = report.get("recipe") or {}
    base = {"model": str(report["model"]), "recipe": recipe.get("path") if isinstance(recipe, dict) else None}
    entries = [{**base, "metric": "params", "measure": None, "unit": "params", "measured": m.params},
               {**base, "metric": "bytes", "measure": m.bytes_measure, "unit": "bytes", "measured": m.bytes}]
    for measure, (value, _) in m.errors.items():
        entries.append({**base, "metric": "error", "measure": measure, "unit": "|Δy|", "measured": value})
        if m.output_scale:
            entries.append({**base, "metric": "error", "measure": measure, "unit": PERCENT_OF_Y,
                            "measured": 100.0 * value / m.output_scale})
    after = report.get("pruning", {}).get("empirical", {}).get("accuracy_after")
    if after is not None:
        entries.append({**base, "metric": "accuracy", "measure": None, "unit": "fraction", "measured": after})
    return entries


def attach_baseline(results: list[CheckResult], entries: list[dict]) -> None:
    for result in results:
        entry = match_baseline(result, entries)
        if entry is None or entry["measured"] is None or result.measured is None:
            continue
        result.baseline = entry["measured"]
        result.change = result.measured - entry["measured"]
        result.change_percent = 100.0 * result.change / entry["measured"] if entry["measured"] else None


def match_baseline(result: CheckResult, entries: list[dict]) -> dict | None:
    """Same metric, measure and unit; the same model path (else the same file name); the same recipe if several."""
    same = [e for e in entries if (e["metric"], e.get("measure"), e.get("unit")) ==
            (result.metric, result.measure, result.unit)]
    by_path = [e for e in same if _same_path(e["model"], result.model)]
    candidates = by_path or [e for e in same if Path(e["model"]).name == Path(result.model).name]
    if len(candidates) > 1:
        candidates = [e for e in candidates if _same_recipe(e.get("recipe"), result.recipe)]
    return candidates[0] if len(candidates) == 1 else None


def _same_recipe(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return a is b
    return _same_path(a, b) or Path(a).name == Path(b).name


def _same_path(a: str, b: str) -> bool:
    return os.path.normpath(a) == os.path.normpath(b)


# --- output ------------------------------------------------------------------------------------------------------
def fmt(value, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "params":
        return f"{int(value):,}"
    if unit == "bytes":
        return f"{int(value):,} B"
    if unit == "fraction":
        return f"{100.0 * value:.2f}%"
    if unit == PERCENT_OF_Y:
        return f"{value:.3g}%"
    return f"{value:.3g}"


def fmt_change(value, unit: str) -> str:
    """A signed difference in the metric's unit (accuracy in points)."""
    sign = "+" if value > 0 else ("-" if value < 0 else "±")
    if unit == "fraction":
        return f"{sign}{100.0 * abs(value):.2f} points"
    if unit == PERCENT_OF_Y:
        return f"{sign}{abs(value):.3g} points"
    return f"{sign}{fmt(abs(value), unit)}"


def comparison(r: CheckResult) -> str:
    if r.metric == "shrink":
        return "failed"
    ops = {("<=", True): "≤", ("<=", False): ">", (">=", True): "≥", (">=", False): "<"}
    text = f"{fmt(r.measured, r.unit)} {ops[(r.op, r.passed)]} {fmt(r.limit, r.unit)}"
    return text + " of max |y|" if r.unit == PERCENT_OF_Y else text


def tail(r: CheckResult, with_baseline: bool) -> str:
    parts = []
    if not r.passed and r.metric == "shrink":
        parts.append(f"{r.note}; {r.advice}")
    elif not r.passed:
        word = "over" if r.op == "<=" else "under"
        pct = f" ({'+' if r.op == '<=' else '-'}{r.excess_percent:.1f}%)" if r.excess_percent is not None else ""
        amount = f"{100 * r.excess:.2f} points" if r.unit == "fraction" else fmt(r.excess, r.unit)
        parts.append(f"{word} by {amount}{pct}; {r.advice}")
    if with_baseline and r.metric != "shrink":
        if r.baseline is None:
            parts.append("baseline: none")
        else:
            relative = r.change_percent is not None and r.unit not in ("fraction", PERCENT_OF_Y)
            pct = f" ({r.change_percent:+.1f}%)" if relative and r.change else (" (0.0%)" if relative else "")
            parts.append(f"baseline {fmt(r.baseline, r.unit)}: {fmt_change(r.change, r.unit)}{pct}")
    return "; ".join(parts)


def label(r: CheckResult) -> str:
    if r.metric == "bytes":
        return f"bytes ({r.measure})"
    if r.metric == "error":
        return f"error ({r.measure})"
    return r.metric


def subject(r: CheckResult) -> str:
    text = r.model + (f" [{r.recipe_name}]" if r.recipe_name else "")
    return f"{r.name}: {text}" if r.name else text


def format_results(results: list[CheckResult], color: bool = False, with_baseline: bool = False) -> str:
    """One aligned row per limit, `STATUS  SUBJECT  METRIC  MEASURED OP LIMIT  [excess; advice] [baseline]`,
    then one summary line."""
    rows = [(r.status, subject(r), label(r), comparison(r), tail(r, with_baseline)) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = []
    for r, row in zip(results, rows):
        status = row[0]
        if color:
            import click

            status = click.style(status, fg="green" if r.passed else "red", bold=not r.passed)
        cells = [status] + [row[i].ljust(widths[i]) for i in (1, 2, 3)] + [row[4]]
        lines.append("  ".join(cells).rstrip())
    lines.append(summary(results))
    return "\n".join(lines)


def summary(results: list[CheckResult]) -> str:
    failed = sum(not r.passed for r in results)
    if failed == 0:
        return f"isocompress check: all {len(results)} limits passed"
    return f"isocompress check: {failed} of {len(results)} limits FAILED"


def exit_code(results: list[CheckResult]) -> int:
    return 0 if all(r.passed for r in results) else 1


def spec_from_flags(model: str, **flags) -> CheckSpec:
    """`isocompress check MODEL --max-params …`: one check from flags (paths relative to the working directory)."""
    data = {key.replace("_", "-"): value for key, value in flags.items() if value is not None}
    return CheckSpec.from_dict({"model": model, **data}, COMMAND_LINE, None)
