"""The `isocompress` command line: a thin click layer over `isocompress.api`.

The group and its error handling are in `cli.base`; each command lives in its own module and registers itself on
`main` when imported here. User errors become one line on stderr and exit code 2 (1 for a failed check).
"""

from __future__ import annotations

from isocompress.cli import check, convert, export, grow, shrink, sweep  # noqa: F401  (imported for registration)
from isocompress.cli.base import main

__all__ = ["main"]
