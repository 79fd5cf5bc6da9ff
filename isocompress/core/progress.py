"""Progress of long work, on stderr: a tqdm bar on a terminal, one plain line per step otherwise (a CI log reads
lines; carriage-return bars become one unreadable line there)."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator, TextIO


def _noop(name: str, position: int | None = None) -> None:
    return None


def plain_line(label: str, done: int, total: int | None, unit: str, name: str, elapsed: float) -> str:
    """'label: 3/8 steps (38%), name, 1.2 s' — what, how far, elapsed."""
    if total:
        far = f"{done:,}/{total:,} {unit}s ({100.0 * done / total:.0f}%)"
    else:
        far = f"{done:,} {unit}s"
    return f"{label}: {far}{', ' + name if name else ''}, {elapsed:.1f} s"


@contextmanager
def progress_bar(total: int | None, label: str, enabled: bool, unit: str = "step",
                 stream: TextIO | None = None) -> Iterator[Callable[..., None]]:
    """Yields step(name, position=None): the step just done (its name), one more unit done, or `position` units done
    in all. On a terminal a tqdm bar; elsewhere one plain line per step (plain_line)."""
    stream = sys.stderr if stream is None else stream
    if not enabled:
        yield _noop
        return
    if not stream.isatty():
        yield _plain_steps(total, label, unit, stream)
        return
    from tqdm import tqdm

    bar = tqdm(total=total, desc=label, file=stream, leave=False, unit=unit)
    try:
        def step(name: str, position: int | None = None) -> None:
            bar.set_postfix_str(name, refresh=False)
            bar.update(capped(bar.n + 1 if position is None else position, total) - bar.n)

        yield step
    finally:
        bar.close()


def capped(done: int, total: int | None) -> int:
    """How far, never past the total: the last step of a budget may remove a few units more than the total promised
    (pruning lands at or just below its target; the step's name says where it landed)."""
    return done if not total else max(0, min(done, total))


def _plain_steps(total: int | None, label: str, unit: str, stream: TextIO) -> Callable[..., None]:
    started, done = time.perf_counter(), [0]

    def step(name: str, position: int | None = None) -> None:
        done[0] = capped(done[0] + 1 if position is None else position, total)
        print(plain_line(label, done[0], total, unit, name, time.perf_counter() - started), file=stream, flush=True)

    return step


def line_printer(stream: TextIO | None = None) -> Callable[[str], None]:
    """A callback printing each message as one line on stderr with the seconds since this call ('…, 12.3 s')."""
    started = time.perf_counter()
    target = sys.stderr if stream is None else stream

    def show(message: str) -> None:
        print(f"{message}, {time.perf_counter() - started:.1f} s", file=target, flush=True)

    return show
