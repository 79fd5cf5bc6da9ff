"""The `isocompress convert` command (registers itself on the CLI group): a pickled checkpoint → safetensors."""

from __future__ import annotations

import json
from pathlib import Path

import click

from isocompress.cli.base import REF_HELP, main


@main.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--trust-pickle", is_flag=True,
              help="Required: unpickle FILE, which runs code named in it. Only for files you trust.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Output file (.safetensors or .pt) [default: <stem>.safetensors in the working directory].")
@click.option("--ref-intrinsic-length", "ref_mode", type=click.Choice(["log", "raw"]), default=None, help=REF_HELP)
@click.option("--input-shape", default=None, metavar="C,L|C,H,W",
              help="One input's shape, to run a convolutional module (an MLP's is read from its first layer).")
@click.option("--quiet", is_flag=True, help="Print nothing on success.")
@click.option("--json", "as_json", is_flag=True, help="Print what was done as JSON on stdout.")
def convert(file: Path, trust_pickle: bool, out: Path | None, ref_mode: str | None, input_shape: str | None,
            quiet: bool, as_json: bool):
    """Convert a pickled model (a notebook's pickle.dump({'model': net}, f), or torch.save(net)) to isocompress's
    safetensors format: the module is run and read by its behaviour. Run it where the module's code is importable."""
    from isocompress.formats.convert import convert_file

    report = convert_file(file, out, trust_pickle=trust_pickle, ref_intrinsic_length=ref_mode,
                          input_shape=parse_shape(input_shape))
    if as_json:
        click.echo(json.dumps(report, indent=2))
    elif not quiet:
        shape = "×".join(map(str, report["input_shape"]))
        click.echo(f"converted {file}: input {shape}, widths {'→'.join(map(str, report['widths']))},"
                   f" {report['params']:,} parameters (intrinsic lengths {report['intrinsic_length']});"
                   f" wrote {report['file']}")
        for note in report["notes"]:
            click.echo(f"  note: {note}")


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    """'1,8,8' → (1, 8, 8); a usage error otherwise."""
    if text is None:
        return None
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").replace("×", ",").split(","))
    except ValueError:
        shape = ()
    if not shape or any(s < 1 for s in shape):
        raise click.BadParameter(f"{text!r}: give positive integers separated by commas, e.g. 1,8,8",
                                 param_hint="--input-shape")
    return shape
