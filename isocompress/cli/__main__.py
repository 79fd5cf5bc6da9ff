"""`python -m isocompress.cli`: the same command as `isocompress`."""

from isocompress.cli import main

main()
