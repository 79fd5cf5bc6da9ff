"""Adaptive training under DDP against one process with the same global batch (digits, scripts/train_adaptive.py).

    python benchmarks/bench_ddp.py                          # 5 seeds, 50 epochs, 1 and 2 processes (a few minutes)
    python benchmarks/bench_ddp.py --seeds 3 --epochs 8 --json

For each seed, the digits run of scripts/train_adaptive.py (its settings, `--epochs` epochs, restructuring every 50
steps) in one process, and the same run with DDP on `--nproc` gloo processes on this CPU: every global batch of 64
split over the ranks, each restructuring decided on rank 0 and broadcast, DDP re-wrapped after it. It prints each
seed's test accuracy after the final pruning, final widths, whether both runs made the same restructurings and the
largest difference between their final parameters (float32 training: the ranks' partial sums round differently), then
the mean and standard deviation over seeds of each and the difference of the means with its standard error.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from train_adaptive import ADAPTIVE, Ranks, accuracy, deterministic, on_cpu, train_and_finish  # noqa: E402

from isocompress.train.distributed import run_local  # noqa: E402


def measure(seed: int, settings, ranks: Ranks | None = None) -> dict:
    run = train_and_finish("digits", settings, quiet=True, seed=seed, ranks=ranks)
    _, _, x_test, y_test = run.data
    model = on_cpu(run.net).to_isomlp().cast(torch.float32)
    return {"seed": seed, "accuracy": accuracy(model, x_test, y_test),
            "widths": list(model.widths), "changes": [[c.kind, c.hidden, c.count, c.step or -1] for c in run.history],
            "seconds": run.seconds, "test_size": len(y_test), "params": [p.detach().cpu() for p in run.net.parameters()]}


def parameter_difference(x: dict, y: dict) -> float | None:
    """max |θ₁ − θ_N| over the final parameters (None when the shapes differ)."""
    pairs = list(zip(x.pop("params"), y.pop("params")))
    if any(a.shape != b.shape for a, b in pairs):
        return None
    return max(float((a.double() - b.double()).abs().max()) for a, b in pairs)


def ddp_worker(rank: int, size: int, seeds: list[int], settings) -> list[dict]:
    deterministic("cpu")
    return [measure(seed, settings, Ranks(rank, size, torch.device("cpu"))) for seed in seeds]


def summary(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def compare(single: list[dict], ddp: list[dict], nproc: int) -> dict:
    for x, y in zip(single, ddp):
        y["max_parameter_difference"] = parameter_difference(x, y)
    a, b = [r["accuracy"] for r in single], [r["accuracy"] for r in ddp]
    (mean_1, sd_1), (mean_n, sd_n) = summary(a), summary(b)
    return {"nproc": nproc, "seeds": [r["seed"] for r in single], "single": single, "ddp": ddp,
            "mean_single": mean_1, "sd_single": sd_1, "mean_ddp": mean_n, "sd_ddp": sd_n,
            "difference": mean_n - mean_1, "standard_error": math.sqrt((sd_1 ** 2 + sd_n ** 2) / len(a)),
            "same_changes": sum(x["changes"] == y["changes"] for x, y in zip(single, ddp)),
            "test_size": single[0]["test_size"]}


def print_table(result: dict, command: str) -> None:
    print(f"$ {command}")
    print(f"| seed | 1 process: accuracy, widths | {result['nproc']} processes: accuracy, widths | same restructurings "
          "| max \\|θ₁ − θ_N\\| |")
    print("|---|---|---|---|---|")
    for x, y in zip(result["single"], result["ddp"]):
        gap = y["max_parameter_difference"]
        print(f"| {x['seed']} | {100 * x['accuracy']:.2f}%, {'→'.join(map(str, x['widths']))} | "
              f"{100 * y['accuracy']:.2f}%, {'→'.join(map(str, y['widths']))} | {x['changes'] == y['changes']} | "
              f"{'shapes differ' if gap is None else f'{gap:.2g}'} |")
    print(f"1 process: {100 * result['mean_single']:.2f}% ± {100 * result['sd_single']:.2f} (mean ± sd over "
          f"{len(result['seeds'])} seeds); {result['nproc']} processes: {100 * result['mean_ddp']:.2f}% ± "
          f"{100 * result['sd_ddp']:.2f}; difference {100 * result['difference']:+.2f} pt (standard error "
          f"{100 * result['standard_error']:.2f} pt); same restructurings in {result['same_changes']} of "
          f"{len(result['seeds'])} seeds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 [default: 5]")
    parser.add_argument("--epochs", type=int, default=50, help="epochs per run [default: 50]")
    parser.add_argument("--nproc", type=int, default=2, help="processes of the DDP runs [default: 2]")
    parser.add_argument("--json", action="store_true", help="print the measurements as JSON")
    args = parser.parse_args()
    deterministic("cpu")
    settings = replace(ADAPTIVE["digits"], epochs=args.epochs)
    seeds = list(range(args.seeds))
    start = time.perf_counter()
    single = [measure(seed, settings) for seed in seeds]
    ddp = run_local(ddp_worker, args.nproc, seeds, settings)[0]
    result = compare(single, ddp, args.nproc) | {"seconds": time.perf_counter() - start}
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result, "python benchmarks/bench_ddp.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
