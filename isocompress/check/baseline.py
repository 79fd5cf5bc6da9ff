"""`isocompress check --baseline`: an earlier run's values, matched to this run's results."""

from __future__ import annotations

import math
import os
from pathlib import Path

from isocompress.api.recipe import is_number, show
from isocompress.check.config import PERCENT_OF_Y
from isocompress.check.measure import CheckResult, measurement_of_report
from isocompress.core.errors import IsocompressError


# --- baselines ---------------------------------------------------------------------------------------------------
def load_baseline(path: str | os.PathLike) -> list[dict]:
    """Entries {model, recipe, metric, measure, unit, measured} from a `check --json` output (a list) or from a
    shrink report.json (an object)."""
    path = Path(path)
    from isocompress.formats.io import input_exists

    if not input_exists(path) or not path.is_file():
        raise IsocompressError(f"{path}: no such file; --baseline takes a `check --json` output or a report.json")
    from isocompress.core.limits import MAX_BASELINE_BYTES, loads_json

    try:
        if path.stat().st_size > MAX_BASELINE_BYTES:
            raise IsocompressError(f"{path}: is {path.stat().st_size:,} bytes; a --baseline is limited to"
                                   f" {MAX_BASELINE_BYTES:,}")
        data = loads_json(path.read_bytes().decode("utf-8"), str(path), "baseline", MAX_BASELINE_BYTES)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise IsocompressError(f"{path}: not a JSON baseline ({str(exc).splitlines()[0][:120]}); write it with"
                               " `isocompress check --json > FILE`") from None
    try:
        entries = _baseline_from_results(data) if isinstance(data, list) else _baseline_from_report(data)
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
        raise IsocompressError(f"{path}: not a `check --json` output or a shrink report.json (bad or missing"
                               f" {show(str(exc), 80)}); regenerate it") from None
    return entries


def _baseline_from_results(items: list) -> list[dict]:
    entries = []
    for item in items:
        measured = item["measured"]
        if measured is not None and not is_finite_number(measured):
            raise ValueError("measured")
        if not isinstance(item["model"], str) or not isinstance(item["metric"], str):
            raise ValueError("model/metric")
        for key in ("recipe", "measure", "unit"):
            if item.get(key) is not None and not isinstance(item[key], str):
                raise ValueError(key)
        entries.append({"model": item["model"], "recipe": item.get("recipe"), "metric": item["metric"],
                        "measure": item.get("measure"), "unit": item.get("unit"), "measured": measured})
    return entries


def is_finite_number(value) -> bool:
    """A number a baseline may hold: not bool, not NaN/Infinity, within the float64 range."""
    try:
        return is_number(value) and math.isfinite(float(value))
    except OverflowError:
        return False


def _baseline_from_report(report: dict) -> list[dict]:
    m = measurement_of_report(report)
    recipe = report.get("recipe") or {}
    path = recipe.get("path") if isinstance(recipe, dict) else None
    if not isinstance(report["model"], str) or (path is not None and not isinstance(path, str)):
        raise ValueError("model/recipe")
    base = {"model": report["model"], "recipe": path}
    entries = [{**base, "metric": "params", "measure": None, "unit": "params", "measured": m.params},
               {**base, "metric": "bytes", "measure": m.bytes_measure, "unit": "bytes", "measured": m.bytes}]
    if not all(v is None or is_finite_number(v) for v in (m.params, m.bytes, m.output_scale)):
        raise ValueError("params/bytes")
    for measure, (value, _) in m.errors.items():
        if not is_finite_number(value):
            raise ValueError(f"error {measure}")
        entries.append({**base, "metric": "error", "measure": measure, "unit": "|Δy|", "measured": value})
        if m.output_scale:
            entries.append({**base, "metric": "error", "measure": measure, "unit": PERCENT_OF_Y,
                            "measured": 100.0 * value / m.output_scale})
    after = report.get("pruning", {}).get("empirical", {}).get("accuracy_after")
    if after is not None:
        if not is_finite_number(after):
            raise ValueError("accuracy_after")
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
