"""The `isocompress export` and `isocompress inspect` commands (register themselves on the CLI group)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import click

from isocompress.cli.base import REF_HELP, main
from isocompress.core.errors import IsocompressError

EXPORT_FORMATS = ("onnx", "safetensors")


def parse_formats(text: str) -> tuple[str, ...]:
    formats = tuple(dict.fromkeys(f.strip() for f in text.split(",") if f.strip()))
    unknown = [f for f in formats if f not in EXPORT_FORMATS]
    if unknown:
        raise IsocompressError(f"--format {text!r}: unknown format {unknown[0]!r}; choose from"
                               f" {', '.join(EXPORT_FORMATS)} (comma-separated)")
    if not formats:
        raise IsocompressError(f"--format {text!r} names no format; choose from {', '.join(EXPORT_FORMATS)}"
                               " (comma-separated)")
    return formats


def export_file(model_path: str | Path, out_dir: str | Path | None, formats=("onnx",), onnx_tol: float = 1e-4,
                calibration: str | Path | None = None, ref_intrinsic_length: str | None = None,
                precision: str | None = None) -> dict:
    """`isocompress export`: the model unchanged, as DIR/model.onnx (verified in onnxruntime) and/or
    DIR/model.safetensors, plus DIR/report.json. Everything is read and validated before anything is written.
    `precision` (float32 | float16 | int8-weights): the deployed files' precision; report["precision"] holds the
    certified bound on |y_file − y_model| over |x| ≤ the largest calibration norm (docs/bounds.md §5b)."""
    from isocompress.api import shrink as api  # here, not at the top: --help and usage errors skip torch
    from isocompress.formats import io

    started = time.perf_counter()
    if not 0 < onnx_tol < math.inf:
        raise IsocompressError(f"--onnx-tol {onnx_tol!r} must be a positive finite number")
    model_path = Path(model_path)
    from isocompress.core.precision import parse_precision

    precision = None if precision is None else parse_precision(precision)
    saved_dtype = io.stored_dtype(model_path) if precision is None else torch_float32()
    notes: list[str] = []
    model = io.load(model_path, ref_intrinsic_length=ref_intrinsic_length,
                    notify=lambda text: (notes.append(text), io.print_note(text)))
    calib = api.load_inputs(calibration, model.input_shape) if calibration is not None else None
    probes = calib if calib is not None else api.probe_inputs(model.input_shape)
    from isocompress.core import ranges

    ranges.check_run(model, api.probe_inputs(model.input_shape), calib, saved_dtype, "onnx" in formats,
                     str(model_path), None if calibration is None else str(calibration))
    out = Path(out_dir) if out_dir is not None else Path.cwd() / f"{model_path.stem}.export"
    inputs = [model_path] + ([Path(calibration)] if calibration is not None else [])
    with api.output_dir(out, inputs) as stage:
        options = api.ShrinkOptions(formats=formats, onnx_tol=onnx_tol)
        plan, record = export_plan(model, precision, calib)
        files, onnx_report = api.write_outputs(model, stage, options, saved_dtype, probes, plan=plan)
        report = {
            "model": str(model_path),
            "widths": list(model.widths),
            "params": model.num_params(),
            "bytes_before": model_path.stat().st_size,
            "bytes_after": {name: Path(p).stat().st_size for name, p in files.items()},
            "dtype_saved": str(saved_dtype).replace("torch.", ""),
            "probe_inputs": "calibration data" if calib is not None else
                            f"{probes.shape[0]} Gaussian inputs at scales {list(api.PROBE_SCALES)}",
            "files": api.final_paths(files, out),
        }
        if notes:
            report["notes"] = notes
        if record is not None:
            report["precision"] = record
        if onnx_report is not None:
            report["onnx"] = onnx_report
        report["seconds"] = round(time.perf_counter() - started, 4)
        api.write_report(report, stage)
    return report


def torch_float32():
    import torch

    return torch.float32


def export_plan(model, precision: str | None, calib):
    """(plan, report["precision"]) of an export: None, None without --precision (the file's own dtype, as before)."""
    if precision is None:
        return None, None
    from isocompress.bounds import deployed
    from isocompress.core.measure import sample_norms

    if precision != "float32" and not deployed.supported(model):
        raise IsocompressError(f"--precision {precision} is available for tanh MLPs only yet; use --precision"
                               " float32 for this network")
    norm = None if calib is None else float(sample_norms(calib).max())
    plan = deployed.choose_plan(model, precision, norm)
    record = {**plan.describe(), "covers": deployed.COVERS[precision], "rounding_bound": None,
              "input_norm": norm}
    if norm is not None and deployed.supported(model):
        record["rounding_bound"] = deployed.deployed_bound(model, plan, norm)["bound"]
        eps = 0.01 * float(sample_norms(calib).median())
        local = deployed.local_deployed_bound(model, plan, calib, eps)
        record["local"] = {"radius": eps, "n_points": len(calib), "bound_median": float(local.median()),
                           "bound_max": float(local.max()), "bounds": [float(b) for b in local]}
        record["note"] = ("certified |y_file − y_model| for every |x| ≤ input_norm (the largest calibration norm);"
                          " local: for every x within radius (1% of the median norm) of each calibration point")
    else:
        record["note"] = "no certified rounding bound: give --calibration (its largest norm is the domain)"
    return plan, record


def format_export(report: dict) -> str:
    lines = [f"{report['model']}: widths {'→'.join(map(str, report['widths']))}, {report['params']:,} parameters"]
    for name, path in report["files"].items():
        lines.append(f"  {name:<12} {report['bytes_after'][name]:>12,} bytes  {path}")
    if "precision" in report:
        prec = report["precision"]
        bound = "not certified" if prec["rounding_bound"] is None else f"certified |Δy| ≤ {prec['rounding_bound']:.3g}"
        local = "" if "local" not in prec else (f"; within ε = {prec['local']['radius']:.3g} of the calibration points:"
                                                f" median {prec['local']['bound_median']:.3g},"
                                                f" max {prec['local']['bound_max']:.3g}")
        lines.append(f"precision {prec['precision']} (compute {prec['compute']}): {bound}{local}")
    if "onnx" in report:
        check = report["onnx"]
        lines.append(
            f"onnxruntime vs torch (float64) on {check['n_probes']} inputs, batch sizes {check['batch_sizes']}:"
            f" max |Δy| {check['max_abs_diff']:.3g}, relative {check['max_rel_diff']:.3g}"
            + (f" (≤ the certified rounding bound {check['certified_rounding']:.3g})"
               if check.get("precision", {}).get("precision") not in (None, "float32", "float64")
               else f" ≤ {check['tolerance']:g}")
            + f" (opset {check['opset']}, IR {check['ir_version']}, {check['dtype']})"
        )
    return "\n".join(lines)


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=str))
@click.option("--format", "formats", default="onnx", show_default=True,
              help="Comma-separated output formats: onnx,safetensors.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=str), default=None,
              help="Output directory [default: <model stem>.export/ in the working directory].")
@click.option("--onnx-tol", type=float, default=1e-4, show_default=True,
              help="Relative tolerance of the onnxruntime-vs-torch check.")
@click.option("--calibration", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Inputs to check the ONNX file on (.npy, .npz, .safetensors, .pt) [default: random probes].")
@click.option("--precision", type=click.Choice(["float32", "float16", "int8-weights", "int8"]), default=None,
              help="Deployed precision, with a certified rounding bound over the calibration domain [default: the"
                   " file's dtype].")
@click.option("--quiet", is_flag=True, help="Print nothing on success.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.option("--ref-intrinsic-length", "ref_mode", type=click.Choice(["log", "raw"]), default=None, help=REF_HELP)
def export(model, formats, out_dir, onnx_tol, calibration, precision, quiet, as_json, ref_mode):
    """Export MODEL unchanged (e.g. the "before" side of a comparison); write model.onnx and report.json."""
    report = export_file(model, out_dir, parse_formats(formats), onnx_tol, calibration, ref_mode, precision)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    elif not quiet:
        click.echo(format_export(report))


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=str))
@click.option("--threshold", type=float, default=None,
              help="Count singular values below this (absolute) [default: 1e-3].")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Draw every layer's singular-value spectrum into this PNG (needs isocompress[plot]).")
@click.option("--json", "as_json", is_flag=True, help="Print the inspection as JSON on stdout.")
@click.option("--ref-intrinsic-length", "ref_mode", type=click.Choice(["log", "raw"]), default=None, help=REF_HELP)
def inspect(model, threshold, plot_path, as_json, ref_mode):
    """Per layer: kind, shape, singular values, varying rank, o, |psi|; and what --exact would reach."""
    from isocompress.api import inspection
    from isocompress.formats import io

    threshold = inspection.DEFAULT_THRESHOLD if threshold is None else threshold
    if plot_path is not None:  # a bad --plot path or a missing matplotlib fails before the (slow) inspection
        inspection.check_plot_path(plot_path)
        inspection.require_matplotlib()
    report = inspection.inspect_model(io.load(model, ref_intrinsic_length=ref_mode), threshold)
    report = {"model": str(model), **report}
    if plot_path is not None:
        widths = "→".join(map(str, report["widths"]))
        inspection.plot_spectra(report, plot_path, title=f"{Path(model).name} ({widths}): singular values per layer")
        report["plot"] = str(plot_path)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(inspection.format_inspection(report))
        if plot_path is not None:
            click.echo(f"wrote {plot_path}")
