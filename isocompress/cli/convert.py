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
@click.option("--quiet", is_flag=True, help="Print nothing on success.")
@click.option("--json", "as_json", is_flag=True, help="Print what was done as JSON on stdout.")
def convert(file: Path, trust_pickle: bool, out: Path | None, ref_mode: str | None, quiet: bool, as_json: bool):
    """Convert a pickled model (a notebook's pickle.dump({'model': net}, f), or torch.save(net)) to isocompress's
    safetensors format. Run it where the reference code is importable."""
    from isocompress.formats.convert import convert_file

    report = convert_file(file, out, trust_pickle=trust_pickle, ref_intrinsic_length=ref_mode)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    elif not quiet:
        click.echo(f"converted {file}: widths {'→'.join(map(str, report['widths']))}, {report['params']:,} parameters"
                   f" (intrinsic_length read as {report['ref_intrinsic_length'] or 'log'},"
                   f" {report['ref_intrinsic_length_source']}); wrote {report['file']}")
