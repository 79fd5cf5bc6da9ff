"""Recipes: a named, versioned compression written as TOML (`recipes/*.toml`), used by `shrink --recipe` and `check`.

    name = "edge-10pct"              # optional, default: the file's stem
    version = 1                      # optional, int or string, default "1"
    description = "..."              # optional
    budget = "10%"                   # or 0.1 (fraction), 20000 (count); or max-error = 0.05 | "1%"; or exact = true
    basis = "auto"                   # auto | data-free | data-aware
    calibration = "../models/x.npy"  # relative to the recipe file; labels likewise
    input-radius = 5.0
    formats = ["safetensors", "onnx"]
    onnx-tol = 1e-4
    dtype = "float32"
    precision = "float32"            # float32 | float16 | int8-weights (certified deployed files; docs/bounds.md §5b)

Neither budget nor max-error means exact (lossless). Unknown keys and bad values are `IsocompressError`s naming the
file and the key. `Recipe` validates itself, round-trips through `to_dict`/`from_dict` (the TOML keys) and converts to
`api.ShrinkOptions`. Value parsers shared with `isocompress.check.run` live here too.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from isocompress.api.shrink import ShrinkOptions
from isocompress.bounds.branch import DEFAULT_EFFORT, EFFORTS
from isocompress.core.errors import IsocompressError
from isocompress.core.parsing import (  # noqa: F401  (re-exported: recipe.X as before)
    COMMAND_LINE,
    FLAGS_ONLY,
    FORMATS,
    check_keys,
    fail,
    is_number,
    parse_budget,
    parse_bytes,
    parse_choice,
    parse_count,
    parse_formats,
    parse_fraction,
    parse_max_error,
    parse_path,
    parse_percent,
    parse_positive,
    parse_radii,
    parse_text,
    show,
)

BASES = ("auto", "data-free", "data-aware")
DTYPES = ("float32", "float64", "float16", "bfloat16")
PRECISION_NAMES = ("float32", "float16", "int8-weights", "int8")  # int8 is refused (core.precision.INT8_NOT_YET)
RECIPE_KEYS = ("name", "version", "description", "exact", "budget", "max-error", "min-certified-top1", "basis",
               "calibration", "labels", "input-radius", "certify-radius", "certify-data", "certify-effort", "test-data",
               "test-labels", "formats", "onnx-tol", "dtype", "ref-intrinsic-length", "sweep", "precision")
GOAL_KEYS = ("exact", "budget", "max-error", "min-certified-top1")
DATA_KEYS = ("calibration", "labels", "certify-data", "test-data", "test-labels")  # paths, relative to the recipe
FIELD_KEYS = {"max_error": "max-error", "max_error_percent": "max-error", "input_radius": "input-radius",
              "onnx_tol": "onnx-tol", "certify_radius": "certify-radius", "min_certified_top1": "min-certified-top1",
              "certify_data": "certify-data", "certify_effort": "certify-effort", "test_data": "test-data", "test_labels": "test-labels",
              "ref_intrinsic_length": "ref-intrinsic-length"}
REF_MODES = ("log", "raw")
SWEEP_KEYS = ("budgets", "max-params", "max-bytes", "min-accuracy", "min-certified-top1")
DEFAULT_BUDGETS = ("50%", "20%", "10%", "5%", "2%")
NEEDS_GOAL = ("needs a lossy goal (a budget, a max-error or a min-certified-top1): an exact shrink keeps every output,"
              " so there is nothing to certify; give a goal or drop it")


def parse_version(value, where: str) -> str:
    if is_number(value) and isinstance(value, int) and value >= 0:
        return str(value)
    if isinstance(value, str) and value.strip() and "\n" not in value and len(value) <= 64:
        return value.strip()
    raise fail(where, "version", f"is {show(value)}; use a whole number (1) or a version string (\"1.2.0\")")


def read_toml(path: str | os.PathLike, what: str) -> dict:
    """A TOML file as a dict; every failure (missing, unreadable, not UTF-8, bad syntax) one line naming the file."""
    path = Path(path)
    from isocompress.formats.io import input_exists

    if not input_exists(path) or not path.is_file():
        hint = "is a directory" if path.is_dir() else "no such file"
        raise IsocompressError(f"{path}: {hint}; expected a {what} (.toml)")
    from isocompress.core.limits import MAX_TEXT_BYTES

    try:
        if path.stat().st_size > MAX_TEXT_BYTES:
            raise IsocompressError(f"{path}: is {path.stat().st_size:,} bytes; a {what} is limited to {MAX_TEXT_BYTES:,}")
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise IsocompressError(f"{path}: cannot read the {what} ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise IsocompressError(f"{path}: is not UTF-8 text; a {what} must be a UTF-8 TOML file") from None
    return parse_toml_text(text, str(path), what)


def parse_toml_text(text: str, where: str, what: str) -> dict:
    """TOML text as a dict, after the size and nesting limits of isocompress.core.limits (no RecursionError)."""
    from isocompress.core.limits import check_parsed_depth, check_text

    check_text(text, where, what, toml=True)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise IsocompressError(f"{where}: not valid TOML ({one_line(exc)}); fix the {what}") from None
    except RecursionError:
        raise IsocompressError(f"{where}: nests too deeply; flatten the {what}") from None
    check_parsed_depth(data, where, what)
    return data


def one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:200]


# --- the recipe ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recipe:
    """One compression. No budget, max_error or max_error_percent: exact. `path`: where it was read from (not a key)."""

    name: str
    version: str = "1"
    description: str = ""
    budget: float | None = None
    max_error: float | None = None
    max_error_percent: float | None = None
    basis: str = "auto"
    calibration: str | None = None
    labels: str | None = None
    input_radius: float | None = None
    formats: tuple[str, ...] = FORMATS
    onnx_tol: float = 1e-4
    dtype: str | None = None
    ref_intrinsic_length: str | None = None
    certify_radius: float | str | tuple | None = None  # 0.05, "1%" or several (core.parsing.parse_radii)
    min_certified_top1: float | None = None
    certify_data: str | None = None
    certify_effort: str | None = None  # fast | normal | thorough (None: normal)
    test_data: str | None = None
    test_labels: str | None = None
    precision: str | None = None
    sweep: dict | None = None  # a [sweep] table: budgets to try and limits (SweepLimits); the goal is the smallest
    path: str | None = None    # of those budgets whose model meets every limit (api.sweep)

    def __post_init__(self) -> None:
        where = self.where
        object.__setattr__(self, "name", parse_text(self.name, where, "name"))
        object.__setattr__(self, "version", parse_version(self.version, where))
        object.__setattr__(self, "description", parse_text(self.description, where, "description", allow_empty=True))
        object.__setattr__(self, "formats", parse_formats(self.formats, where))
        for key in ("calibration", "labels", "certify_data", "test_data", "test_labels"):
            if getattr(self, key) is not None:
                object.__setattr__(self, key, parse_path(getattr(self, key), where, FIELD_KEYS.get(key, key), None))
        if self.labels is not None and self.calibration is None:
            raise fail(where, "labels", "needs 'calibration' (the inputs the labels belong to)")
        if self.test_labels is not None and self.test_data is None:
            raise fail(where, "test-labels", "needs 'test-data' (the inputs the labels belong to)")
        if self.certify_radius is not None:
            object.__setattr__(self, "certify_radius", parse_radii(self.certify_radius, where, "certify-radius"))
        for key in ("certify_data", "certify_radius"):
            if getattr(self, key) is not None and self.exact:
                raise fail(where, FIELD_KEYS[key], NEEDS_GOAL)
        for name in ("budget", "max_error", "max_error_percent", "input_radius", "onnx_tol", "min_certified_top1"):
            value = getattr(self, name)
            if value is not None and not is_number(value):
                raise fail(where, FIELD_KEYS.get(name, name), f"is {show(value)}; it must be a number")
        if self.sweep is not None:
            object.__setattr__(self, "sweep", parse_sweep_table(self.sweep, where))
            if not all(v is None for v in (self.budget, self.max_error, self.max_error_percent,
                                           self.min_certified_top1)):
                raise fail(where, "sweep", "cannot be combined with another goal (budget, max-error,"
                           " min-certified-top1): the sweep's goal is the smallest of its budgets meeting its limits")
        try:
            self.to_options(self.sweep["budgets"][0] if self.sweep is not None else None)
        except IsocompressError as exc:
            raise IsocompressError(f"{where}: {exc}") from None

    @property
    def where(self) -> str:
        if self.path is None and self.name == FLAGS_ONLY:
            return COMMAND_LINE
        return self.path or f"recipe {show(self.name)}"

    @property
    def exact(self) -> bool:
        return all(v is None for v in (self.budget, self.max_error, self.max_error_percent, self.min_certified_top1,
                                       self.sweep))

    def to_options(self, budget=None) -> ShrinkOptions:
        """The ShrinkOptions of this recipe (`budget`: the one a sweep chose, for a recipe whose goal is a sweep)."""
        relative = None if self.max_error_percent is None else self.max_error_percent / 100.0
        budget = self.budget if budget is None else budget
        return ShrinkOptions(budget=budget, max_error=self.max_error, max_error_relative=relative,
                             basis=self.basis, input_radius=self.input_radius, formats=self.formats,
                             onnx_tol=self.onnx_tol, dtype=self.dtype, certify_radius=self.certify_radius,
                             min_certified_top1=self.min_certified_top1,
                             certify_effort=self.certify_effort or DEFAULT_EFFORT,
                             ref_intrinsic_length=self.ref_intrinsic_length, precision=self.precision)

    def to_dict(self) -> dict:
        """The recipe as its TOML keys (what `from_dict` reads back); `exact` always, the goal key if lossy."""
        data: dict = {"name": self.name, "version": self.version, "description": self.description, "exact": self.exact}
        if self.budget is not None:
            data["budget"] = int(self.budget) if self.budget > 1 else self.budget
        if self.max_error is not None:
            data["max-error"] = self.max_error
        if self.max_error_percent is not None:
            percent = self.max_error_percent
            data["max-error"] = f"{int(percent) if percent == int(percent) and percent < 1e15 else percent!r}%"
        if self.min_certified_top1 is not None:
            data["min-certified-top1"] = self.min_certified_top1
        data["basis"] = self.basis
        optional = {"calibration": self.calibration, "labels": self.labels, "input-radius": self.input_radius,
                    "dtype": self.dtype, "certify-data": self.certify_data,
                    "certify-radius": list(self.certify_radius) if isinstance(self.certify_radius, tuple)
                    else self.certify_radius, "certify-effort": self.certify_effort,
                    "test-data": self.test_data, "test-labels": self.test_labels,
                    "ref-intrinsic-length": self.ref_intrinsic_length, "precision": self.precision}
        data.update({k: v for k, v in optional.items() if v is not None})
        data.update({"formats": list(self.formats), "onnx-tol": self.onnx_tol})
        if self.sweep is not None:
            data["sweep"] = {**self.sweep, "budgets": list(self.sweep["budgets"])}
        return data

    @classmethod
    def from_dict(cls, data, where: str = "recipe", base_dir: Path | None = None, default_name: str | None = None,
                  path: str | None = None) -> "Recipe":
        """Reads the TOML keys; relative calibration/labels paths are taken relative to `base_dir`."""
        if not isinstance(data, dict):
            raise IsocompressError(f"{where}: a recipe must be a table of keys, got {type(data).__name__}")
        check_keys(data, RECIPE_KEYS, where)
        kwargs = {"path": path, **_goal(data, where)}
        kwargs["name"] = parse_text(data["name"], where, "name") if "name" in data else default_name
        if kwargs["name"] is None:
            raise fail(where, "name", "is missing; give the recipe a name")
        if "version" in data:
            kwargs["version"] = parse_version(data["version"], where)
        if "description" in data:
            kwargs["description"] = parse_text(data["description"], where, "description", allow_empty=True)
        if "basis" in data:
            kwargs["basis"] = parse_choice(data["basis"], BASES, where, "basis")
        for key in DATA_KEYS:
            if key in data:
                kwargs[key.replace("-", "_")] = parse_path(data[key], where, key, base_dir)
        if "input-radius" in data:
            kwargs["input_radius"] = parse_positive(data["input-radius"], where, "input-radius")
        if "certify-radius" in data:
            kwargs["certify_radius"] = parse_radii(data["certify-radius"], where, "certify-radius")
        if "certify-effort" in data:
            kwargs["certify_effort"] = parse_choice(data["certify-effort"], tuple(EFFORTS), where, "certify-effort")
        if "formats" in data:
            kwargs["formats"] = parse_formats(data["formats"], where)
        if "onnx-tol" in data:
            kwargs["onnx_tol"] = parse_positive(data["onnx-tol"], where, "onnx-tol")
        if "dtype" in data:
            kwargs["dtype"] = parse_choice(data["dtype"], DTYPES, where, "dtype")
        if "precision" in data:
            kwargs["precision"] = parse_choice(data["precision"], PRECISION_NAMES, where, "precision")
        if "ref-intrinsic-length" in data:
            kwargs["ref_intrinsic_length"] = parse_choice(data["ref-intrinsic-length"], REF_MODES, where,
                                                          "ref-intrinsic-length")
        if "sweep" in data:
            kwargs["sweep"] = parse_sweep_table(data["sweep"], where)
        return cls(**kwargs)

    def with_overrides(self, **flags) -> tuple["Recipe", list[str]]:
        """Command-line flags over recipe values (None: not given). A goal flag (exact, budget, max_error,
        max_error_percent) replaces the recipe's goal. Returns (effective recipe, names of the overridden keys)."""
        given = {k: v for k, v in flags.items() if v is not None and v is not False}
        goal_flags = {"exact", "budget", "max_error", "max_error_percent", "min_certified_top1"}
        if goal_flags & set(given):
            base = replace(self, budget=None, max_error=None, max_error_percent=None, min_certified_top1=None,
                           sweep=None)
        else:
            base = self
        given.pop("exact", None)
        if "calibration" in given and "labels" not in given:
            given["labels"] = None  # the recipe's labels belong to the recipe's calibration inputs
        if "test_data" in given and "test_labels" not in given:
            given["test_labels"] = None
        names = {f.name for f in fields(self)}
        unknown = set(given) - names
        if unknown:
            raise IsocompressError(f"cannot override recipe key {sorted(unknown)[0]!r}")
        overridden = sorted({FIELD_KEYS.get(k, k) for k in flags if flags[k] is not None and flags[k] is not False})
        return replace(base, **given), overridden

    def provenance(self, overridden: list[str] | None = None) -> dict:
        """What report.json's "recipe" records beside the options: which recipe, which version, what was overridden."""
        return {"name": self.name, "version": self.version, "description": self.description, "path": self.path,
                "overridden": list(overridden or [])}


def parse_budgets(value, where: str, key: str = "budgets") -> tuple[str, ...]:
    """"50%,20%,5%" or a list ["50%", 0.2, 7500] → the budgets as text, each validated as `--budget` is."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items:
        raise fail(where, key, f"is {show(value)}; give budgets such as \"50%,20%,10%,5%,2%\"")
    out = []
    for item in items:
        if isinstance(item, str) and not item.strip():
            raise fail(where, key, f"has an empty entry in {show(value)}; give budgets such as \"50%,20%,5%\"")
        parse_budget(item.strip() if isinstance(item, str) else item, where, key)
        out.append(item.strip() if isinstance(item, str) else f"{item:g}")
    if len(set(out)) != len(out):
        raise fail(where, key, f"lists a budget twice: {show(value)}")
    return tuple(out)


def parse_sweep_table(table, where: str) -> dict:
    """A recipe's [sweep] table: `budgets` (default DEFAULT_BUDGETS) and any of the limits max-params, max-bytes,
    min-accuracy, min-certified-top1 (at least one: they choose the model), normalised."""
    if not isinstance(table, dict):
        raise fail(where, "sweep", f"is {show(table)}; write a [sweep] table with budgets and limits")
    check_keys(table, SWEEP_KEYS, f"{where}: [sweep]")
    limits = SweepLimits(**{k.replace("-", "_"): v for k, v in table.items() if k != "budgets"},
                         where=f"{where}: [sweep]")
    if not limits.given():
        raise fail(where, "sweep", f"has no limits; give at least one of {', '.join(SWEEP_KEYS[1:])}")
    budgets = parse_budgets(table.get("budgets", DEFAULT_BUDGETS), f"{where}: [sweep]")
    return {"budgets": budgets, **limits.given()}


@dataclass(frozen=True)
class SweepLimits:
    """What a sweep's chosen model must meet: max-params, max-bytes (of the ONNX file), min-accuracy (on the test data,
    or the labelled calibration data), min-certified-top1 (at the certify radius). Validates itself."""

    max_params: int | str | None = None
    max_bytes: int | str | None = None
    min_accuracy: float | str | None = None
    min_certified_top1: float | str | None = None
    where: str = field(default="sweep", compare=False)

    def __post_init__(self) -> None:
        parsers = {"max_params": parse_count, "max_bytes": parse_bytes, "min_accuracy": parse_fraction,
                   "min_certified_top1": parse_fraction}
        for name, parser in parsers.items():
            if getattr(self, name) is not None:
                object.__setattr__(self, name, parser(getattr(self, name), self.where, name.replace("_", "-")))

    def given(self) -> dict:
        return {key: getattr(self, key.replace("-", "_")) for key in SWEEP_KEYS[1:]
                if getattr(self, key.replace("-", "_")) is not None}

    def meets(self, row: dict) -> dict:
        """{limit: met} for every limit given (a measure that is missing meets nothing)."""
        measured = {"max-params": row.get("params"), "max-bytes": row.get("onnx_bytes"),
                    "min-accuracy": row.get("accuracy"), "min-certified-top1": row.get("certified_top1")}
        out = {}
        for key, limit in self.given().items():
            value = measured[key]
            out[key] = value is not None and (value <= limit if key.startswith("max") else value >= limit)
        return out

    def describe(self) -> str:
        parts = []
        for key, limit in self.given().items():
            shown = f"{limit:,} B" if key == "max-bytes" else f"{limit:.2%}" if key.startswith("min") else f"{limit:,}"
            parts.append(f"{key} {'≤' if key.startswith('max') else '≥'} {shown}")
        return ", ".join(parts)


def _goal(data: dict, where: str) -> dict:
    """exact = true | budget | max-error: at most one; exact = false needs one of the others."""
    given = [k for k in GOAL_KEYS if k in data]
    if "exact" in data and not isinstance(data["exact"], bool):
        raise fail(where, "exact", f"is {show(data['exact'])}; use true or false")
    lossy = [k for k in given if k != "exact"]
    if len(lossy) > 1:
        raise fail(where, lossy[1], f"cannot be combined with {lossy[0]!r}; give one goal")
    if data.get("exact") is True and lossy:
        raise fail(where, lossy[0], "cannot be combined with 'exact = true'; drop one of them")
    if data.get("exact") is False and not lossy:
        raise fail(where, "exact", "is false but there is no 'budget', 'max-error' or 'min-certified-top1'; give one,"
                   " or drop 'exact'")
    if "budget" in data:
        return {"budget": parse_budget(data["budget"], where)}
    if "max-error" in data:
        absolute, percent = parse_max_error(data["max-error"], where)
        return {"max_error": absolute, "max_error_percent": percent}
    if "min-certified-top1" in data:
        return {"min_certified_top1": parse_fraction(data["min-certified-top1"], where, "min-certified-top1")}
    return {}


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read and validate a recipe file. Paths inside it are relative to the file's directory."""
    path = Path(path)
    data = read_toml(path, "recipe")
    return Recipe.from_dict(data, where=str(path), base_dir=path.parent, default_name=path.stem, path=str(path))


def parse_recipe_text(text: str, where: str = "recipe", base_dir: Path | None = None) -> Recipe:
    """A recipe from TOML text (for tests and tools); errors name `where`."""
    return Recipe.from_dict(parse_toml_text(text, where, "recipe"), where=where, base_dir=base_dir,
                            default_name="recipe", path=where)
