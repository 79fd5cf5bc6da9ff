"""How many threads torch uses, chosen for the work at hand (issue 12).

Small matrix work with more threads than idle cores collapses (OpenMP threads wait for each other on a busy machine:
on a 2-core runner with other jobs, 2 threads made a 256×256 SVD 4× and a 1024×1024 one 5× slower than 1 thread). So:

* every command runs with 1 torch thread by default (`configure`);
* a large factorisation (`for_matrix`: smallest side ≥ LARGE_MATRIX) uses up to `thread_limit()` threads, but never
  more than the cores that are idle right now (`idle_cores`: the affinity's cores minus the other runnable tasks in
  /proc/loadavg), so that more threads are never slower than one.

thread_limit(): the commands' --threads, else OMP_NUM_THREADS, else the cores this process may run on
(os.sched_getaffinity). LARGE_MATRIX is measured by `python benchmarks/bench_threads.py --threshold`.
This module imports torch only inside its functions and nothing of isocompress (the lowest floor).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

# Smallest side from which 2 threads beat 1 on a nearly idle 2-core machine (bench_threads --threshold, load 0.9):
# n = 128: SVD 1.15× slower with 2 threads (eigvalsh 0.84×); n = 256: SVD 0.93×, eigvalsh 0.73×; n = 512: 0.70×, 0.74×.
LARGE_MATRIX = 256
ENV = "ISOCOMPRESS_THREADS"  # how `configure` hands --threads to the code below it


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity), not the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def _positive_int(text: str | None) -> int | None:
    try:
        value = int(text) if text is not None else None
    except ValueError:
        return None
    return value if value is not None and value >= 1 else None


def thread_limit(requested: int | None = None) -> int:
    """The most threads large work may use: `requested` (--threads), else $ISOCOMPRESS_THREADS (set by configure),
    else $OMP_NUM_THREADS, else available_cores()."""
    for value in (requested, _positive_int(os.environ.get(ENV)), _positive_int(os.environ.get("OMP_NUM_THREADS"))):
        if value is not None and value >= 1:
            return int(value)
    return available_cores()


def idle_cores() -> int:
    """available_cores() minus the runnable tasks of other processes right now (/proc/loadavg's running count less
    this process's own running threads, so its spinning OpenMP workers do not count against it)."""
    cores = available_cores()
    try:
        with open("/proc/loadavg") as handle:
            running = int(handle.read().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return cores
    others = max(0, running - max(1, _own_running_threads()))
    return max(1, min(cores, cores - others))


def _own_running_threads() -> int:
    count = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return 1
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/stat") as handle:
                count += handle.read().rsplit(")", 1)[1].split()[0] == "R"
        except (OSError, IndexError):
            continue
    return count


def threads_for(smallest_side: int, limit: int | None = None) -> int:
    """1 below LARGE_MATRIX; above it the idle cores, at most `limit` (thread_limit())."""
    if smallest_side < LARGE_MATRIX:
        return 1
    top = thread_limit() if limit is None else limit
    return 1 if top <= 1 else max(1, min(top, idle_cores()))


@contextmanager
def using(n: int) -> Iterator[int]:
    """torch.set_num_threads(n) for the block; the previous count afterwards."""
    import torch

    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield n
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


@contextmanager
def for_matrix(*shape: int) -> Iterator[int]:
    """The thread count threads_for(min(shape)) for the block (a factorisation of a matrix of this shape)."""
    with using(threads_for(min(shape) if shape else 0)) as n:
        yield n


def configure(requested: int | None = None) -> int:
    """At the start of a command: remember the limit (--threads) for for_matrix and set 1 torch thread for
    everything else. Returns the limit."""
    import torch

    if requested is not None:
        os.environ[ENV] = str(requested)
    torch.set_num_threads(1)
    return thread_limit(requested)
