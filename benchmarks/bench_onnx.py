"""onnxruntime latency and file size of an original vs an exact-shrunk isotropic MLP.

    python benchmarks/bench_onnx.py            # 2048→2048×6→10, full-rank random weights (a few minutes)
    python benchmarks/bench_onnx.py --quick    # 256→256×6→10 (seconds)

Exit code 1 if the full run misses the issue's targets (≥ 1.7× faster at batch 1, ONNX file ≤ 55% of the original).
At the --quick width the per-node overhead of the activations dominates, so the batch-1 speedup is lower there (about
1.15×) and --quick never fails.

Full-rank random weights have no constant directions, so only the alternating diagonal form acts: layers 1, 3, 5
become elementwise Muls. Each file is verified in onnxruntime against the float64 torch forward before it is timed.
Timing: one session per file, single thread (intra = inter = 1, sequential), warm-up runs, then the two models
alternate call by call (so drift hits both alike); each call is timed with perf_counter_ns; median and p99 reported.
The floor is an Identity graph on the same input, timed the same way in the same run (the per-call overhead).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from isocompress import io
from isocompress.api import probe_inputs, shrink_exact
from isocompress.model import random_model
from isocompress.onnx_export import export_and_verify, ort_session


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a 256-wide network and fewer runs")
    parser.add_argument("--width", type=int, default=None, help="input and hidden width [2048; 256 with --quick]")
    parser.add_argument("--hidden", type=int, default=6, help="number of hidden layers [6]")
    parser.add_argument("--outputs", type=int, default=10)
    parser.add_argument("--batches", default="1,64", help="comma-separated batch sizes [1,64]")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up calls per model and batch [200; 20 quick]")
    parser.add_argument("--runs", type=int, default=None, help="timed calls per model and batch [300; 100 quick]")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def identity_model(n_in: int):
    from onnx import TensorProto, helper

    value = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", n_in])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "floor", [value("x")], [value("y")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def time_alternating(sessions: dict, x: np.ndarray, warmup: int, runs: int) -> dict[str, np.ndarray]:
    """Per-call latencies in microseconds; the sessions take turns so that slow drift affects all of them alike."""
    feed = {"x": x}
    for session in sessions.values():
        for _ in range(warmup):
            session.run(None, feed)
    times = {name: np.empty(runs) for name in sessions}
    for r in range(runs):
        for name, session in sessions.items():
            start = time.perf_counter_ns()
            session.run(None, feed)
            times[name][r] = (time.perf_counter_ns() - start) / 1e3
    return times


def build_files(args, workdir: Path) -> tuple[dict[str, Path], dict]:
    widths = [args.width] * (args.hidden + 1) + [args.outputs]
    started = time.perf_counter()
    original = random_model(widths, psi=True, o=(0.0, 1.0), seed=args.seed)
    shrunk = shrink_exact(original)
    shrink_s = time.perf_counter() - started
    probes = probe_inputs(args.width, per_scale=16)
    files, checks = {}, {}
    for name, model in (("original", original), ("shrunk", shrunk)):
        files[name] = workdir / f"{name}.onnx"
        checks[name] = export_and_verify(model, files[name], probes, rtol=1e-4)
        io.save(model, workdir / f"{name}.safetensors", dtype=torch.float32)
    floor_path = workdir / "floor.onnx"
    floor_path.write_bytes(identity_model(args.width).SerializeToString())
    files["floor"] = floor_path
    info = {"widths_before": original.widths, "widths_after": shrunk.widths,
            "kinds_after": [layer.kind for layer in shrunk.layers], "shrink_s": shrink_s,
            "params": (original.num_params(), shrunk.num_params()), "checks": checks}
    return files, info


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    try:
        return "/".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def main() -> None:
    args = parse_args()
    args.load_start = load_average()
    args.width = args.width or (256 if args.quick else 2048)
    args.warmup = args.warmup if args.warmup is not None else (20 if args.quick else 200)
    args.runs = args.runs or (100 if args.quick else 300)
    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        files, info = build_files(args, workdir)
        sessions = {name: ort_session(path, threads=1) for name, path in files.items()}
        gen = np.random.default_rng(args.seed)
        results = {b: time_alternating(sessions, gen.standard_normal((b, args.width)).astype(np.float32),
                                       args.warmup, args.runs) for b in batches}
        sizes = {name: path.stat().st_size for name, path in files.items()}
        st_sizes = {name: (workdir / f"{name}.safetensors").stat().st_size for name in ("original", "shrunk")}
    args.load_end = load_average()
    ok = print_report(args, info, results, sizes, st_sizes)
    sys.exit(0 if ok or args.quick else 1)


def print_report(args, info, results, sizes, st_sizes) -> bool:
    import onnxruntime

    arrow = lambda w: "→".join(map(str, w))
    print(f"# onnxruntime {onnxruntime.__version__}, torch {torch.__version__}, Python {platform.python_version()};"
          f" {cpu_name()}, {os.cpu_count()} cores; timed single-threaded")
    print(f"# load average (1/5/15 min) at start {args.load_start}, at end {args.load_end}")
    print(f"original {arrow(info['widths_before'])}  ({info['params'][0]:,} parameters)")
    print(f"shrunk   {arrow(info['widths_after'])}  kinds {','.join(info['kinds_after'])}"
          f"  ({info['params'][1]:,} parameters; shrink_exact took {info['shrink_s']:.1f} s)")
    for name, check in info["checks"].items():
        print(f"onnx check {name}: max rel diff {check['max_rel_diff']:.2e} vs float64 torch (tolerance 1e-4)")
    print(f"warm-up {args.warmup}, timed calls {args.runs} per model and batch; latency in µs")
    print(f"{'batch':>5}  {'model':<9} {'median':>10} {'p99':>10} {'× floor':>9}")
    for b, times in results.items():
        floor = np.median(times["floor"])
        for name in ("floor", "original", "shrunk"):
            med, p99 = np.median(times[name]), np.percentile(times[name], 99)
            print(f"{b:>5}  {name:<9} {med:>10.1f} {p99:>10.1f} {med / floor:>9.1f}")
        orig, shr = np.median(times["original"]), np.median(times["shrunk"])
        print(f"{b:>5}  speedup original/shrunk: {orig / shr:.2f}× (net of floor {(orig - floor) / (shr - floor):.2f}×)")
    print(f"file size onnx:        original {sizes['original']:,} B, shrunk {sizes['shrunk']:,} B"
          f" = {100 * sizes['shrunk'] / sizes['original']:.1f}%")
    print(f"file size safetensors: original {st_sizes['original']:,} B, shrunk {st_sizes['shrunk']:,} B"
          f" = {100 * st_sizes['shrunk'] / st_sizes['original']:.1f}%")
    # The acceptance criteria of issue 3 (stated for the full 2048→2048×6→10 run; printed for any run).
    speedup = np.median(results[1]["original"]) / np.median(results[1]["shrunk"]) if 1 in results else None
    size_ratio = sizes["shrunk"] / sizes["original"]
    checks = [("onnx file size shrunk/original <= 55%", size_ratio <= 0.55, f"{100 * size_ratio:.1f}%")]
    if speedup is not None:
        checks.insert(0, ("batch-1 median speedup >= 1.7x", speedup >= 1.7, f"{speedup:.2f}x"))
    for name, passed, value in checks:
        verdict = ("met" if passed else "not met") if args.quick else ("PASS" if passed else "FAIL")
        print(f"{verdict}  {name}: {value}" + ("  (the targets are for the full run, not --quick)" if args.quick else ""))
    print("reproduce: python " + " ".join(shlex.quote(a) for a in ["benchmarks/bench_onnx.py", *sys.argv[1:]]))
    return all(passed for _, passed, _ in checks)


if __name__ == "__main__":
    main()
