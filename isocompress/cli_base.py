"""The `isocompress` click group and its error handling. Each command registers itself on `main` from its own
module (`cli_shrink`, `cli_export`, `cli_check`, `cli_grow`); `isocompress.cli` imports them all.

User errors (`IsocompressError`) become one line on stderr and exit code 2 (1 for a failed check); never a traceback.
"""

from __future__ import annotations

import sys

import click

from isocompress.errors import IsocompressError


class Group(click.Group):
    """Turns the project's errors, and click's usage errors, into one line and its exit code."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as exc:
            usage_error(exc)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            usage_error(exc)
        except IsocompressError as exc:
            click.echo(f"isocompress: error: {exc}", err=True)
            sys.exit(exc.exit_code)


def usage_error(exc: click.UsageError) -> None:
    """One line instead of click's usage block; exit code 2 as click's own."""
    sub = exc.ctx.command_path.split()[1:] if exc.ctx is not None else []
    command = " ".join(["isocompress", *sub])
    message = " ".join(exc.format_message().split()).rstrip(".")
    click.echo(f"isocompress: error: {command}: {message}; see '{command} --help'", err=True)
    sys.exit(2)


def threads_option(command):
    """--threads N on a command that computes (isocompress.threads: 1 thread for small work, up to N idle cores for
    large factorisations)."""
    return click.option("--threads", "n_threads", type=click.IntRange(min=1), default=None, metavar="N",
                        help="Most threads for large matrix work [default: $OMP_NUM_THREADS, else the available"
                             " cores]; small work always uses 1.")(command)


def start_threads(n_threads: int | None) -> None:
    from isocompress import threads

    threads.configure(n_threads)


@click.group(cls=Group)
@click.version_option(package_name="isocompress")
def main() -> None:
    """Compress isotropic neural networks exactly (and, with a budget, with certified error bounds)."""
