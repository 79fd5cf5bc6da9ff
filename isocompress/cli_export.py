"""The `isocompress export` command (registers itself on the CLI group)."""

from isocompress.cli import main  # noqa: F401
