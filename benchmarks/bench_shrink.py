"""Speed and memory of `shrink`, as ratios against floors measured in the same run.

    python benchmarks/bench_shrink.py                  # the default command `isocompress shrink FILE` (safetensors and
                                                       #   ONNX) on 512→2048×6→10 in three layouts: the reference
                                                       #   state_dict .pt, isocompress's own .pt and .safetensors
    python benchmarks/bench_shrink.py --quick          # the same on 128→512×4→10
    python benchmarks/bench_shrink.py --budget         # --budget 2% vs --exact on 512→2048×6→10, and W/4→W×6→10
                                                       #   for W = 256 … 4096 (how the time grows with width)
    python benchmarks/bench_shrink.py --large          # a generated safetensors model, 64→8192×50→10 (12 GiB) by
                                                       #   default; --large-width W --large-depth D for a scaled one
                                                       #   (e.g. 4096 and 12); then deleted

time ratio   = total time of the default command (a fresh process running the CLI: load → published files) / time
               of one read of the file (every byte read once with plain reads, in the same run, best of the repeats).
memory ratio = peak resident memory of that process (VmHWM) above its baseline after the imports / model file size;
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
import torch, onnx, onnxruntime, safetensors.torch, tqdm  # what the command imports, in the baseline
import isocompress.cli, isocompress.api.shrink, isocompress.exact.stream, isocompress.export.onnx_export
baseline, anon = status("VmRSS:"), [status("RssAnon:")]
anon_base = anon[0]
stop = threading.Event()
def sample():
    while not stop.is_set():
        anon[0] = max(anon[0], status("RssAnon:"))
        time.sleep(0.002)
threading.Thread(target=sample, daemon=True).start()
argv, report_path = json.loads(sys.argv[1]), sys.argv[2]
start = time.perf_counter()
sys.argv = ["isocompress", *argv]
try:
    isocompress.cli.main()
except SystemExit as exc:
    if exc.code:
        raise
seconds = time.perf_counter() - start
stop.set()
report = json.load(open(report_path))
pruning = report.get("pruning", {})
print(json.dumps({"seconds": seconds, "baseline_kib": baseline, "peak_kib": status("VmHWM:"),
                  "anon_peak_kib": anon[0] - anon_base,
                  "widths_after": report["widths_after"], "params_before": report["params_before"],
                  "params_after": report["params_after"], "max_rel": report["probe"]["float64"]["max_rel"],
                  "onnx_rel": report.get("onnx", {}).get("max_rel_diff"),
                  "streamed": report.get("streamed", False), "files": sorted(report["files"]),
                  "certified": pruning.get("certified", {}).get("max_abs"),
                  "method": pruning.get("certified", {}).get("method"),
                  "adversarial": pruning.get("adversarial", {}).get("max_abs"),
                  "search": [pruning.get("adversarial", {}).get(k) for k in ("starts", "steps")]}))
"""
SAFETENSORS_ONLY = ["--format", "safetensors"]


def run_child(model: Path, out: Path, flags: list[str], env: dict | None = None) -> dict:
    """`isocompress shrink MODEL --out OUT --quiet FLAGS…` in a fresh process; its timing and peak memory."""
    argv = ["shrink", str(model), "--out", str(out), "--quiet", *flags]
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(argv), str(out / "report.json")],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"shrink failed: {proc.stderr.strip()[-2000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def evict(path: Path) -> None:
    """Drops this file's pages from the page cache (posix_fadvise DONTNEED; only this file, nothing else), so that
    the next read comes from the disk."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
        os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def read_floor(path: Path, chunk: int = 1 << 24, cold: bool = True) -> float:
    """Seconds to read every byte of the file once (plain reads into one reused buffer), from the disk (`cold`: its
    pages evicted first) or from the page cache."""
    if cold:
        evict(path)
    buffer = bytearray(chunk)
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as handle:
        while handle.readinto(buffer):
            pass
    return time.perf_counter() - start


def write_layout(model, path: Path, layout: str) -> None:
    from isocompress.formats import io

    if layout == "reference .pt":
        torch.save(io.reference_state_dict(model, torch.float32), path)
    else:
        io.save(model, path, dtype=torch.float32)


def exact(widths: list[int], repeats: int, tmp: Path) -> None:
    from isocompress.core.model import random_model

    model = random_model(widths, o=(0.0, 1.0), seed=0)
    print(f"network            {'→'.join(map(str, widths))}; the default command: isocompress shrink FILE (safetensors"
          " and ONNX)")
    for layout, name in (("reference .pt", "ref.pt"), ("own .pt", "own.pt"), (".safetensors", "own.safetensors")):
        path = tmp / name
        write_layout(model, path, layout)
        size_kib = path.stat().st_size / 1024
        runs = []
        for r in range(repeats):
            evict(path)  # each run starts with the file on disk, as the read floor does
            runs.append(run_child(path, tmp / f"out{r}", []))
        reads = [read_floor(path) for _ in range(repeats)]
        cached = min(read_floor(path, cold=False) for _ in range(repeats))
        best = min(runs, key=lambda r: r["seconds"])
        peak = max(r["peak_kib"] - r["baseline_kib"] for r in runs)
        anon = max(r["anon_peak_kib"] for r in runs)
        print(f"--- {layout}, float32, {size_kib / 1024:.1f} MiB (streamed: {best['streamed']}; files {best['files']})")
        print(f"widths after       {'→'.join(map(str, best['widths_after']))}")
        print(f"parameters         {best['params_before']:,} → {best['params_after']:,}")
        print(f"max rel |Δy|       {best['max_rel']:.2e}  (float64, probe inputs); ONNX {best['onnx_rel']:.2e}")
        print(f"shrink (default)   {best['seconds']:.3f} s  (best of {repeats}, the CLI in a fresh process)")
        print(f"one read           {min(reads):.3f} s  (every byte of the file from the disk, its cached pages evicted"
              f" first, best of {repeats}; from the page cache {cached:.3f} s)")
        print(f"time ratio         {best['seconds'] / min(reads):.1f}  (shrink / one read)")
        print(f"peak memory        {peak / 1024:.1f} MiB above baseline (VmHWM); anonymous {anon / 1024:.1f} MiB")
        print(f"memory ratio       {peak / size_kib:.3f}  (target ≤ 1.5); anonymous {anon / size_kib:.3f}", flush=True)


def budget(widths_list: list[list[int]], tmp: Path) -> None:
    from isocompress.core.model import random_model
    from isocompress.formats import io

    print(f"{'network':<24} {'exact s':>8} {'budget s':>9} {'ratio':>6}  certified (method) ≥ adversarial; search")
    for widths in widths_list:
        path = tmp / "model.pt"
        io.save(random_model(widths, o=(0.0, 1.0), seed=0), path, dtype=torch.float32)
        e = run_child(path, tmp / "out", SAFETENSORS_ONLY)
        b = run_child(path, tmp / "out", [*SAFETENSORS_ONLY, "--budget", "2%"])
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
    scaled = size < total / 2
    print(f"model file         {size / 2 ** 30:.2f} GiB; machine memory {total / 2 ** 30:.2f} GiB (half:"
          f" {total / 2 ** 31:.2f} GiB); free disk {free / 2 ** 30:.1f} GiB at {where}"
          + ("; a scaled measurement (smaller than half the memory)" if scaled else ""))
    if free < 1.3 * size:
        raise SystemExit("not enough free disk for the model and its output")
    with tempfile.TemporaryDirectory(dir=where, prefix="bench-large-") as tmp_name:
        path = Path(tmp_name) / "large.safetensors"
        start = time.perf_counter()
        write_large(path, width, n_in, n_hidden)
        print(f"generated          {path.stat().st_size / 2 ** 30:.2f} GiB in {time.perf_counter() - start:.0f} s",
              flush=True)
        read = read_floor(path)
        swaps = swap_out()
        evict(path)
        r = run_child(path, Path(tmp_name) / "out", [])
        peak = (r["peak_kib"] - r["baseline_kib"]) * 1024
        print(f"network            {n_in}→{width}×{n_hidden}→10 → {'→'.join(map(str, r['widths_after']))}"
              f" (streamed: {r['streamed']}; files {r['files']})")
        print(f"shrink (default)   {r['seconds']:.1f} s; max rel |Δy| {r['max_rel']:.2e}; ONNX {r['onnx_rel']:.2e}")
        print(f"one read           {read:.1f} s  (every byte from the disk, its cached pages evicted first; the shrink"
              " also starts with the file evicted)")
        print(f"time ratio         {r['seconds'] / read:.1f}  (shrink / one read)")
        print(f"peak memory        {peak / 2 ** 30:.3f} GiB above baseline (VmHWM) = {peak / size:.3f} × file,"
              f" {peak / total:.3f} × machine memory; anonymous {r['anon_peak_kib'] / 2 ** 20:.3f} GiB")
        print(f"pages swapped out  {swap_out() - swaps}  (/proc/vmstat pswpout during the run)")
    print("generated model and output deleted")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--budget", action="store_true")
    parser.add_argument("--large", action="store_true")
    parser.add_argument("--large-width", type=int, default=8192)
    parser.add_argument("--large-depth", "--large-layers", dest="large_depth", type=int, default=50,
                        help="hidden layers of the --large model")
    parser.add_argument("--large-dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if args.large:
            large(args.large_width, 64, args.large_depth, args.large_dir)
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
