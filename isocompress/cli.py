"""The `isocompress` command line: a thin click layer over `isocompress.api`.

The group and its error handling are in `cli_base`; each command lives in its own module and registers itself on
`main` when imported here. User errors become one line on stderr and exit code 2 (1 for a failed check).
"""

from __future__ import annotations

from isocompress import cli_check, cli_convert, cli_export, cli_grow, cli_shrink  # noqa: F401  (imported for registration)
from isocompress.cli_base import main

__all__ = ["main"]

if __name__ == "__main__":  # pragma: no cover
    main()
