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
from isocompress.core.parsing import is_number, parse_budget, parse_formats, parse_max_error
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
    certify_radius: float | None = None  # issue 10: ε of the local certificates (default: prune.resolve_certify_radius)
    min_certified_top1: float | None = None  # issue 10: a goal: the smallest model certified for this share of points
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
        if self.certify_radius is not None and not (is_number(self.certify_radius) and 0 < self.certify_radius < math.inf):
            raise IsocompressError(f"certify radius {self.certify_radius!r} must be a positive finite number")
        if self.certify_effort not in EFFORTS:
            raise IsocompressError(f"certify effort {self.certify_effort!r}: choose from {', '.join(EFFORTS)}")
        if self.dtype not in (None, "float32", "float64", "float16", "bfloat16"):
            raise IsocompressError(f"dtype {self.dtype!r}: choose from float32, float64, float16, bfloat16")

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
) -> dict:
    """`isocompress shrink`: load, shrink, write DIR/model.safetensors (+ DIR/model.onnx) and DIR/report.json; returns
    the report. `recipe`: provenance (name, version, path of a recipe file, overriding flags) for report["recipe"]."""
    options, started = options or ShrinkOptions(), time.perf_counter()
    labelled = any(p is not None for p in (labels, certify_data, test_data, test_labels))  # checked in memory
    if not labelled and (streamed := shrink_streaming(model_path, out_dir, options, calibration, progress, recipe)):
        return streamed  # issue 12: exact, safetensors only: one layer in memory at a time
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
    effective, resolved = resolve_relative_error(options, original, probes)
    with output_dir(out, inputs) as stage:
        shrunk, prune_report = compress(original, effective, calib, label_data, progress,
                                        probes=exact_rule_inputs(original.input_shape, calib), extra=extra)
        constant = prune_report.pop("constant_directions") if not options.lossy else None
        files, onnx_report = write_outputs(shrunk, stage, options, saved_dtype, probes)
        reloaded = io.load(files["safetensors"]) if "safetensors" in files else shrunk.cast(saved_dtype)
        report = {
            "model": str(model_path),
            "exact": not options.lossy,
            "recipe": recipe_record(options, recipe, calibration=calibration, labels=labels, certify_data=certify_data,
                                    test_data=test_data, test_labels=test_labels),
            **shape_record(original, shrunk, model_path, files, saved_dtype),
            "probe": {
                "inputs": probe_description(calib, probes),
                "float64": output_difference(original, shrunk, probes),
                "saved_file": output_difference(original, reloaded, probes),
            },
            "files": final_paths(files, out),
        }
        if notes:
            report["notes"] = notes
        add_results(report, constant, prune_report, resolved, onnx_report)
        report["seconds"] = round(time.perf_counter() - started, 4)
        write_report(report, stage)
    return report


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
    """The model in float64, the dtype to save in, and the notes its loading printed (e.g. how a reference
    checkpoint's intrinsic length was read). A lossy run refuses o < 0 here, before anything else is read."""
    tensors, config_json = io.read_tensors(model_path)
    saved_dtype = parse_dtype(options.dtype, _first_float_dtype(tensors))
    notes: list[str] = []
    original = io.model_from_tensors(io.consume_as_float64(tensors), config_json, where=str(model_path),
                                     ref_intrinsic_length=options.ref_intrinsic_length,
                                     notify=lambda text: (notes.append(text), io.print_note(text)))
    if options.lossy:
        refuse_negative_o(original, str(model_path))
    return original, saved_dtype, notes


def shrink_streaming(model_path, out_dir, options: ShrinkOptions, calibration, progress: bool, recipe) -> dict | None:
    """shrink_file's exact path through isocompress.exact.stream (the same report), or None where it does not apply: a
    lossy shrink, ONNX output, or a file not in isocompress's own layout with its config."""
    from isocompress.exact import stream

    if options.lossy or options.formats != ("safetensors",):
        return None
    started, model_path = time.perf_counter(), Path(model_path)
    source = stream.open_source(model_path)
    if source is None:
        return None
    saved_dtype = parse_dtype(options.dtype, source.dtype)
    calib = load_inputs(calibration, source.input_shape) if calibration is not None else None
    probes = calib if calib is not None else probe_inputs(source.input_shape)
    out = Path(out_dir) if out_dir is not None else default_out_dir(model_path)
    inputs = [model_path] + ([Path(calibration)] if calibration is not None else [])
    with output_dir(out, inputs) as stage:
        with progress_bar(source.n_layers - 1 + (source.n_layers - 1) // 2, "shrink", enabled=progress) as step:
            done = stream.shrink_exact_to_file(source, stage / "model.safetensors", saved_dtype, probes, step,
                                               exact_rule_inputs(source.input_shape, calib))
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
            "bytes_after": {"safetensors": (stage / "model.safetensors").stat().st_size},
            "dtype_saved": str(saved_dtype).replace("torch.", ""),
            "layers_before": done["layers_before"], "layers": done["layers"],
            "probe": {
                "inputs": probe_description(calib, probes),
                "float64": difference(done["y"], done["y_float64"]),
                "saved_file": difference(done["y"], done["y_saved"]),
            },
            "files": final_paths({"safetensors": stage / "model.safetensors"}, out),
            "streamed": True,
        }
        add_results(report, done["constant_directions"], None, None, None)
        report["seconds"] = round(time.perf_counter() - started, 4)
        write_report(report, stage)
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
    out = {"certify_data": None if certify_data is None else load_inputs(certify_data, n_in),
           "test_data": None if test_data is None else load_inputs(test_data, n_in),
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


def write_outputs(model: IsoMLP, out: Path, options: ShrinkOptions, dtype: torch.dtype, probes: torch.Tensor):
    """Writes the chosen formats atomically; returns ({format: path}, onnx verification report or None)."""
    files: dict[str, Path] = {}
    onnx_report = None
    # ONNX first: if its onnxruntime check fails, nothing else of this run has been written.
    if "onnx" in options.formats:
        from isocompress.export import onnx_export  # issue 3

        # float32 unless the weights are saved in float64 (onnxruntime's CPU kernels for float16/bfloat16 are partial;
        # it has no float64 Conv or AveragePool, so a CNN's file is float32).
        onnx_dtype = torch.float64 if dtype == torch.float64 and model.is_mlp else torch.float32
        onnx_report = onnx_export.export_and_verify(model, out / "model.onnx", probes=probes, rtol=options.onnx_tol,
                                                    dtype=onnx_dtype)
        files["onnx"] = out / "model.onnx"
    if "safetensors" in options.formats:
        files["safetensors"] = io.save_safetensors(model, out / "model.safetensors", dtype=dtype)
    files = {name: files[name] for name in options.formats}  # in the order the user asked for
    return files, onnx_report


def load_inputs(path: str | Path, shape: int | tuple[int, ...]) -> torch.Tensor:
    """Calibration inputs from .npy, .npz, .safetensors or .pt: n × n_in for an MLP (`shape` = n_in or (n_in,)); for a
    CNN, n × input_shape, given as such or flattened (n × C·L, n × C·H·W, e.g. MNIST-1D's n × 40 for a (1, 40)
    model). float64."""
    from isocompress.formats import data  # a small module: reading arrays safely

    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    return data.load_array(path, expect_columns=math.prod(shape)).reshape(-1, *shape)


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
