"""Speed and memory of `shrink`, as ratios against floors measured in the same run.

    python benchmarks/bench_shrink.py                  # exact: 512→2048×6→10 (the issue's network), .pt and .safetensors
    python benchmarks/bench_shrink.py --quick          # exact: 128→512×4→10
    python benchmarks/bench_shrink.py --budget         # --budget 2% vs --exact on 512→2048×6→10, and W/4→W×6→10
                                                       #   for W = 256 … 4096 (how the time grows with width)
    python benchmarks/bench_shrink.py --large          # a generated safetensors model larger than half the machine's
                                                       #   memory (8192 wide), shrunk exactly (streamed); then deleted

time ratio   = total shrink time (load → written files, in a fresh process) / time of one float64 SVD of every
               original weight matrix (torch.linalg.svd, reduced, the same thread policy).
memory ratio = peak resident memory of the shrink process (VmHWM) above its post-import baseline / model file size;
               the peak of anonymous memory (RssAnon, sampled every 2 ms) is printed beside it (file pages of a
               memory-mapped .pt count in VmHWM but are dropped by the kernel rather than swapped).
budget ratio = time of shrink --budget 2% / time of shrink --exact, same model, same process settings.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CHILD = r"""
import json, sys, threading, time
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
import torch
import isocompress.api.shrink as api, isocompress.formats.io, isocompress.core.layers, isocompress.exact.stream, safetensors.torch, tqdm
import isocompress.core.threads
isocompress.core.threads.configure()  # as the CLI does: 1 thread for small work, idle cores for large factorisations
baseline, anon = status("VmRSS:"), [status("RssAnon:")]
anon_base = anon[0]
stop = threading.Event()
def sample():
    while not stop.is_set():
        anon[0] = max(anon[0], status("RssAnon:"))
        time.sleep(0.002)
threading.Thread(target=sample, daemon=True).start()
options = json.loads(sys.argv[3])
start = time.perf_counter()
report = api.shrink_file(sys.argv[1], sys.argv[2], api.ShrinkOptions(**options), progress=False)
seconds = time.perf_counter() - start
stop.set()
pruning = report.get("pruning", {})
print(json.dumps({"seconds": seconds, "baseline_kib": baseline, "peak_kib": status("VmHWM:"),
                  "anon_peak_kib": anon[0] - anon_base,
                  "widths_after": report["widths_after"], "params_before": report["params_before"],
                  "params_after": report["params_after"], "max_rel": report["probe"]["float64"]["max_rel"],
                  "streamed": report.get("streamed", False),
                  "certified": pruning.get("certified", {}).get("max_abs"),
                  "method": pruning.get("certified", {}).get("method"),
                  "adversarial": pruning.get("adversarial", {}).get("max_abs"),
                  "search": [pruning.get("adversarial", {}).get(k) for k in ("starts", "steps")]}))
"""
SAFETENSORS_ONLY = {"formats": ["safetensors"]}


def run_child(model: Path, out: Path, options: dict, env: dict | None = None) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(model), str(out), json.dumps(options)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"shrink failed: {proc.stderr.strip()[-2000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(proc.stdout)


def svd_floor(path: Path) -> float:
    from isocompress.formats import io

    tensors, _ = io.read_tensors(path)
    weights = [t for k, t in tensors.items() if k.endswith(".weight") and t.dim() == 2]
    from isocompress.core import threads

    threads.configure()
    start = time.perf_counter()
    for w in weights:
        with threads.for_matrix(*w.shape):  # the shrink's thread policy
            torch.linalg.svd(w.to(torch.float64), full_matrices=False)
    return time.perf_counter() - start


def exact(widths: list[int], repeats: int, tmp: Path) -> None:
    from isocompress.core.model import random_model
    from isocompress.formats import io

    model = random_model(widths, o=(0.0, 1.0), seed=0)
    floors = None
    print(f"network            {'→'.join(map(str, widths))}")
    for suffix in (".pt", ".safetensors"):
        path = tmp / f"model{suffix}"
        io.save(model, path, dtype=torch.float32)
        size_kib = path.stat().st_size / 1024
        runs = [run_child(path, tmp / f"out{r}", SAFETENSORS_ONLY) for r in range(repeats)]
        floors = floors or [svd_floor(path) for _ in range(repeats)]
        best = min(runs, key=lambda r: r["seconds"])
        peak = max(r["peak_kib"] - r["baseline_kib"] for r in runs)
        anon = max(r["anon_peak_kib"] for r in runs)
        print(f"--- {suffix} float32 file, {size_kib / 1024:.1f} MiB (streamed: {best['streamed']})")
        print(f"widths after       {'→'.join(map(str, best['widths_after']))}")
        print(f"parameters         {best['params_before']:,} → {best['params_after']:,}")
        print(f"max rel |Δy|       {best['max_rel']:.2e}  (float64, probe inputs)")
        print(f"shrink --exact     {best['seconds']:.3f} s  (best of {repeats}, load → written files)")
        print(f"SVD floor          {min(floors):.3f} s  (one float64 SVD of every original weight, best of {repeats})")
        print(f"time ratio         {best['seconds'] / min(floors):.3f}  (target ≤ 2)")
        print(f"peak memory        {peak / 1024:.1f} MiB above baseline (VmHWM); anonymous {anon / 1024:.1f} MiB")
        print(f"memory ratio       {peak / size_kib:.3f}  (target ≤ 1.5); anonymous {anon / size_kib:.3f}")


def budget(widths_list: list[list[int]], tmp: Path) -> None:
    from isocompress.core.model import random_model
    from isocompress.formats import io

    print(f"{'network':<24} {'exact s':>8} {'budget s':>9} {'ratio':>6}  certified (method) ≥ adversarial; search")
    for widths in widths_list:
        path = tmp / "model.pt"
        io.save(random_model(widths, o=(0.0, 1.0), seed=0), path, dtype=torch.float32)
        e = run_child(path, tmp / "out", SAFETENSORS_ONLY)
        b = run_child(path, tmp / "out", {**SAFETENSORS_ONLY, "budget": 0.02})
        print(f"{'→'.join(map(str, widths)):<24} {e['seconds']:8.2f} {b['seconds']:9.2f} "
              f"{b['seconds'] / e['seconds']:6.2f}  {b['certified']:.3g} ({b['method']}) ≥ {b['adversarial']:.3g};"
              f" {b['search'][0]} starts × {b['search'][1]} steps; exact-shrunk widths "
              f"{'→'.join(map(str, e['widths_after']))}", flush=True)


def mem_total_kib() -> int:
    for line in open("/proc/meminfo"):
        if line.startswith("MemTotal:"):
            return int(line.split()[1])
    raise RuntimeError("no MemTotal")


def swap_out() -> int:
    for line in open("/proc/vmstat"):
        if line.startswith("pswpout"):
            return int(line.split()[1])
    return 0


def write_large(path: Path, width: int, n_in: int, n_hidden: int) -> None:
    """A random float32 safetensors model written one layer at a time (never whole in memory)."""
    from isocompress.core.config import ModelConfig
    from isocompress.exact.stream import TensorWriter
    from isocompress.formats.io import CONFIG_KEY

    widths = [n_in] + [width] * n_hidden + [10]
    specs = []
    for i in range(len(widths) - 1):
        specs += [(f"layers.{i}.weight", torch.float32, (widths[i + 1], widths[i])),
                  (f"layers.{i}.bias", torch.float32, (widths[i + 1],))]
        if i < len(widths) - 2:
            specs.append((f"layers.{i}.o", torch.float32, ()))
    config = ModelConfig(widths=tuple(widths), kinds=("dense",) * (len(widths) - 1), has_psi=(False,) * (len(widths) - 1))
    writer = TensorWriter(path, specs, {CONFIG_KEY: config.to_json()})
    gen = torch.Generator().manual_seed(0)
    for i in range(len(widths) - 1):
        writer.write(f"layers.{i}.weight", torch.randn(widths[i + 1], widths[i], generator=gen) / widths[i] ** 0.5)
        writer.write(f"layers.{i}.bias", 0.1 * torch.randn(widths[i + 1], generator=gen))
        if i < len(widths) - 2:
            writer.write(f"layers.{i}.o", torch.tensor(0.5))
    writer.close()


def large(width: int, n_in: int, n_hidden: int, where: Path) -> None:
    size = 4 * (width * width * (n_hidden - 1) + width * n_in + 10 * width)
    free = shutil.disk_usage(where).free
    total = mem_total_kib() * 1024
    print(f"model file         {size / 2 ** 30:.2f} GiB; machine memory {total / 2 ** 30:.2f} GiB (half:"
          f" {total / 2 ** 31:.2f} GiB); free disk {free / 2 ** 30:.1f} GiB at {where}")
    if size < total / 2:
        raise SystemExit("the model would not be larger than half the memory: raise --large-layers")
    if free < 1.3 * size:
        raise SystemExit("not enough free disk for the model and its output")
    with tempfile.TemporaryDirectory(dir=where, prefix="bench-large-") as tmp_name:
        path = Path(tmp_name) / "large.safetensors"
        start = time.perf_counter()
        write_large(path, width, n_in, n_hidden)
        print(f"generated          {path.stat().st_size / 2 ** 30:.2f} GiB in {time.perf_counter() - start:.0f} s",
              flush=True)
        swaps = swap_out()
        r = run_child(path, Path(tmp_name) / "out", SAFETENSORS_ONLY)
        peak = (r["peak_kib"] - r["baseline_kib"]) * 1024
        print(f"network            {n_in}→{width}×{n_hidden}→10 → {'→'.join(map(str, r['widths_after']))}"
              f" (streamed: {r['streamed']})")
        print(f"shrink --exact     {r['seconds']:.1f} s; max rel |Δy| {r['max_rel']:.2e}")
        print(f"peak memory        {peak / 2 ** 30:.2f} GiB above baseline (VmHWM) = {peak / size:.3f} × file,"
              f" {peak / total:.3f} × machine memory; anonymous {r['anon_peak_kib'] / 2 ** 20:.2f} GiB")
        print(f"pages swapped out  {swap_out() - swaps}  (/proc/vmstat pswpout during the run)")
    print("generated model and output deleted")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--budget", action="store_true")
    parser.add_argument("--large", action="store_true")
    parser.add_argument("--large-width", type=int, default=8192)
    parser.add_argument("--large-layers", type=int, default=50)
    parser.add_argument("--large-dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if args.large:
            large(args.large_width, 64, args.large_layers, args.large_dir)
        elif args.budget:
            series = [[512] + [2048] * 6 + [10]] + [[w // 4] + [w] * 6 + [10] for w in (256, 512, 1024, 2048, 4096)]
            budget(series, tmp)
        else:
            exact([128] + [512] * 4 + [10] if args.quick else [512] + [2048] * 6 + [10], args.repeats, tmp)
    print(f"threads            torch default {torch.get_num_threads()}; OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', '(unset)')}; load {' '.join(open('/proc/loadavg').read().split()[:3])}")
    flags = " ".join(a for a in sys.argv[1:])
    print(f"command            python benchmarks/bench_shrink.py {flags}".rstrip())


if __name__ == "__main__":
    main()
