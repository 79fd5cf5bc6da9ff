"""Speed and memory of `shrink --exact`, as ratios against floors measured in the same run.

    python benchmarks/bench_shrink.py            # 512→2048×6→10 (the issue's network)
    python benchmarks/bench_shrink.py --quick    # 128→512×4→10

time ratio   = total shrink time (load → written files, in a fresh process) / time of one float64 SVD of every
               original weight matrix (torch.linalg.svd, reduced, same threads).
memory ratio = peak resident memory of the shrink process above its post-import baseline / model file size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CHILD = r"""
import json, sys, time
def rss_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
import torch
import isocompress.api as api, isocompress.io, isocompress.layers, safetensors.torch, tqdm  # imports before baseline
baseline = rss_kib("VmRSS:")
start = time.perf_counter()
report = api.shrink_file(sys.argv[1], sys.argv[2], api.ShrinkOptions(formats=("safetensors",)), progress=False)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "baseline_kib": baseline, "peak_kib": rss_kib("VmHWM:"),
                  "widths_after": report["widths_after"], "params_before": report["params_before"],
                  "params_after": report["params_after"], "max_rel": report["probe"]["float64"]["max_rel"]}))
"""


def svd_floor(path: Path) -> float:
    from isocompress import io

    tensors, _ = io.read_tensors(path)
    weights = [t for k, t in tensors.items() if k.endswith(".weight") and t.dim() == 2]
    start = time.perf_counter()
    for w in weights:
        torch.linalg.svd(w.to(torch.float64), full_matrices=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    from isocompress import io
    from isocompress.model import random_model

    widths = [128] + [512] * 4 + [10] if args.quick else [512] + [2048] * 6 + [10]
    with tempfile.TemporaryDirectory() as tmp:
        model_path = Path(tmp) / "model.pt"
        io.save(random_model(widths, o=(0.0, 1.0), seed=0), model_path, dtype=torch.float32)
        size_kib = model_path.stat().st_size / 1024
        runs = []
        for r in range(args.repeats):
            proc = subprocess.run([sys.executable, "-c", CHILD, str(model_path), str(Path(tmp) / f"out{r}")],
                                  capture_output=True, text=True, check=True)
            runs.append(json.loads(proc.stdout))
        floors = [svd_floor(model_path) for _ in range(args.repeats)]
    best = min(runs, key=lambda r: r["seconds"])
    floor = min(floors)
    peak = max(r["peak_kib"] - r["baseline_kib"] for r in runs)
    print(f"network            {'→'.join(map(str, widths))}  (float32 file, {size_kib / 1024:.1f} MiB)")
    print(f"widths after       {'→'.join(map(str, best['widths_after']))}")
    print(f"parameters         {best['params_before']:,} → {best['params_after']:,}")
    print(f"max rel |Δy|       {best['max_rel']:.2e}  (float64, probe inputs)")
    print(f"shrink --exact     {best['seconds']:.3f} s  (best of {args.repeats}, load → written files)")
    print(f"SVD floor          {floor:.3f} s  (one float64 SVD of every original weight, best of {args.repeats})")
    print(f"time ratio         {best['seconds'] / floor:.3f}  (target ≤ 2)")
    print(f"peak memory        {peak / 1024:.1f} MiB above baseline")
    print(f"memory ratio       {peak / size_kib:.3f}  (target ≤ 4)")
    print(f"threads            {torch.get_num_threads()}")
    print(f"command            python benchmarks/bench_shrink.py{' --quick' if args.quick else ''}")


if __name__ == "__main__":
    main()
