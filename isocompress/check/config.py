"""`isocompress check` configuration: the `[[check]]` entries, their limits and where the config is found."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from isocompress.api.recipe import (
    COMMAND_LINE,
    check_keys,
    fail,
    is_number,
    parse_choice,
    parse_max_error,
    parse_path,
    parse_text,
    read_toml,
    show,
)
from isocompress.bounds.branch import EFFORTS
from isocompress.core import parsing
from isocompress.core.errors import IsocompressError
from isocompress.core.parsing import BYTE_UNITS, parse_bytes, parse_count  # noqa: F401  (re-exported)

CONFIG_NAME = "isocompress.toml"
CHECK_KEYS = ("name", "model", "recipe", "calibration", "labels", "test-data", "test-labels", "max-params",
              "max-bytes", "max-error", "error-measure", "min-accuracy", "min-certified-top1", "certify-effort",
              "ref-intrinsic-length", "precision")
PRECISIONS = ("float32", "float16", "int8-weights", "int8")  # core.precision (int8 is refused: not available yet)
LIMIT_KEYS = ("max-params", "max-bytes", "max-error", "min-accuracy", "min-certified-top1")
MEASURES = ("certified", "empirical")
EFFORT_NAMES = tuple(EFFORTS)  # certify-effort: fast | normal | thorough
PERCENT_OF_Y = "% of max |y|"


# --- value parsers (parse_bytes and parse_count live in core.parsing: sweep limits use them too) ----------------
def parse_fraction(value, where: str, key: str = "min-accuracy") -> float:
    """0.95 or "95%" → 0.95 (a fraction in [0, 1]); parsing.parse_fraction with the check key as its default."""
    return parsing.parse_fraction(value, where, key)


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
    test_data: str | None = None  # issue 10: held-out inputs; min-accuracy is then measured on them
    test_labels: str | None = None
    min_certified_top1: float | None = None  # issue 10: report.pruning.local.certified_top1 of the recipe's output
    certify_effort: str | None = None  # fast | normal | thorough: overrides the recipe's (local certificates)
    name: str | None = None
    ref_intrinsic_length: str | None = None  # how a reference checkpoint's intrinsic_length is read: log | raw
    precision: str | None = None  # the recipe's output in this precision: its limits (bytes, certified error) per precision
    where: str = field(default="check", compare=False)

    def __post_init__(self) -> None:
        where = self.where
        for key in ("model", "recipe", "calibration", "labels", "test_data", "test_labels"):
            if getattr(self, key) is not None:
                parse_path(getattr(self, key), where, key.replace("_", "-"), None)
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
        if self.min_certified_top1 is not None:
            object.__setattr__(self, "min_certified_top1",
                               parse_fraction(self.min_certified_top1, where, "min-certified-top1"))

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
        if self.test_labels is not None and self.test_data is None:
            raise fail(where, "test-labels", "needs 'test-data' (the inputs the labels belong to)")
        if self.min_accuracy is not None and self.labels is None and self.test_data is None:
            raise fail(where, "min-accuracy", "needs 'calibration' and 'labels' (or 'test-data': an .npz holding x and"
                       " y, or with 'test-labels') to"
                       " measure accuracy on")
        if self.min_certified_top1 is not None and self.recipe is None:
            raise fail(where, "min-certified-top1", "needs a 'recipe': the certificates are those of its compression")
        if self.precision is not None:
            parse_choice(self.precision, PRECISIONS, where, "precision")
            if self.recipe is None:
                raise fail(where, "precision", "needs a 'recipe': it sets the precision the recipe's files are written in")
            from isocompress.core.precision import parse_precision

            try:
                parse_precision(self.precision, "precision")
            except IsocompressError as exc:
                raise IsocompressError(f"{where}: {exc}") from None
        if self.certify_effort is not None:
            parse_choice(self.certify_effort, EFFORT_NAMES, where, "certify-effort")
            if self.recipe is None:
                raise fail(where, "certify-effort", "needs a 'recipe': the certificates are those of its compression")

    def limits(self) -> list[str]:
        values = {"max-params": self.max_params, "max-bytes": self.max_bytes, "min-accuracy": self.min_accuracy,
                  "max-error": self.max_error if self.max_error is not None else self.max_error_percent,
                  "min-certified-top1": self.min_certified_top1}
        return [key for key in LIMIT_KEYS if values[key] is not None]

    def to_dict(self) -> dict:
        """The entry as its TOML keys (what `from_dict` reads back)."""
        data = {"name": self.name, "model": self.model, "recipe": self.recipe, "calibration": self.calibration,
                "labels": self.labels, "max-params": self.max_params, "max-bytes": self.max_bytes,
                "max-error": self.max_error, "error-measure": self.error_measure, "min-accuracy": self.min_accuracy,
                "test-data": self.test_data, "test-labels": self.test_labels,
                "min-certified-top1": self.min_certified_top1, "certify-effort": self.certify_effort,
                "ref-intrinsic-length": self.ref_intrinsic_length, "precision": self.precision}
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
                  for key in ("model", "recipe", "calibration", "labels", "test-data", "test-labels") if key in data}
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
        if "min-certified-top1" in data:
            kwargs["min_certified_top1"] = parse_fraction(data["min-certified-top1"], where, "min-certified-top1")
        if "precision" in data:
            kwargs["precision"] = parse_choice(data["precision"], PRECISIONS, where, "precision")
        if "certify-effort" in data:
            kwargs["certify_effort"] = parse_choice(data["certify-effort"], EFFORT_NAMES, where, "certify-effort")
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
    from isocompress.api.recipe import parse_toml_text

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
    found = display_path(found, Path.cwd()) if found is not None else None  # keeps messages and paths short
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



def display_path(path: Path, cwd: Path) -> Path:
    """A path relative to cwd when it lies below it (stable across machines), else as it is."""
    try:
        return Path(os.path.relpath(path, cwd)) if Path(os.path.abspath(path)).is_relative_to(os.path.abspath(cwd)) \
            else path
    except ValueError:
        return path


def spec_from_flags(model: str, **flags) -> CheckSpec:
    """`isocompress check MODEL --max-params …`: one check from flags (paths relative to the working directory)."""
    data = {key.replace("_", "-"): value for key, value in flags.items() if value is not None}
    return CheckSpec.from_dict({"model": model, **data}, COMMAND_LINE, None)
