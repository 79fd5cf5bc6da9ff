"""Top-level verbs, one per user action. The CLI (`isocompress.cli`) is a thin layer over these."""

from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterator

import torch

from isocompress.bounds.branch import EFFORTS
from isocompress.core.errors import CheckFailed, IsocompressError
from isocompress.core.measure import (  # noqa: F401
    PROBE_SCALES,
    difference,
    exact_rule_inputs,
    output_difference,
    output_scale,
    probe_description,
    probe_inputs,
)
from isocompress.core.model import IsoMLP
from isocompress.core.parsing import is_number, parse_budget, parse_formats, parse_max_error, parse_radii
from isocompress.core.progress import progress_bar
from isocompress.exact.shrink import EXACT_PROBE_RTOL, exact_steps, shrink_exact, shrink_exact_accounted  # noqa: F401
from isocompress.formats import io


def layer_summary(model: IsoMLP) -> list[dict]:
    return [layer.record(i) for i, layer in enumerate(model.layers)]


# --- files -------------------------------------------------------------------------------------------------------
def default_out_dir(model_path: Path) -> Path:
    return Path.cwd() / f"{model_path.stem}.shrunk"


OUTPUT_NAMES = ("model.", "report.json")  # what a run may publish into --out (names starting so)


def check_out_target(path: Path, inputs: list[Path]) -> None:
    """Refuses an --out that is a file, or one whose published files would replace an input (also through a
    symlink named like an output)."""
    if path.exists() and not path.is_dir():
        raise IsocompressError(f"{path}: exists and is not a directory; choose another --out")
    out_abs, out_real = Path(os.path.abspath(path)), path.resolve()
    inputs_abs = {Path(os.path.abspath(p)) for p in inputs}
    inputs_real = {p.resolve() for p in inputs}
    if out_real in inputs_real or out_abs in inputs_abs:
        raise IsocompressError(f"{path}: would overwrite the input model; choose another --out")
    for p in inputs_abs | inputs_real:
        if p.parent in (out_abs, out_real) and p.name.startswith(OUTPUT_NAMES):
            raise IsocompressError(f"{path}: would overwrite the input {p.name}; choose another --out")
    if path.is_dir():
        for entry in path.iterdir():
            if entry.name.startswith(OUTPUT_NAMES) and entry.resolve() in inputs_real:
                raise IsocompressError(f"{entry}: links to an input; publishing would replace it; choose another --out")


@contextmanager
def output_dir(path: Path, inputs: list[Path]) -> Iterator[Path]:
    """A private stage directory for a run's outputs (isocompress.formats.publish): write every output there, report.json
    included; when the block ends they are hashed, verified and published into `path` together. On failure nothing is
    published and the previous contents of `path` stay as they were. Refuses to write over inputs."""
    from isocompress.formats import publish

    check_out_target(path, inputs)
    try:
        with publish.staged(path) as stage:
            yield stage.dir
    except OSError as exc:
        raise publish.name_the_target(exc, path) from None


def final_paths(files: dict[str, Path], out: Path) -> dict[str, str]:
    """Where staged files will be once published."""
    return {name: str(out / Path(p).name) for name, p in files.items()}


def parse_dtype(name: str | None, default: torch.dtype) -> torch.dtype:
    if name is None:
        return default
    table = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in table:
        raise IsocompressError(f"--dtype {name!r} is not supported; use one of {', '.join(table)}")
    return table[name]


@dataclass(frozen=True)
class ShrinkOptions:
    """Everything that decides what `shrink` does (a recipe is one of these written as TOML). Validates itself.

    None of budget, max_error, max_error_relative: exact (lossless). budget: fraction (0 < b ≤ 1) of the original
    parameters or an absolute count (> 1). max_error: prune as far as possible while the certified bound on |Δy| stays
    ≤ this. max_error_relative: the same with the limit given as a fraction of the largest output norm |y| on the
    calibration inputs (random probe inputs without calibration). basis: "data-free" (singular values, the paper's
    rule) or "data-aware" (principal axes of calibration pre-activations).
    """

    budget: float | str | None = None  # 0.05, "5%" or 7500 (parsed: a float afterwards)
    max_error: float | str | None = None  # 0.01, or "1%" (then stored as max_error_relative = 0.01)
    basis: str = "auto"
    input_radius: float | None = None
    formats: tuple[str, ...] = ("safetensors", "onnx")
    onnx_tol: float = 1e-4
    dtype: str | None = None
    max_error_relative: float | None = None
    ref_intrinsic_length: str | None = None  # how to read a reference checkpoint's intrinsic_length: log | raw
    # ε of the local certificates (default: prune.resolve_certify_radii): 0.05, "1%" (of the median input norm of the
    # certified points) or several of them, ("0.5%", "1%", 0.1), for a curve against ε (the first is the primary ε)
    certify_radius: float | str | tuple | None = None
    min_certified_top1: float | None = None  # issue 10: a goal: the smallest model certified for this share of points
    precision: str | None = None  # float32 | float16 | int8-weights (core.precision); None: from dtype (float32)
    certify_effort: str = "normal"  # local certificates: fast | normal | thorough (bounds.branch.EFFORTS)

    def __post_init__(self) -> None:
        if isinstance(self.formats, str):  # "safetensors,onnx", as the CLI takes it
            object.__setattr__(self, "formats", parse_formats(self.formats, "ShrinkOptions", "formats"))
        if not hasattr(self.formats, "__iter__"):
            raise IsocompressError(f"formats {self.formats!r}: give a list such as ('safetensors', 'onnx')")
        object.__setattr__(self, "formats", tuple(self.formats))
        self._validate_goal()
        if self.basis not in ("auto", "data-free", "data-aware"):
            raise IsocompressError(f"basis {self.basis!r} is not one of auto, data-free, data-aware")
        if self.input_radius is not None and not (is_number(self.input_radius) and 0 < self.input_radius < math.inf):
            raise IsocompressError(f"input radius {self.input_radius!r} must be a positive finite number")
        unknown = [f for f in self.formats if f not in ("safetensors", "onnx")]
        if unknown or not self.formats:
            raise IsocompressError(f"format {unknown[0] if unknown else '(none)'!r}: choose from safetensors, onnx")
        if not (is_number(self.onnx_tol) and 0 < self.onnx_tol < math.inf):
            raise IsocompressError(f"onnx tolerance {self.onnx_tol!r} must be a positive finite number")
        io.check_ref_mode(self.ref_intrinsic_length, "reference intrinsic length")
        if self.certify_radius is not None:  # 0.05, "1%", or several: "0.5%,1%,2%", [0.1, 0.2]
            object.__setattr__(self, "certify_radius", parse_radii(self.certify_radius, "ShrinkOptions",
                                                                   "certify_radius"))
        if self.certify_radius is not None and not self.lossy:
            raise IsocompressError("certify radius: needs a lossy goal (a budget, a max-error or a min-certified-top1):"
                                   " an exact shrink keeps every output, so there is nothing to certify")
        if self.certify_effort not in EFFORTS:
            raise IsocompressError(f"certify effort {self.certify_effort!r}: choose from {', '.join(EFFORTS)}")
        if self.dtype not in (None, "float32", "float64", "float16", "bfloat16"):
            raise IsocompressError(f"dtype {self.dtype!r}: choose from float32, float64, float16, bfloat16")
        if self.precision not in (None, "float64"):  # float64: what a --dtype float64 run resolves to
            from isocompress.core.precision import parse_precision

            parse_precision(self.precision, "precision")
            if self.dtype is not None and self.dtype != "float32":
                raise IsocompressError(f"precision {self.precision!r} and dtype {self.dtype!r}: give one of them"
                                       " (--precision stores the weights as it says and the rest in float32)")

    def _validate_goal(self) -> None:
        """budget and max_error as the CLI and recipes take them (5%, 0.05, 7500; 0.01 or "1%"), by the same parsers
        and with the same messages (naming the field, not a flag)."""
        where = "ShrinkOptions"
        goals = [self.budget, self.max_error, self.max_error_relative, self.min_certified_top1]
        if sum(g is not None for g in goals) > 1:
            raise IsocompressError("give one goal: a budget, a max-error or a min-certified-top1")
        if self.min_certified_top1 is not None and not (is_number(self.min_certified_top1)
                                                        and 0 <= self.min_certified_top1 <= 1):
            raise IsocompressError(f"min-certified-top1 {self.min_certified_top1!r} must be a fraction in [0, 1]")
        if self.budget is not None:
            object.__setattr__(self, "budget", parse_budget(self.budget, where, "budget"))
        if self.max_error is not None:
            absolute, percent = parse_max_error(self.max_error, where, "max_error")
            object.__setattr__(self, "max_error", absolute)
            if percent is not None:
                object.__setattr__(self, "max_error_relative", percent / 100.0)
        if self.max_error_relative is not None:
            if not is_number(self.max_error_relative) or not (0 <= self.max_error_relative < math.inf):
                raise IsocompressError(
                    f"{where}: 'max_error_relative' is {self.max_error_relative!r}; it must be a finite fraction ≥ 0"
                    " (or give max_error as a percentage, '1%')"
                )
            object.__setattr__(self, "max_error_relative", float(self.max_error_relative))

    @property
    def lossy(self) -> bool:
        return any(v is not None for v in (self.budget, self.max_error, self.max_error_relative,
                                            self.min_certified_top1))

    def to_dict(self) -> dict:
        data = asdict(self)
        data["formats"] = list(self.formats)
        if isinstance(self.certify_radius, tuple):
            data["certify_radius"] = list(self.certify_radius)
        return data


def shrink_file(
    model_path: str | Path,
    out_dir: str | Path | None = None,
    options: ShrinkOptions | None = None,
    *,
    calibration: str | Path | None = None,
    labels: str | Path | None = None,
    progress: bool = True,
    recipe: dict | None = None,
    certify_data: str | Path | None = None,
    test_data: str | Path | None = None,
    test_labels: str | Path | None = None,
    stream: bool = True,
) -> dict:
    """`isocompress shrink`: load, shrink, write DIR/model.safetensors (+ DIR/model.onnx) and DIR/report.json; returns
    the report. `recipe`: provenance (name, version, path of a recipe file, overriding flags) for report["recipe"].
    `stream=False`: load the whole model even where the streamed exact path applies (it is tested against that)."""
    options, started = options or ShrinkOptions(), time.perf_counter()
    require_goal(options, certify_data)
    labelled = any(p is not None for p in (labels, certify_data, test_data, test_labels))  # checked in memory
    in_memory = in_memory_reason(options, labelled, stream)
    if in_memory is None and (done := shrink_streaming(model_path, out_dir, options, calibration, progress, recipe)):
        return done  # every exact run of a dense tanh MLP: one original layer in memory at a time (exact/stream.py)
    model_path = Path(model_path)
    original, saved_dtype, notes = load_model(model_path, options)
    calib = load_inputs(calibration, original.input_shape) if calibration is not None else None
    label_data = load_labels(labels) if labels is not None else None
    extra = load_extra_data(original.input_shape, calibration, calib, labels, label_data, certify_data, test_data,
                            test_labels)
    out = Path(out_dir) if out_dir is not None else default_out_dir(model_path)
    probes = calib if calib is not None else probe_inputs(original.input_shape)
    inputs = [model_path] + [Path(p) for p in (calibration, labels, certify_data, test_data, test_labels) if p]
    check_ranges(original, calib, saved_dtype, options, model_path, calibration)
    precise = replace(options, precision=resolve_precision(options.precision, saved_dtype))
    effective, resolved = resolve_relative_error(precise, original, probes)
    with output_dir(out, inputs) as stage:
        shrunk, prune_report = compress(original, effective, calib, label_data, progress,
                                        probes=exact_rule_inputs(original.input_shape, calib), extra=extra)
        constant = prune_report.pop("constant_directions") if not options.lossy else None
        plan = deployed_plan(shrunk, effective.precision, prune_report)
        files, onnx_report = write_outputs(shrunk, stage, options, saved_dtype, probes, plan=plan)
        reloaded = io.load(files["safetensors"]) if "safetensors" in files else shrunk.cast(saved_dtype)
        report = {
            "model": str(model_path),
            "exact": not options.lossy,
            "recipe": recipe_record(options, recipe, calibration=calibration, labels=labels, certify_data=certify_data,
                                    test_data=test_data, test_labels=test_labels),
            **shape_record(original, shrunk, model_path, files, saved_dtype),
            "probe": probe_record(original, shrunk, reloaded, calib, probes),
            "files": final_paths(files, out),
            **({"notes": notes} if notes else {}),
            "precision": precision_record(shrunk, plan, prune_report),
            "streamed": False,
            "in_memory_because": in_memory or STREAMED_KINDS,
        }
        add_results(report, constant, prune_report, resolved, onnx_report)
        report["seconds"] = round(time.perf_counter() - started, 4)
        write_report(report, stage)
    return report


STREAMED_KINDS = ("the streamed path reads dense tanh MLPs in isocompress's own layouts and the reference state_dict;"
                  " this file was read whole (a CNN, a log1p network or another container)")


def require_goal(options: ShrinkOptions, certify_data) -> None:
    if certify_data is not None and not options.lossy:
        raise IsocompressError("--certify-data needs a lossy goal (--budget, --max-error or --min-certified-top1): an"
                               " exact shrink keeps every output, so there is nothing to certify; give a goal or drop it")


def in_memory_reason(options: ShrinkOptions, labelled: bool, stream: bool) -> str | None:
    """Why a run holds the whole original model (report["in_memory_because"]), or None where the streamed exact path
    may apply (exact/stream.py)."""
    if options.lossy:
        return ("a lossy goal: the pruning search, its adversarial search, the certificates and the error report"
                " evaluate the original network on many inputs, so it is held whole (streamed pruning is not built)")
    if labelled:
        return "labelled, certify or test data: their reports evaluate the original network, so it is held whole"
    if options.precision not in (None, "float32"):
        return f"--precision {options.precision}: its rounding plan is chosen on the whole model"
    return None if stream else "stream=False"


def probe_record(original: IsoMLP, shrunk: IsoMLP, reloaded: IsoMLP, calib, probes: torch.Tensor) -> dict:
    """report["probe"]: the shrunk network's and the saved file's output differences on the probe inputs."""
    return {"inputs": probe_description(calib, probes), "float64": output_difference(original, shrunk, probes),
            "saved_file": output_difference(original, reloaded, probes)}


def resolve_precision(precision: str | None, saved_dtype: torch.dtype) -> str | None:
    """The precision the files are deployed in: --precision, else that of --dtype (float32 or float64); None where no
    rounding term is derived (float16/bfloat16 files written with --dtype: the certificates then cover the float64
    network only, and report.json says so)."""
    if precision is not None:
        return precision
    return {torch.float32: "float32", torch.float64: "float64"}.get(saved_dtype)


def deployed_plan(model: IsoMLP, precision: str | None, prune_report: dict):
    """The storage/compute plan (core.precision.Plan) the files are written with: the one pruning certified, else
    (an exact run, no domain) the precision's plan without a range proof (float16 then computes in float32)."""
    from isocompress.bounds import deployed

    record = prune_report.get("deployed") if isinstance(prune_report, dict) else None
    if precision is None:
        return None
    if record is not None and record.get("plan") is not None:
        from isocompress.core.precision import Plan

        return Plan.from_record(record["plan"])
    if precision not in ("float32", "float64") and not deployed.supported(model):
        raise IsocompressError(f"--precision {precision} is available for tanh MLPs only yet; use --precision"
                               " float32 for this network")
    return deployed.choose_plan(model, precision, None)


def stream_plan(precision: str):
    from isocompress.core.precision import Plan, plan_for

    return Plan("float64", "float64", "float64", "float64") if precision == "float64" else plan_for(precision)


def precision_record(model: IsoMLP, plan, prune_report: dict) -> dict:
    """report["precision"]: what each kind of tensor is stored in, what the files compute in, and which network the
    certified numbers speak of."""
    from isocompress.bounds import deployed

    if plan is None:
        return {"precision": None, "covers": "the float64 pruned network only: no rounding term is derived for"
                " float16/bfloat16 files written with --dtype; use --precision float16"}
    record = prune_report.get("deployed") if isinstance(prune_report, dict) else None
    certified = record is not None and record.get("bound") is not None
    covers = deployed.COVERS[plan.precision] if certified else (
        "no certificate was computed for this run (no input domain, or an exact run): the files were verified in"
        " onnxruntime against the float64 model")
    return {**plan.describe(), "covers": covers,
            "rounding_bound": record.get("bound") if record else None}


def add_results(report: dict, constant, prune_report, resolved, onnx_report) -> None:
    """An exact run's record of dropped directions (and its probe check), or a lossy run's pruning report; the ONNX
    check's record."""
    if constant is not None:
        report["constant_directions"] = constant
        check_exact(report["probe"]["float64"], constant)
    else:
        report["pruning"] = prune_report
        if resolved is not None:
            report["pruning"]["max_error_resolved"] = {**resolved, "scale_inputs": report["probe"]["inputs"]}
    if onnx_report is not None:
        report["onnx"] = onnx_report


def check_ranges(original: IsoMLP, calib, saved_dtype: torch.dtype, options: ShrinkOptions, model_path: Path,
                 calibration) -> None:
    """Values that do not fit the dtypes the run computes or saves in are input errors, before any work (issue 13)."""
    from isocompress.core import ranges

    ranges.check_run(original, probe_inputs(original.input_shape), calib, saved_dtype, "onnx" in options.formats,
                     str(model_path), None if calibration is None else str(calibration))


def check_exact(probe: dict, constant: dict) -> None:
    """An exact run whose own probe error is not tiny fails (exit 1) instead of reporting success (issue 13)."""
    limit = EXACT_PROBE_RTOL * probe["max_norm_reference"] + 2.0 * constant["bound"]
    if probe["max_abs"] > limit:
        raise CheckFailed(f"exact shrinking changed the outputs by up to {probe['max_abs']:.3g} on the probe inputs"
                          f" (max |y| {probe['max_norm_reference']:.3g}; allowed {limit:.3g}); nothing was written;"
                          " please report this model")


def shape_record(original: IsoMLP, shrunk: IsoMLP, model_path: Path, files: dict, saved_dtype: torch.dtype) -> dict:
    """report.json's sizes before and after: parameters, widths, bytes, layers."""
    return {"params_before": original.num_params(), "params_after": shrunk.num_params(),
            "flops_before": original.flops(), "flops_after": shrunk.flops(),
            "input_shape": list(original.input_shape),
            "widths_before": list(original.widths), "widths_after": list(shrunk.widths),
            "bytes_before": model_path.stat().st_size,
            "bytes_after": {name: Path(p).stat().st_size for name, p in files.items()},
            "dtype_saved": str(saved_dtype).replace("torch.", ""),
            "layers_before": layer_summary(original), "layers": layer_summary(shrunk)}


def recipe_record(options: ShrinkOptions, recipe: dict | None, **data_files) -> dict:
    """report["recipe"]: the options, the data files (calibration and labels always, the others when given) and the
    provenance of a recipe file."""
    files = {k: None if v is None else str(v) for k, v in data_files.items()
             if v is not None or k in ("calibration", "labels")}
    return {**options.to_dict(), **files, **(recipe or {})}


def load_model(model_path: Path, options: ShrinkOptions) -> tuple[IsoMLP, torch.dtype, list[str]]:
    """The model in float64, the dtype to save in (float32 with --precision: what the files store beside the dense
    weights), and the notes its loading printed (e.g. how a reference checkpoint's intrinsic length was read). A lossy
    run refuses o < 0 here, before anything else is read."""
    tensors, config_json = io.read_tensors(model_path)
    saved_dtype = parse_dtype(options.dtype, _first_float_dtype(tensors))
    saved_dtype = torch.float32 if options.precision is not None else saved_dtype  # --precision: the rest in float32
    notes: list[str] = []
    original = io.model_from_tensors(io.consume_as_float64(tensors), config_json, where=str(model_path),
                                     ref_intrinsic_length=options.ref_intrinsic_length,
                                     notify=lambda text: (notes.append(text), io.print_note(text)))
    if options.lossy:
        refuse_negative_o(original, str(model_path))
    if options.precision not in (None, "float32", "float64"):
        from isocompress.bounds import deployed

        if not deployed.supported(original):
            raise IsocompressError(f"{model_path}: --precision {options.precision} is available for tanh MLPs with o ≥ 0"
                                   " only yet (its rounding bound is derived for them); use --precision float32")
    return original, saved_dtype, notes


def shrink_streaming(model_path, out_dir, options: ShrinkOptions, calibration, progress: bool, recipe) -> dict | None:
    """shrink_file's exact path through isocompress.exact.stream (the same report and files: the safetensors file
    written layer by layer, the ONNX file from the shrunk model), or None where it does not apply: a lossy shrink
    (its search and certificate evaluate the original whole), or a file stream.open_source leaves to the in-memory
    path (a CNN, a log1p network, an unusual container)."""
    from isocompress.exact import stream

    if in_memory_reason(options, False, True) is not None:
        return None
    started, model_path = time.perf_counter(), Path(model_path)
    source = stream.open_source(model_path, options.ref_intrinsic_length)
    if source is None:
        return None
    for note in source.notes:
        io.print_note(note)
    saved_dtype = parse_dtype(options.dtype, source.dtype)
    calib = load_inputs(calibration, source.input_shape) if calibration is not None else None
    probes = calib if calib is not None else probe_inputs(source.input_shape)
    out = Path(out_dir) if out_dir is not None else default_out_dir(model_path)
    inputs = [model_path] + ([Path(calibration)] if calibration is not None else [])
    check = streamed_checks(source, calib, saved_dtype, options, model_path, calibration)
    with output_dir(out, inputs) as stage:
        with progress_bar(source.n_layers - 1 + (source.n_layers - 1) // 2, "shrink", enabled=progress) as step:
            target = stage / "model.safetensors" if "safetensors" in options.formats else None
            done = stream.shrink_exact_to_file(source, target, saved_dtype, probes, step,
                                               exact_rule_inputs(source.input_shape, calib), check, Path(stage))
        plan = deployed_plan(done["model"], resolve_precision(options.precision, saved_dtype), {})
        files, onnx_report = streamed_outputs(done["model"], stage, options, saved_dtype, probes, plan)
        report = streamed_report(source, done, model_path, options, recipe, calibration, calib, probes, files,
                                 saved_dtype, out)
        report["precision"] = precision_record(done["model"], plan, {})
        add_results(report, done["constant_directions"], None, None, onnx_report)
        report["seconds"] = round(time.perf_counter() - started, 4)
        write_report(report, stage)
    return report


def streamed_checks(source, calib, saved_dtype, options: ShrinkOptions, model_path: Path, calibration):
    """check_ranges for a streamed run, on what the rule's pass over the original measured: the rule's inputs are
    the probe inputs, then the calibration inputs (measure.exact_rule_inputs)."""
    from isocompress.core import ranges
    from isocompress.exact import stream

    defaults = probe_inputs(source.input_shape)

    def check(rule) -> None:
        n = defaults.shape[0]
        on_probes = (defaults, stream.measured_m2(rule.forward, slice(0, n)))
        on_calib = None if calib is None else (calib, stream.measured_m2(rule.forward, slice(n, None)))
        ranges.check_run_measured(rule.largest, on_probes, on_calib, saved_dtype, "onnx" in options.formats,
                                  str(model_path), None if calibration is None else str(calibration))
        del rule.forward  # the probe activations of the widest layer: no longer needed

    return check


def streamed_outputs(shrunk: IsoMLP, stage: Path, options: ShrinkOptions, saved_dtype: torch.dtype,
                     probes: torch.Tensor, plan=None):
    """The ONNX file of a streamed run, written and verified from the shrunk model (small once shrunk), as
    write_outputs writes it; ({format: path} in the order asked for, the ONNX record or None)."""
    files: dict[str, Path] = {}
    onnx_report = None
    if "onnx" in options.formats:
        files, onnx_report = write_outputs(shrunk, stage, replace(options, formats=("onnx",)), saved_dtype, probes,
                                           plan=plan)
    if "safetensors" in options.formats:
        files["safetensors"] = stage / "model.safetensors"
    return {name: files[name] for name in options.formats}, onnx_report


def streamed_report(source, done: dict, model_path: Path, options: ShrinkOptions, recipe, calibration, calib,
                    probes, files: dict, saved_dtype: torch.dtype, out: Path) -> dict:
    report = {
        "model": str(model_path), "exact": True,
        "recipe": recipe_record(options, recipe, calibration=calibration, labels=None),
        "params_before": sum(r["params"] for r in done["layers_before"]),
        "params_after": sum(r["params"] for r in done["layers"]),
        "flops_before": sum(r["flops"] for r in done["layers_before"]),
        "flops_after": sum(r["flops"] for r in done["layers"]),
        "input_shape": list(source.input_shape),
        "widths_before": done["widths_before"], "widths_after": done["widths_after"],
        "bytes_before": model_path.stat().st_size,
        "bytes_after": {name: Path(p).stat().st_size for name, p in files.items()},
        "dtype_saved": str(saved_dtype).replace("torch.", ""),
        "layers_before": done["layers_before"], "layers": done["layers"],
        "probe": {
            "inputs": probe_description(calib, probes),
            "float64": difference(done["y"], done["y_float64"]),
            "saved_file": difference(done["y"], done["y_saved"]),
        },
        "files": final_paths(files, out),
    }
    if source.notes:
        report["notes"] = list(source.notes)
    report["streamed"] = True
    return report


def resolve_relative_error(options: ShrinkOptions, original: IsoMLP, probes: torch.Tensor):
    """A relative max-error (fraction of the largest |y| on the probe inputs) as the absolute limit pruning uses.
    Returns (options pruning uses, {"relative", "output_scale", "absolute"} or None)."""
    if options.max_error_relative is None:
        return options, None
    scale = output_scale(original, probes)
    absolute = options.max_error_relative * scale
    record = {"relative": options.max_error_relative, "output_scale": scale, "absolute": absolute}
    return replace(options, max_error=absolute, max_error_relative=None), record


def refuse_negative_o(model: IsoMLP, where: str) -> None:
    """Lossy shrinking certifies bounds that assume o ≥ 0 (docs/math.md, "Negative o"): refuse o < 0 in one line."""
    negative = [i for i, layer in enumerate(model.layers[:-1]) if float(layer.o) < 0]
    if negative:
        raise IsocompressError(
            f"{where}: hidden layer {negative[0]} has o = {float(model.layers[negative[0]].o):.4g} < 0: the certified"
            " error bounds of lossy shrinking assume o ≥ 0 and do not cover it yet; shrink with --exact (lossless"
            " for any o)"
        )


CERTIFY_DATA = "certify data (--certify-data)"


def load_extra_data(n_in: int | tuple[int, ...], calibration, calib, labels, label_data, certify_data, test_data, test_labels) -> dict:
    """Issue 10: certify points, test data and labels, with label counts checked (a wrong count is an input error,
    never silently dropped)."""
    from isocompress.formats import data

    if label_data is not None:
        if calib is None:
            raise IsocompressError(f"{labels}: labels need their inputs; give --calibration FILE")
        data.check_label_count(label_data, calib, labels, calibration)
    if test_labels is not None and test_data is None:
        raise IsocompressError(f"{test_labels}: test labels need their inputs; give --test-data FILE")
    test_labels = test_labels if test_labels is not None or test_data is None or not data.has_labels(test_data) \
        else test_data  # a T.npz holding x and y: y labels x
    out = {"certify_data": None if certify_data is None else load_inputs(certify_data, n_in, CERTIFY_DATA),
           "test_data": None if test_data is None else load_inputs(test_data, n_in, "test data (--test-data)"),
           "test_labels": None if test_labels is None else load_labels(test_labels)}
    if out["test_labels"] is not None:
        data.check_label_count(out["test_labels"], out["test_data"], test_labels, test_data)
    return out


def compress(original: IsoMLP, options: ShrinkOptions, calibration, labels, progress: bool, probes=None,
             extra: dict | None = None):
    """The model-changing step: exact shrinking, or pruning to a budget (isocompress.prune.budget). Returns (model, report):
    for an exact run the report is {"constant_directions": record} (what was dropped, relative to `probes`)."""
    if not options.lossy:
        with progress_bar(exact_steps(original), "shrink", enabled=progress) as step:
            model, record = shrink_exact_accounted(original, progress=step, x=probes)
            return model, {"constant_directions": record}
    from isocompress.prune import budget as prune  # issue 4 (imported here: prune is heavy and only a budget needs it)

    return prune.prune_to_budget(original, options, calibration=calibration, labels=labels, progress=progress,
                                 **(extra or {}))


def write_outputs(model: IsoMLP, out: Path, options: ShrinkOptions, dtype: torch.dtype, probes: torch.Tensor,
                  plan=None):
    """Writes the chosen formats atomically; returns ({format: path}, onnx verification report or None). `plan`
    (core.precision.Plan): the precision to write in (None: `dtype`, as before precisions existed)."""
    files: dict[str, Path] = {}
    onnx_report = None
    # ONNX first: if its onnxruntime check fails, nothing else of this run has been written.
    if "onnx" in options.formats:
        from isocompress.export import onnx_export  # issue 3

        # float32 unless the weights are saved in float64 (onnxruntime's CPU kernels for float16/bfloat16 are partial;
        # it has no float64 Conv or AveragePool, so a CNN's file is float32).
        onnx_dtype = torch.float64 if dtype == torch.float64 and model.is_mlp else torch.float32
        onnx_plan = plan if plan is None or plan.precision != "float64" or model.is_mlp else None  # float32 CNN file
        onnx_report = onnx_export.export_and_verify(model, out / "model.onnx", probes=probes, rtol=options.onnx_tol,
                                                    dtype=onnx_dtype, plan=onnx_plan)
        files["onnx"] = out / "model.onnx"
    if "safetensors" in options.formats:
        files["safetensors"] = io.save_safetensors(model, out / "model.safetensors", dtype=dtype, plan=plan)
    files = {name: files[name] for name in options.formats}  # in the order the user asked for
    return files, onnx_report


def load_inputs(path: str | Path, shape: int | tuple[int, ...], what: str = "calibration data") -> torch.Tensor:
    """Calibration inputs from .npy, .npz, .safetensors or .pt: n × n_in for an MLP (`shape` = n_in or (n_in,)); for a
    CNN, n × input_shape, given as such or flattened (n × C·L, n × C·H·W, e.g. MNIST-1D's n × 40 for a (1, 40)
    model). float64."""
    from isocompress.formats import data  # a small module: reading arrays safely

    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    return data.load_array(path, expect_columns=math.prod(shape), what=what).reshape(-1, *shape)


def load_labels(path: str | Path) -> torch.Tensor:
    from isocompress.formats import data

    return data.load_array(path, labels=True)


def write_report(report: dict, stage: Path) -> None:
    """report.json into a stage, with the sha256 of every staged output (what `publish.verify` checks)."""
    from isocompress.formats import publish

    report["sha256"] = publish.stage_hashes(stage)
    write_json(report, stage / "report.json")


def write_json(data: dict, path: Path) -> None:
    import json

    with io.atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def _first_float_dtype(tensors: dict[str, torch.Tensor]) -> torch.dtype:
    for t in tensors.values():
        if t.is_floating_point():
            return t.dtype
    return torch.float32
