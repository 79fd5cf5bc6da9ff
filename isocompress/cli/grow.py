"""The `isocompress grow` command (registers itself on the CLI group): neurogenesis, issue 6."""

from __future__ import annotations

import json
from pathlib import Path

import click

from isocompress.cli.base import REF_HELP, main
from isocompress.core.errors import IsocompressError


def default_grown_path(model_path: Path) -> Path:
    return Path.cwd() / f"{model_path.stem}.grown.safetensors"


def check_grow_options(model, layer: int, add: int, scale: float) -> None:
    n_hidden = len(model.layers) - 1
    if not 0 <= layer < n_hidden:
        raise IsocompressError(
            f"--layer {layer} is not a hidden space of this model (widths {'→'.join(map(str, model.widths))});"
            f" use 0..{n_hidden - 1}"
        )
    if add < 1:
        raise IsocompressError(f"--add {add}: the number of neurons to add must be ≥ 1")
    if not 0 <= scale < float("inf"):
        raise IsocompressError(f"--scale {scale}: must be finite and ≥ 0")
    from isocompress.core.limits import check_memory

    producer, consumer = model.layers[layer], model.layers[layer + 1]
    new_params = add * (producer.n_in + 3 + consumer.n_out)
    check_memory(4 * 8 * (model.num_params() + new_params), f"--add {add}: the grown model ({new_params:,} new"
                 " parameters)", "add fewer neurons")


def check_out_path(model_path: Path, out: Path) -> None:
    if out.suffix.lower() not in (".safetensors", ".pt", ".pth"):
        raise IsocompressError(f"--out {out}: use a .safetensors, .pt or .pth file name")
    if out.exists() and out.resolve() == model_path.resolve():
        raise IsocompressError(f"--out {out} is the input model; choose another file (the input is never overwritten)")
    if out.is_dir():
        raise IsocompressError(f"--out {out} is a directory; give a file name")
    if not out.parent.is_dir():
        raise IsocompressError(f"--out {out}: the directory {out.parent} does not exist")


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--layer", type=int, required=True,
              help="Hidden space to grow, 0-based (hidden space i is the output of weight layer i).")
@click.option("--add", type=int, required=True, help="Number of scaffold neurons to add (≥ 1).")
@click.option("--scale", type=float, default=1e-3, show_default=True,
              help="Standard deviation of the new neurons' outgoing weights.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the outgoing weights.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Output file (.safetensors or .pt) [default: <model stem>.grown.safetensors in the working directory].")
@click.option("--quiet", is_flag=True, help="Print nothing on success.")
@click.option("--json", "as_json", is_flag=True, help="Print what was done as JSON on stdout.")
@click.option("--ref-intrinsic-length", "ref_mode", type=click.Choice(["log", "raw"]), default=None, help=REF_HELP)
def grow(model: Path, layer: int, add: int, scale: float, seed: int, out: Path | None, quiet: bool,
         as_json: bool, ref_mode: str | None) -> None:
    """Add scaffold neurons to a hidden space of MODEL: zero incoming weights and bias, small random outgoing
    weights. The function is unchanged exactly; training then moves the new neurons."""
    from isocompress.core.measure import output_difference, probe_inputs
    from isocompress.formats import io  # here, not at the top: --help and usage errors skip torch
    from isocompress.train.grow import grow as grow_model

    original = io.load(model, ref_intrinsic_length=ref_mode)
    check_grow_options(original, layer, add, scale)
    out = out if out is not None else default_grown_path(model)
    check_out_path(model, out)
    grown = grow_model(original, layer, add, scale=scale, seed=seed)
    io.save(grown, out, dtype=io.stored_dtype(model))
    diff = output_difference(original, grown, probe_inputs(original.input_shape, per_scale=64))
    report = {
        "model": str(model), "layer": layer, "added": add, "scale": scale, "seed": seed,
        "widths_before": list(original.widths), "widths_after": list(grown.widths),
        "params_before": original.num_params(), "params_after": grown.num_params(),
        "probe": {"float64": diff}, "file": str(out),
    }
    if as_json:
        click.echo(json.dumps(report, indent=2))
    elif not quiet:
        click.echo(
            f"grew hidden space {layer} by {add}: widths {'→'.join(map(str, original.widths))} →"
            f" {'→'.join(map(str, grown.widths))}, {grown.num_params():,} parameters;"
            f" max |Δy| {diff['max_abs']:.3g} (float64); wrote {out}"
        )
