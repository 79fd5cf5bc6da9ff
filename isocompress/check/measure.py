"""`isocompress check` measurement: a check's model (or its recipe's shrunk output) measured against its limits."""

from __future__ import annotations

import math
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from isocompress.api import shrink as api
from isocompress.api.recipe import Recipe
from isocompress.check.config import PERCENT_OF_Y, CheckSpec
from isocompress.core.errors import IsocompressError
from isocompress.formats import io


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
    certified_top1: float | None = None
    certified_top1_note: str | None = None


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
    if metric == "certified-top1":
        return ("prune less (a larger budget, or min-certified-top1 as the recipe's goal), a smaller certify-radius,"
                " or lower min-certified-top1")
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
    if spec.min_certified_top1 is not None:
        if m.certified_top1 is None:
            raise IsocompressError(f"{spec.where}: 'min-certified-top1' needs local certificates: give the check or its"
                                   " recipe calibration data (points to certify around)")
        results.append(limit_result(index, spec, recipe, "certified-top1", m.certified_top1, spec.min_certified_top1,
                                    ">=", measure="certified", unit="fraction", note=m.certified_top1_note))
    return results


def error_result(index: int, spec: CheckSpec, recipe: Recipe | None, m: Measurement) -> CheckResult:
    value, note = m.errors[spec.error_measure]
    if value is None:
        raise IsocompressError(f"{spec.where}: 'max-error' with the certified measure needs an input domain: give the"
                               " recipe 'calibration' or 'input-radius' (or use error-measure = \"empirical\")")
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
    test_labels = labels_of_test_data(spec.test_data, spec.test_labels)
    if test_labels is not None:
        x, labels = load_labelled(spec.test_data, test_labels, model.input_shape)
        with torch.no_grad():
            m.accuracy = accuracy(model(x), labels)
        m.accuracy_note = f"the model on {len(labels)} test inputs"
    elif spec.labels is not None:
        x, labels = load_labelled(spec.calibration, spec.labels, model.input_shape)
        with torch.no_grad():
            m.accuracy = accuracy(model(x), labels)
        m.accuracy_note = f"the model on {len(labels)} calibration inputs"
    return m


def measure_recipe(spec: CheckSpec, recipe: Recipe) -> Measurement:
    """Shrink with the recipe into a temporary directory (never into the repository), then measure the result."""
    calibration = spec.calibration or recipe.calibration
    labels = spec.labels or (recipe.labels if spec.calibration is None else None)
    if recipe.sweep is not None:  # its goal: the smallest of its budgets meeting its limits, on the check's data
        from isocompress.api.sweep import resolve_recipe

        test_data = spec.test_data or recipe.test_data
        test_labels = spec.test_labels or (recipe.test_labels if spec.test_data is None else None)
        recipe, _ = resolve_recipe(spec.model, replace(recipe, calibration=calibration, labels=labels,
                                                       test_data=test_data, test_labels=test_labels))
    with tempfile.TemporaryDirectory(prefix="isocompress-check-") as tmp:
        options = recipe.to_options()
        if spec.ref_intrinsic_length is not None:
            options = replace(options, ref_intrinsic_length=spec.ref_intrinsic_length)
        if spec.precision is not None:  # the check's precision overrides the recipe's (and its dtype)
            options = replace(options, precision=spec.precision, dtype=None)
        if spec.certify_effort is not None:
            options = replace(options, certify_effort=spec.certify_effort)
        report = api.shrink_file(spec.model, Path(tmp) / "out", options, calibration=calibration,
                                 labels=labels, progress=False, recipe=recipe.provenance(),
                                 certify_data=recipe.certify_data, test_data=recipe.test_data,
                                 test_labels=recipe.test_labels)
        m = measurement_of_report(report)
        test_data = spec.test_data or recipe.test_data
        test_labels = labels_of_test_data(test_data, spec.test_labels or (recipe.test_labels if spec.test_data is None
                                                                          else None))
        if test_labels is not None:
            x, y = load_labelled(test_data, test_labels, tuple(report["input_shape"]))
            m.accuracy = accuracy(saved_outputs(report, x), y)
            m.accuracy_note = f"the saved {'safetensors' if 'safetensors' in report['files'] else 'ONNX'} file" \
                              f" on {len(y)} test inputs"
        elif labels is not None:
            x, y = load_labelled(calibration, labels, tuple(report["input_shape"]))
            m.accuracy = accuracy(saved_outputs(report, x), y)
            m.accuracy_note = f"the saved {'safetensors' if 'safetensors' in report['files'] else 'ONNX'} file" \
                              f" on {len(y)} calibration inputs"
    return m


def measurement_of_report(report: dict) -> Measurement:
    """params, bytes and errors of a shrink report (also how a report.json baseline is read)."""
    probe = report["probe"]
    saved = float(probe["saved_file"]["max_abs"])
    empirical_note = f"max |Δy| of the saved file on {probe['inputs']}"
    local = report.get("pruning", {}).get("local") or {}
    top1 = local.get("certified_top1")
    top1_note = None if top1 is None else \
        f"top-1 certified unchanged within ε = {local['radius']:.4g} for {local['n_certified']} of {local['n_points']}" \
        + ("" if local.get("n_refuted") is None else f"; disagreement found (verified) for {local['n_refuted']}")
    if "pruning" in report and report["pruning"]["certified"]["max_abs"] is None:
        certified = (None, report["pruning"]["certified"].get("note"))
    elif "pruning" in report:
        cert = report["pruning"]["certified"]
        covers = f"; covers {cert['covers']}" if cert.get("covers") else ""
        certified = (float(cert["max_abs"]),
                     f"certified for |x| ≤ {report['pruning']['radius']:.4g} ({report['pruning']['radius_source']})"
                     + covers)
    else:
        certified = (saved, f"exact recipe: no bound needed; measured {empirical_note}")
    bytes_after = report["bytes_after"]
    return Measurement(params=int(report["params_after"]), bytes=int(sum(bytes_after.values())),
                       bytes_measure="+".join(bytes_after), errors={"certified": certified,
                                                                   "empirical": (saved, empirical_note)},
                       output_scale=probe["float64"].get("max_norm_reference"), certified_top1=top1,
                       certified_top1_note=top1_note)


def labels_of_test_data(test_data, test_labels):
    """The test labels' file: test-labels, else the test data itself where it holds x and y (models/M.test.npz)."""
    from isocompress.formats import data

    if test_labels is None and test_data is not None and data.has_labels(test_data):
        return test_data
    return test_labels


def load_labelled(calibration: str, labels: str, n_in: int | tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
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

    from isocompress.export import onnx_export

    session = onnx_export.ort_session(files["onnx"])
    dtype = np.float64 if report.get("onnx", {}).get("dtype") == "float64" else np.float32
    feed = {onnx_export.INPUT_NAME: x.numpy().astype(dtype)}
    return torch.from_numpy(np.asarray(session.run([onnx_export.OUTPUT_NAME], feed)[0]))


