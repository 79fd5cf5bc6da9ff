"""The `isocompress check` command (registers itself on the CLI group). The work is in `isocompress.check.run`."""

from __future__ import annotations

import json
import os
import sys

import click

from isocompress.cli.base import REF_HELP, main, start_threads, threads_option
from isocompress.core.errors import IsocompressError
from isocompress.core.progress import line_printer

ERROR_MEASURES = ("certified", "empirical")  # = check_config.MEASURES (not imported: it imports torch)
SINGLE_MODEL_FLAGS = ("recipe", "calibration", "labels", "max_params", "max_bytes", "max_error", "error_measure",
                      "min_accuracy")


def use_color() -> bool:
    """Colour only on a terminal, and never with NO_COLOR set (https://no-color.org)."""
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")


@main.command()
@click.argument("model", required=False, default=None)
@click.option("--config", "config_path", default=None, metavar="FILE",
              help="Config file [default: ./isocompress.toml, else [tool.isocompress] in ./pyproject.toml].")
@click.option("--baseline", default=None, metavar="FILE",
              help="An earlier `check --json` output or a shrink report.json; each row shows the change against it.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of result objects (docs/ci.md) on stdout.")
@click.option("--quiet", is_flag=True, help="No progress lines on stderr (one plain line per model checked).")
@click.option("--recipe", default=None, metavar="FILE", help="With MODEL: shrink with this recipe, then check the result.")
@click.option("--calibration", default=None, metavar="FILE", help="With MODEL: calibration inputs.")
@click.option("--labels", default=None, metavar="FILE", help="With MODEL: labels of the calibration inputs.")
@click.option("--max-params", default=None, metavar="N", help="With MODEL: at most N parameters.")
@click.option("--max-bytes", default=None, metavar="SIZE",
              help="With MODEL: at most SIZE bytes (60000, '60 kB' = 60,000, '1.5 MiB' = 1.5 × 1024²).")
@click.option("--max-error", default=None, metavar="E",
              help="With MODEL and --recipe: |Δy| ≤ E (a number, or a percentage of the largest |y|: 1%).")
@click.option("--error-measure", default=None, type=click.Choice(ERROR_MEASURES),
              help="Which error --max-error limits [default: certified].")
@click.option("--min-accuracy", default=None, metavar="A",
              help="With MODEL, --calibration and --labels (or --test-data, with its y or --test-labels): accuracy ≥ A.")
@click.option("--test-data", default=None, metavar="FILE", help="With MODEL: held-out inputs for --min-accuracy (an .npz holding x and y: y are the labels).")
@click.option("--test-labels", default=None, metavar="FILE", help="With MODEL: labels of --test-data [default: its y, if it holds one].")
@click.option("--min-certified-top1", default=None, metavar="F",
              help="With MODEL and --recipe: top-1 certified unchanged for ≥ F of the recipe's points (95%).")
@click.option("--ref-intrinsic-length", "ref_intrinsic_length", type=click.Choice(["log", "raw"]), default=None, help=REF_HELP)
@threads_option
def check(model, config_path, baseline, as_json, quiet, n_threads, **flags):
    """Check size and error limits for CI: exit 0 if all pass, 1 if any fails, 2 for a config or input error.

    Without MODEL the limits come from the config; with MODEL from the flags."""
    from isocompress.check import run as checks  # here, not at the top: --help and usage errors skip torch

    given = {k: v for k, v in flags.items() if v is not None}
    if model is not None and config_path is not None:
        raise IsocompressError("give either MODEL with limit flags or --config FILE, not both")
    if model is None and given:
        flag = "--" + next(iter(given)).replace("_", "-")
        raise IsocompressError(f"{flag} needs MODEL (isocompress check MODEL {flag} …); limits for several models"
                               " belong in isocompress.toml")
    specs = [checks.spec_from_flags(model, **given)] if model is not None else None
    # One plain line per model on stderr (what, how far, elapsed), terminal or CI log alike; none with --quiet.
    progress = None if quiet else line_printer()
    start_threads(n_threads)
    results = checks.run_checks(config_path, checks=specs, baseline=baseline, progress=progress)
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in results], indent=2, ensure_ascii=False))
    else:
        click.echo(checks.format_results(results, color=use_color(), with_baseline=baseline is not None),
                   color=use_color())
    sys.exit(checks.exit_code(results))
