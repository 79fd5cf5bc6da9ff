"""`isocompress shrink` (registers itself on the CLI group). The work is in `isocompress.api.shrink.shrink_file`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from isocompress.cli.base import REF_HELP, main, start_threads, threads_option
from isocompress.core.errors import IsocompressError


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=str))
@click.option("--recipe", "recipe_path", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="A recipe (.toml, e.g. recipes/edge-10pct.toml); the flags below override its values.")
@click.option("--exact", is_flag=True, default=False, help="Lossless shrinking (the default when no budget is given).")
@click.option("--budget", default=None, help="Parameter budget: a fraction (0.1), a percentage (10%) or a count (20000).")
@click.option("--max-error", default=None,
              help="Prune as far as possible with the certified |Δy| ≤ this (a number, or a percentage of the largest"
                   " |y| on the calibration data: 1%).")
@click.option("--basis", type=click.Choice(["auto", "data-free", "data-aware"]), default=None,
              help="Pruning basis [default: data-aware with --calibration, else data-free].")
@click.option("--calibration", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Calibration inputs (.npy, .npz, .safetensors, .pt).")
@click.option("--labels", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Labels for the calibration inputs (accuracy before/after).")
@click.option("--input-radius", type=float, default=None,
              help="Certify for all inputs with |x| ≤ R [default: the largest calibration-input norm].")
@click.option("--certify-radius", default=None, metavar="EPS",
              help="Local certificates within |x − x_i| ≤ EPS of each calibration (or --certify-data) point: an"
                   " absolute radius (0.05) or a share of their median norm (2%); several (0.5%,1%,2%,3%,7%) give a"
                   " curve against ε in report.json, the first is the primary ε [default: 1%].")
@click.option("--certify-data", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Points to certify around instead of the calibration inputs.")
@click.option("--certify-effort", type=click.Choice(["fast", "normal", "thorough"]), default=None,
              help="How hard the local certificates work on undecided points (branch and bound over the ball and"
                   " the counterexample search) [default: normal].")
@click.option("--min-certified-top1", default=None,
              help="Prune as far as the certified top-1 agreement at the certify radius stays ≥ this (95%, 0.95).")
@click.option("--test-data", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Held-out inputs: accuracy and max |Δy| on them too (an .npz holding x and y: y are the labels).")
@click.option("--test-labels", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Labels for --test-data [default: its y, if it holds one].")
@click.option("--format", "formats", default=None, help="Comma-separated output formats: safetensors,onnx.")
@click.option("--onnx-tol", type=float, default=None, help="Relative tolerance of the ONNX check [default 1e-4].")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=str), default=None,
              help="Output directory [default: <model stem>.shrunk/ in the working directory].")
@click.option("--dtype", type=click.Choice(["float32", "float64", "float16", "bfloat16"]), default=None,
              help="dtype of the written weights [default: the input's].")
@click.option("--precision", type=click.Choice(["float32", "float16", "int8-weights", "int8"]), default=None,
              help="Deployed precision of the files, inside the certificates (docs/bounds.md §5b) [default: float32,"
                   " or --dtype].")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Draw the local certificates' certified / refuted / undecided shares against ε (--certify-radius"
                   " 0.5%,1%,2%,...) into this PNG (needs isocompress[plot]).")
@click.option("--quiet", is_flag=True, help="No progress bar and no table.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.option("--ref-intrinsic-length", "ref_mode", type=click.Choice(["log", "raw"]), default=None,
              help=REF_HELP)
@threads_option
def shrink(model, recipe_path, exact, budget, max_error, basis, calibration, labels, input_radius, certify_radius,
           certify_data, certify_effort, min_certified_top1, test_data, test_labels, formats, onnx_tol, out_dir, dtype,
           precision, plot_path, quiet, as_json, ref_mode, n_threads):
    """Shrink MODEL (.pt, .pth or .safetensors); write model.safetensors, model.onnx and report.json."""
    from isocompress.api import plotting
    from isocompress.api import recipe as recipes
    from isocompress.api import shrink as api  # here, not at the top: --help and usage errors skip torch

    max_abs, max_percent = recipes.parse_max_error(max_error, "--max-error", None) if max_error is not None \
        else (None, None)
    flags = {
        "exact": exact,
        "budget": parse_budget(budget) if budget is not None else None,
        "max_error": max_abs,
        "max_error_percent": max_percent,
        "basis": basis,
        "calibration": calibration,
        "labels": labels,
        "input_radius": recipes.parse_positive(input_radius, recipes.COMMAND_LINE, "input-radius")
        if input_radius is not None else None,
        "formats": recipes.parse_formats(formats, "--format", None) if formats is not None else None,
        "onnx_tol": recipes.parse_positive(onnx_tol, recipes.COMMAND_LINE, "onnx-tol") if onnx_tol is not None else None,
        "dtype": dtype,
        "precision": precision,
        "ref_intrinsic_length": ref_mode,
        "certify_radius": recipes.parse_radii(certify_radius, recipes.COMMAND_LINE, "certify-radius")
        if certify_radius is not None else None,
        "certify_data": certify_data,
        "certify_effort": certify_effort,
        "min_certified_top1": recipes.parse_fraction(min_certified_top1, recipes.COMMAND_LINE, "min-certified-top1")
        if min_certified_top1 is not None else None,
        "test_data": test_data,
        "test_labels": test_labels,
    }
    goals = [flags["budget"] is not None, max_error is not None, min_certified_top1 is not None]
    if exact and any(goals):
        raise IsocompressError("--exact cannot be combined with --budget, --max-error or --min-certified-top1")
    if sum(goals) > 1:
        raise IsocompressError("give one goal: --budget, --max-error or --min-certified-top1")
    plot_path = plotting.prepare_plot(plot_path)  # before the work: a bad path or no matplotlib fails at once
    effective, provenance = effective_recipe(model, recipe_path, flags, plot_path, progress=not (quiet or as_json))
    start_threads(n_threads)
    report = api.shrink_file(model, out_dir, effective.to_options(), calibration=effective.calibration,
                             labels=effective.labels, progress=not (quiet or as_json), recipe=provenance,
                             certify_data=effective.certify_data, test_data=effective.test_data,
                             test_labels=effective.test_labels)
    if plot_path is not None:
        plotting.plot_certify_curve(report, plot_path, title=f"{Path(model).name}: local certificates against ε")
    if as_json:
        click.echo(json.dumps(report, indent=2))
    elif not quiet:
        click.echo(format_shrink_table(report) + (f"\nwrote {plot_path}" if plot_path is not None else ""))


def effective_recipe(model, recipe_path, flags: dict, plot_path, progress: bool):
    """The recipe (or the flags alone) with the flags over it, and its provenance; a recipe whose goal is a [sweep]
    table resolved to the budget the sweep chose (api.sweep.resolve_recipe)."""
    from isocompress.api import recipe as recipes

    base = recipes.load_recipe(recipe_path) if recipe_path is not None else recipes.Recipe(name=recipes.FLAGS_ONLY)
    effective, overridden = base.with_overrides(**flags)
    if plot_path is not None and (effective.exact or effective.calibration is None and effective.certify_data is None):
        raise IsocompressError("--plot draws the local certificates against ε; they need a lossy goal (--budget,"
                               " --max-error or --min-certified-top1) and --calibration or --certify-data")
    swept = None
    if effective.sweep is not None:  # the recipe's goal: the smallest of its budgets meeting its limits
        from isocompress.api import sweep as sweeping

        effective, swept = sweeping.resolve_recipe(model, effective, progress=progress)
    provenance = effective.provenance(overridden if recipe_path is not None else None)
    if swept is not None:
        provenance["sweep"] = swept
    return effective, provenance


def parse_budget(text: str) -> float:
    """'10%' → 0.1, '0.1' → 0.1, '20000' → 20000.0 (a count); the same rules as a recipe's `budget`."""
    from isocompress.api import recipe as recipes

    return recipes.parse_budget(text, recipes.COMMAND_LINE, "budget")


def format_shrink_table(report: dict) -> str:
    before, after = report["params_before"], report["params_after"]
    probe = report["probe"]
    shape = report.get("input_shape", [])
    rows = [("input", "×".join(map(str, shape)), "×".join(map(str, shape)))] if len(shape) > 1 else []
    rows += [
        ("widths", "→".join(map(str, report["widths_before"])), "→".join(map(str, report["widths_after"]))),
        ("kinds", ",".join(layer["kind"] for layer in report["layers_before"]),
         ",".join(layer["kind"] for layer in report["layers"])),
        ("parameters", f"{before:,}", f"{after:,} ({100.0 * after / before:.2f}%)"),
        ("FLOPs", f"{report['flops_before']:,}",
         f"{report['flops_after']:,} ({100.0 * report['flops_after'] / max(report['flops_before'], 1):.2f}%)"),
        ("file bytes", f"{report['bytes_before']:,}",
         ", ".join(f"{size:,} ({name})" for name, size in report["bytes_after"].items())),
    ]
    width = max(len(r[1]) for r in rows)
    lines = [f"{'':<12} {'before':<{width}}  after"]
    lines += [f"{name:<12} {b:<{width}}  {a}" for name, b, a in rows]
    lines.append(
        f"max |Δy| on {probe['float64']['n_inputs']} probe inputs: {probe['float64']['max_abs']:.3g} (float64),"
        f" {probe['saved_file']['max_abs']:.3g} (saved {report['dtype_saved']} file);"
        f" relative {probe['saved_file']['max_rel']:.3g}"
    )
    prec = report.get("precision") or {}
    if prec.get("precision") is not None and ("pruning" in report or prec["precision"] not in ("float32", "float64")):
        covers = f"; certificates cover {prec['covers']}" if prec.get("rounding_bound") is not None else ""
        lines.append(f"precision {prec['precision']}: dense weights {prec['dense_weights']}, diagonals/biases/psi/o"
                     f" {prec['diagonals_biases_psi_o']}, compute {prec['compute']}{covers}")
    if "pruning" in report:
        lines += format_pruning_lines(report["pruning"])
    written = ", ".join(report["files"].values())
    lines.append(f"wrote {written} and report.json")
    return "\n".join(lines)


def format_pruning_lines(pruning: dict) -> list[str]:
    """The error bounds of a lossy shrink (issue 4): certified ≥ adversarial ≥ empirical; local certificates and the
    held-out test set (issue 10)."""
    emp, adv, cert = pruning["empirical"], pruning["adversarial"], pruning["certified"]
    tight = pruning.get("tightness")
    if cert["max_abs"] is None:
        lines = [f"pruning basis {pruning['basis']}; {cert['note']}"]
    else:
        lines = [
            f"pruning basis {pruning['basis']}; domain |x| ≤ {pruning['radius']:.4g} ({pruning['radius_source']})",
            f"  certified   max |Δy| ≤ {cert['max_abs']:.3g} for every input in the domain (proven, docs/bounds.md)"
            + (f"; covers the deployed files (float64 network alone: {cert['float64_network']:.3g})"
               if "float64_network" in cert else ""),
            f"  adversarial max |Δy| = {adv['max_abs']:.3g} found by search"
            + (f"; bound tightness {tight:.3g}×" if tight is not None else ""),
        ]
    lines.append(f"  empirical   max |Δy| = {emp['max_abs']:.3g}, mean {emp['mean_abs']:.3g},"
                 f" mean relative {emp['mean_rel_percent']:.3g}% on {emp['inputs']}")
    if "top1_agreement" in emp:
        extra = f"  top-1 agreement {100 * emp['top1_agreement']:.2f}%, KL {emp['kl_mean']:.3g}"
        if "accuracy_before" in emp:
            extra += f", accuracy {100 * emp['accuracy_before']:.2f}% → {100 * emp['accuracy_after']:.2f}%"
        lines.append(extra)
    lines += local_lines(pruning.get("local"), pruning.get("test"))
    return lines


def curve_lines(curve: list[dict] | None) -> list[str]:
    """The verdicts against ε (--certify-radius with several values), one compact line per ε."""
    if not curve or curve[0].get("n_certified") is None:
        return []
    lines = [f"  against ε ({curve[0]['n_points']} points): certified / refuted (verified) / undecided"]
    for e in curve:
        given = f" ({e['radius_given']})" if isinstance(e.get("radius_given"), str) else ""
        lines.append(f"    ε = {e['radius']:<9.4g}{given:<8} {100 * e['certified_fraction']:5.1f}% /"
                     f" {100 * e['refuted_fraction']:5.1f}% / {100 * e['undecided_fraction']:5.1f}%")
    return lines


def local_lines(local: dict | None, test: dict | None) -> list[str]:
    lines = []
    if local is not None and local.get("computed", True):
        s = local["summary"]
        if local.get("n_certified") is not None:
            verdict = "" if local.get("n_refuted") is None else \
                f"; disagreement found (verified) for {local['n_refuted']}; undecided {local['n_undecided']}"
            lines.append(f"  top-1 certified unchanged within ε = {local['radius']:.3g} for {local['n_certified']} of"
                         f" {local['n_points']} points{verdict} ({local['points']}; ε: {local['radius_source']})")
        lines.append(f"  local certified max |Δy| within ε: median {s['bound_median']:.3g}, max {s['bound_max']:.3g}")
        lines += curve_lines(local.get("curve"))
    elif local is not None:
        lines.append(f"  {local['note']}")
    if test is not None:
        text = f"  test data: max |Δy| = {test['max_abs']:.3g} on {test['n_inputs']} held-out inputs"
        if "accuracy_before" in test:
            text += f", accuracy {100 * test['accuracy_before']:.2f}% → {100 * test['accuracy_after']:.2f}%"
        elif "top1_agreement" in test:
            text += f", top-1 agreement {100 * test['top1_agreement']:.2f}%"
        lines.append(text)
    return lines
