"""Progress of long work, on stderr."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable, Iterator


@contextmanager
def progress_bar(total: int, label: str, enabled: bool) -> Iterator[Callable[[str], None]]:
    """A tqdm bar on stderr; yields a callback taking the name of the step just done."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=label, file=sys.stderr, disable=not enabled, leave=False, unit="step")
    try:
        def step(name: str) -> None:
            bar.set_postfix_str(name, refresh=False)
            bar.update(1)

        yield step
    finally:
        bar.close()
