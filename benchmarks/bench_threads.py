"""More threads are never slower (issue 12): wall time of two real commands with --threads 2 against --threads 1,
while a busy-loop process keeps one core busy, and without it.

    python benchmarks/bench_threads.py               # the two commands below, busy and not busy
    python benchmarks/bench_threads.py --threshold   # 1 vs 2 threads for SVD / eigvalsh by size (LARGE_MATRIX)
    python benchmarks/bench_threads.py --startup     # isocompress --help and a usage error, against import torch

commands (in the repository root, output into a temporary directory):
    isocompress check                                               (this repository's isocompress.toml)
    isocompress shrink models/digits.pt --recipe recipes/max-error-1pct.toml --calibration models/digits.calib.npy
ratio = time with --threads 2 / time with --threads 1 (best of --repeats), target ≤ 1.15 with one core busy.
The machine's load (1-minute load average, from /proc/loadavg) is printed before and after each measurement: other
jobs on a shared machine change every number here.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUSY = "while True:\n    pass\n"


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:4])


@contextmanager
def busy_core(enabled: bool):
    proc = subprocess.Popen([sys.executable, "-c", BUSY]) if enabled else None
    try:
        time.sleep(0.5 if enabled else 0.0)
        yield
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()


def commands(tmp: Path) -> dict[str, list[str]]:
    exe = [sys.executable, "-m", "isocompress.cli"]
    return {
        "check (isocompress.toml)": [*exe, "check", "--quiet"],
        "shrink digits max-error-1pct": [*exe, "shrink", "models/digits.pt", "--recipe", "recipes/max-error-1pct.toml",
                                         "--calibration", "models/digits.calib.npy", "--quiet", "--out",
                                         str(tmp / "out")],
    }


def timed(cmd: list[str], n_threads: int, tmp: Path) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "ISOCOMPRESS_THREADS")}
    out = tmp / "out"
    if out.exists():
        subprocess.run(["rm", "-rf", str(out)], check=True)
    start = time.perf_counter()
    proc = subprocess.run([*cmd, "--threads", str(n_threads)], cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode not in (0, 1):  # check exits 1 when a limit fails; that is still a measurement
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return seconds


def run_commands(repeats: int, only: str | None) -> None:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for busy in (True, False):
            with busy_core(busy):
                for name, cmd in commands(tmp).items():
                    if only and only not in name:
                        continue
                    before = load()
                    t = {n: min(timed(cmd, n, tmp) for _ in range(repeats)) for n in (1, 2)}
                    state = "one core busy (busy loop)" if busy else "no busy loop"
                    print(f"{name:<30} {state:<26} 1 thread {t[1]:7.2f} s  2 threads {t[2]:7.2f} s  "
                          f"ratio {t[2] / t[1]:.3f}  (target ≤ 1.15)  load before {before}, after {load()}",
                          flush=True)


def threshold(sizes: list[int], repeats: int) -> None:
    import torch

    def best(fn) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    print(f"load {load()}; cores {len(os.sched_getaffinity(0))}")
    for n in sizes:
        a = torch.randn(n, n, dtype=torch.float64)
        row = []
        for name, fn in (("svd", lambda: torch.linalg.svd(a, full_matrices=False)),
                         ("eigvalsh", lambda: torch.linalg.eigvalsh(a @ a.T))):
            t = {}
            for k in (1, 2):
                torch.set_num_threads(k)
                t[k] = best(fn)
            row.append(f"{name} 1 thread {t[1] * 1e3:8.2f} ms, 2 threads {t[2] * 1e3:8.2f} ms ({t[2] / t[1]:.2f})")
        print(f"n = {n:5d}: " + "; ".join(row), flush=True)


def startup(repeats: int) -> None:
    """Wall time of `isocompress --help` and of a usage error (neither imports torch), against `import torch`."""
    exe = [sys.executable, "-m", "isocompress.cli"]
    for name, cmd in (("isocompress --help", [*exe, "--help"]), ("isocompress shrink (usage error)", [*exe, "shrink"]),
                      ("python -c 'import torch' (floor)", [sys.executable, "-c", "import torch"])):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            subprocess.run(cmd, cwd=ROOT, capture_output=True)
            times.append(time.perf_counter() - start)
        times.sort()
        target = "" if "floor" in name else " (target ≤ 0.5 s)"
        print(f"{name:<34} best {times[0]:.3f} s, median {times[len(times) // 2]:.3f} s over {repeats}{target};"
              f" load {load()}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threshold", action="store_true")
    parser.add_argument("--startup", action="store_true", help="time isocompress --help and a usage error")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--only", default=None, help="run only the commands whose name contains this")
    args = parser.parse_args()
    if args.startup:
        startup(max(args.repeats, 7))
    elif args.threshold:
        threshold([64, 128, 256, 384, 512, 768, 1024, 2048], max(args.repeats, 3))
    else:
        run_commands(args.repeats, args.only)
    print(f"command            python benchmarks/bench_threads.py {' '.join(sys.argv[1:])}".rstrip())


if __name__ == "__main__":
    main()
