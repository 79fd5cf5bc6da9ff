"""`python -m isocompress`: the same command as `isocompress`."""

from isocompress.cli import main

main()
