"""Top-level verbs, one per user action. The CLI (`isocompress.cli`) is a thin layer over these."""

from __future__ import annotations

import math
import shutil
from dataclasses import asdict, dataclass, replace
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch

from isocompress import io
from isocompress.errors import IsocompressError
from isocompress.layers import (alternate_diagonalise, as_float64, choose_alternating_layers, forward_float64,
                                remove_all_constant_directions)
from isocompress.measure import PROBE_SCALES, difference, output_difference, probe_inputs  # noqa: F401  (re-exported)
from isocompress.model import IsoMLP
from isocompress.progress import progress_bar


# --- pure verbs on models ----------------------------------------------------------------------------------------
def shrink_exact(model: IsoMLP, progress: Callable[[str], None] | None = None) -> IsoMLP:
    """Remove every constant direction, then store every other layer diagonal. Same function for every input."""
    model = remove_all_constant_directions(as_float64(model), progress=progress)
    return alternate_diagonalise(model, progress=progress)


def exact_steps(model: IsoMLP) -> int:
    """How many progress steps `shrink_exact` reports (for a progress bar's total)."""
    return (len(model.layers) - 1) + len(choose_alternating_layers(model))


def layer_summary(model: IsoMLP) -> list[dict]:
    return [
        {
            "index": i,
            "kind": layer.kind,
            "shape": [layer.n_out, layer.n_in],
            "params": layer.num_params(),
            "psi": layer.psi is not None,
            "o": None if layer.o is None else float(layer.o),
        }
        for i, layer in enumerate(model.layers)
    ]


# --- files -------------------------------------------------------------------------------------------------------
def default_out_dir(model_path: Path) -> Path:
    return Path.cwd() / f"{model_path.stem}.shrunk"


@contextmanager
def output_dir(path: Path, inputs: list[Path]) -> Iterator[Path]:
    """Creates `path` if needed; on failure removes it again if this call created it. Refuses to write over inputs."""
    if path.exists() and not path.is_dir():
        raise IsocompressError(f"{path}: exists and is not a directory; choose another --out")
    created = not path.exists()
    resolved_inputs = {p.resolve() for p in inputs}
    if path.resolve() in resolved_inputs or any(p.parent == path.resolve() and p.name.startswith("model.") for p in resolved_inputs):
        raise IsocompressError(f"{path}: would overwrite the input model; choose another --out")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise IsocompressError(f"{path}: cannot create the output directory ({exc.strerror}); choose another --out") from None
    try:
        yield path
    except BaseException:
        if created:
            shutil.rmtree(path, ignore_errors=True)
        raise


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

    budget: float | None = None
    max_error: float | None = None
    basis: str = "auto"
    input_radius: float | None = None
    formats: tuple[str, ...] = ("safetensors", "onnx")
    onnx_tol: float = 1e-4
    dtype: str | None = None
    max_error_relative: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "formats", tuple(self.formats))
        self._validate_goal()
        if self.basis not in ("auto", "data-free", "data-aware"):
            raise IsocompressError(f"basis {self.basis!r} is not one of auto, data-free, data-aware")
        if self.input_radius is not None and not (0 < self.input_radius < math.inf):
            raise IsocompressError(f"input radius {self.input_radius!r} must be a positive finite number")
        unknown = [f for f in self.formats if f not in ("safetensors", "onnx")]
        if unknown or not self.formats:
            raise IsocompressError(f"format {unknown[0] if unknown else '(none)'!r}: choose from safetensors, onnx")
        if not (0 < self.onnx_tol < math.inf):
            raise IsocompressError(f"onnx tolerance {self.onnx_tol!r} must be a positive finite number")
        if self.dtype not in (None, "float32", "float64", "float16", "bfloat16"):
            raise IsocompressError(f"dtype {self.dtype!r}: choose from float32, float64, float16, bfloat16")

    def _validate_goal(self) -> None:
        goals = [self.budget, self.max_error, self.max_error_relative]
        if sum(g is not None for g in goals) > 1:
            raise IsocompressError("give either a budget or a max-error, not both")
        if self.budget is not None and not (0 < self.budget < math.inf):
            raise IsocompressError(f"budget {self.budget!r} must be positive and finite (a fraction like 0.1, or a count)")
        if self.budget is not None and self.budget > 1 and self.budget != int(self.budget):
            raise IsocompressError(f"budget {self.budget!r}: a count must be a whole number")
        if self.max_error is not None and not (0 <= self.max_error < math.inf):
            raise IsocompressError(f"max-error {self.max_error!r} must be a finite number ≥ 0")
        if self.max_error_relative is not None and not (0 <= self.max_error_relative < math.inf):
            raise IsocompressError(f"relative max-error {self.max_error_relative!r} must be a finite fraction ≥ 0")

    @property
    def lossy(self) -> bool:
        return self.budget is not None or self.max_error is not None or self.max_error_relative is not None

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
) -> dict:
    """`isocompress shrink`: load, shrink, write DIR/model.safetensors (+ DIR/model.onnx) and DIR/report.json; returns
    the report. `recipe`: provenance (name, version, path of a recipe file, overriding flags) for report["recipe"]."""
    options, started = options or ShrinkOptions(), time.perf_counter()
    if (streamed := shrink_streaming(model_path, out_dir, options, calibration, progress, recipe)) is not None:
        return streamed  # issue 12: exact, safetensors only: one layer in memory at a time
    model_path = Path(model_path)
    tensors, config_json = io.read_tensors(model_path)
    saved_dtype = parse_dtype(options.dtype, _first_float_dtype(tensors))
    original = io.model_from_tensors(io.consume_as_float64(tensors), config_json, where=str(model_path))
    calib = load_inputs(calibration, original.widths[0]) if calibration is not None else None
    label_data = load_labels(labels) if labels is not None else None
    out = Path(out_dir) if out_dir is not None else default_out_dir(model_path)
    probes = calib if calib is not None else probe_inputs(original.widths[0])
    inputs = [model_path] + [Path(p) for p in (calibration, labels) if p is not None]
    effective, resolved = resolve_relative_error(options, original, probes)
    with output_dir(out, inputs) as out:
        shrunk, prune_report = compress(original, effective, calib, label_data, progress)
        files, onnx_report = write_outputs(shrunk, out, options, saved_dtype, probes)
        reloaded = io.load(files["safetensors"]) if "safetensors" in files else shrunk.cast(saved_dtype)
        report = {
            "model": str(model_path),
            "exact": not options.lossy,
            "recipe": {**options.to_dict(), "calibration": None if calibration is None else str(calibration),
                       "labels": None if labels is None else str(labels), **(recipe or {})},
            "params_before": original.num_params(),
            "params_after": shrunk.num_params(),
            "widths_before": list(original.widths),
            "widths_after": list(shrunk.widths),
            "bytes_before": model_path.stat().st_size,
            "bytes_after": {name: Path(p).stat().st_size for name, p in files.items()},
            "dtype_saved": str(saved_dtype).replace("torch.", ""),
            "layers_before": layer_summary(original),
            "layers": layer_summary(shrunk),
            "probe": {
                "inputs": "calibration data" if calib is not None else
                          f"{probes.shape[0]} Gaussian inputs at scales {list(PROBE_SCALES)}",
                "float64": output_difference(original, shrunk, probes),
                "saved_file": output_difference(original, reloaded, probes),
            },
            "files": {name: str(p) for name, p in files.items()},
        }
        if prune_report is not None:
            report["pruning"] = prune_report
            if resolved is not None:
                report["pruning"]["max_error_resolved"] = {**resolved, "scale_inputs": report["probe"]["inputs"]}
        if onnx_report is not None:
            report["onnx"] = onnx_report
        report["seconds"] = round(time.perf_counter() - started, 4)
        write_json(report, out / "report.json")
    return report


def shrink_streaming(model_path, out_dir, options: ShrinkOptions, calibration, progress: bool, recipe) -> dict | None:
    """shrink_file's exact path through isocompress.stream (the same report), or None where it does not apply: a
    lossy shrink, ONNX output, or a file not in isocompress's own layout with its config."""
    from isocompress import stream

    if options.lossy or options.formats != ("safetensors",):
        return None
    started, model_path = time.perf_counter(), Path(model_path)
    source = stream.open_source(model_path)
    if source is None:
        return None
    saved_dtype = parse_dtype(options.dtype, source.dtype)
    calib = load_inputs(calibration, source.config.widths[0]) if calibration is not None else None
    probes = calib if calib is not None else probe_inputs(source.config.widths[0])
    out = Path(out_dir) if out_dir is not None else default_out_dir(model_path)
    inputs = [model_path] + ([Path(calibration)] if calibration is not None else [])
    with output_dir(out, inputs) as out:
        with progress_bar(source.n_layers - 1 + (source.n_layers - 1) // 2, "shrink", enabled=progress) as step:
            done = stream.shrink_exact_to_file(source, out / "model.safetensors", saved_dtype, probes, step)
        report = {
            "model": str(model_path), "exact": True,
            "recipe": {**options.to_dict(), "calibration": None if calibration is None else str(calibration),
                       "labels": None, **(recipe or {})},
            "params_before": sum(r["params"] for r in done["layers_before"]),
            "params_after": sum(r["params"] for r in done["layers"]),
            "widths_before": done["widths_before"], "widths_after": done["widths_after"],
            "bytes_before": model_path.stat().st_size,
            "bytes_after": {"safetensors": (out / "model.safetensors").stat().st_size},
            "dtype_saved": str(saved_dtype).replace("torch.", ""),
            "layers_before": done["layers_before"], "layers": done["layers"],
            "probe": {
                "inputs": "calibration data" if calib is not None else
                          f"{probes.shape[0]} Gaussian inputs at scales {list(PROBE_SCALES)}",
                "float64": difference(done["y"], done["y_float64"]),
                "saved_file": difference(done["y"], done["y_saved"]),
            },
            "files": {"safetensors": str(out / "model.safetensors")},
            "streamed": True,
        }
        report["seconds"] = round(time.perf_counter() - started, 4)
        write_json(report, out / "report.json")
    return report


def output_scale(model: IsoMLP, x: torch.Tensor) -> float:
    """The largest output norm |y| over the inputs x (the scale a relative max-error refers to)."""
    return float(torch.linalg.vector_norm(forward_float64(model, x), dim=-1).max())


def resolve_relative_error(options: ShrinkOptions, original: IsoMLP, probes: torch.Tensor):
    """A relative max-error (fraction of the largest |y| on the probe inputs) as the absolute limit pruning uses.
    Returns (options pruning uses, {"relative", "output_scale", "absolute"} or None)."""
    if options.max_error_relative is None:
        return options, None
    scale = output_scale(original, probes)
    absolute = options.max_error_relative * scale
    record = {"relative": options.max_error_relative, "output_scale": scale, "absolute": absolute}
    return replace(options, max_error=absolute, max_error_relative=None), record


def compress(original: IsoMLP, options: ShrinkOptions, calibration, labels, progress: bool):
    """The model-changing step: exact shrinking, or pruning to a budget (isocompress.prune). Returns (model, report)."""
    if not options.lossy:
        with progress_bar(exact_steps(original), "shrink", enabled=progress) as step:
            return shrink_exact(original, progress=step), None
    from isocompress import prune  # issue 4 (imported here: prune is heavy and only a budget needs it)

    return prune.prune_to_budget(original, options, calibration=calibration, labels=labels, progress=progress)


def write_outputs(model: IsoMLP, out: Path, options: ShrinkOptions, dtype: torch.dtype, probes: torch.Tensor):
    """Writes the chosen formats atomically; returns ({format: path}, onnx verification report or None)."""
    files: dict[str, Path] = {}
    onnx_report = None
    # ONNX first: if its onnxruntime check fails, nothing else of this run has been written.
    if "onnx" in options.formats:
        from isocompress import onnx_export  # issue 3

        # float32 unless the weights are saved in float64 (onnxruntime's CPU kernels for float16/bfloat16 are partial).
        onnx_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        onnx_report = onnx_export.export_and_verify(model, out / "model.onnx", probes=probes, rtol=options.onnx_tol,
                                                    dtype=onnx_dtype)
        files["onnx"] = out / "model.onnx"
    if "safetensors" in options.formats:
        files["safetensors"] = io.save_safetensors(model, out / "model.safetensors", dtype=dtype)
    files = {name: files[name] for name in options.formats}  # in the order the user asked for
    return files, onnx_report


def load_inputs(path: str | Path, n_in: int) -> torch.Tensor:
    """Calibration inputs from .npy, .npz, .safetensors or .pt (one 2-D tensor n × n_in). float64."""
    from isocompress import data  # a small module: reading arrays safely

    return data.load_array(path, expect_columns=n_in)


def load_labels(path: str | Path) -> torch.Tensor:
    from isocompress import data

    return data.load_array(path, labels=True)


def write_json(data: dict, path: Path) -> None:
    import json

    with io.atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def _first_float_dtype(tensors: dict[str, torch.Tensor]) -> torch.dtype:
    for t in tensors.values():
        if t.is_floating_point():
            return t.dtype
    return torch.float32
