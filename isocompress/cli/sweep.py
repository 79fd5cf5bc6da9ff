"""`isocompress sweep` (registers itself on the CLI group). The work is in `isocompress.api.sweep.sweep`."""

from __future__ import annotations

import json

import click

from isocompress.cli.base import REF_HELP, main, start_threads, threads_option

DATA = click.Path(dir_okay=False, path_type=str)


@main.command()
@click.argument("model", type=DATA)
@click.option("--recipe", "recipe_path", type=DATA, default=None,
              help="A recipe whose data, basis, certify radius and [sweep] table (budgets, limits) to use; the flags"
                   " below override them.")
@click.option("--calibration", type=DATA, default=None, help="Calibration inputs (.npy, .npz, .safetensors, .pt).")
@click.option("--labels", type=DATA, default=None, help="Labels for the calibration inputs.")
@click.option("--test-data", type=DATA, default=None,
              help="Held-out inputs: accuracy (an .npz holding x and y, or with --test-labels) or agreement on them.")
@click.option("--test-labels", type=DATA, default=None, help="Labels for --test-data [default: its y, if any].")
@click.option("--certify-data", type=DATA, default=None, help="Points to certify around instead of the calibration.")
@click.option("--budgets", default=None, metavar="LIST",
              help="Comma-separated budgets, as --budget takes them [default: 50%,20%,10%,5%,2%].")
@click.option("--certify-radius", default=None, metavar="EPS",
              help="ε of the certified top-1 share: absolute (0.05) or a share of the median input norm (2%)"
                   " [default: 1%].")
@click.option("--basis", type=click.Choice(["auto", "data-free", "data-aware"]), default=None,
              help="Pruning basis [default: data-aware with --calibration, else data-free].")
@click.option("--max-params", default=None, help="Limit: at most this many parameters.")
@click.option("--max-bytes", default=None, help="Limit: an ONNX file of at most this size (60000, \"60 kB\").")
@click.option("--min-accuracy", default=None, help="Limit: accuracy at least this (95%, 0.95); needs labels.")
@click.option("--min-certified-top1", default=None,
              help="Limit: at least this share of points certified unchanged at the certify radius (90%).")
@click.option("--plot", "plot_path", type=DATA, default=None,
              help="Draw accuracy, certified top-1 and ONNX size against parameters into this PNG.")
@click.option("--quiet", is_flag=True, help="No progress lines and no table.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@click.option("--ref-intrinsic-length", "ref_mode", type=click.Choice(["log", "raw"]), default=None, help=REF_HELP)
@threads_option
def sweep(model, recipe_path, calibration, labels, test_data, test_labels, certify_data, budgets, certify_radius,
          basis, max_params, max_bytes, min_accuracy, min_certified_top1, plot_path, quiet, as_json, ref_mode,
          n_threads):
    """Shrink MODEL to each of several budgets and tabulate parameters, FLOPs, accuracy, certified top-1 and ONNX
    bytes; mark the smallest model that meets the limits. Writes nothing but --plot."""
    from isocompress.api import sweep as api  # here, not at the top: --help and usage errors skip torch

    flags = {"calibration": calibration, "labels": labels, "test_data": test_data, "test_labels": test_labels,
             "certify_data": certify_data, "budgets": budgets, "certify_radius": certify_radius, "basis": basis,
             "max_params": max_params, "max_bytes": max_bytes, "min_accuracy": min_accuracy,
             "min_certified_top1": min_certified_top1, "ref_intrinsic_length": ref_mode}
    arguments = api.sweep_arguments(recipe_path, **flags)
    start_threads(n_threads)
    result = api.sweep(model, plot=plot_path, progress=not (quiet or as_json), **arguments)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    elif not quiet:
        click.echo(api.format_sweep(result) + (f"\nwrote {plot_path}" if plot_path is not None else ""))
