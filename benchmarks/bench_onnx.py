"""onnxruntime latency, graph size and file size of original vs exact-shrunk isotropic MLPs.

    python benchmarks/bench_onnx.py            # the shipped digits and MNIST-1D models + 2048→2048×6→10 (minutes)
    python benchmarks/bench_onnx.py --quick    # the shipped models + 256→256×6→10, fewer calls (seconds)

For every case it prints the nodes per layer of both graphs (weight nodes plus the activation after them), and the
batch-1 and batch-64 median latency of the shrunk file as a ratio of the original file's, both exported by the same
exporter and timed in the same run. Exit code 1 if the full run misses a target: the shrunk digits model at batch 1
≤ 0.7× the original's latency (issue 12); the 2048-wide model ≥ 1.7× faster at batch 1 and its ONNX file ≤ 55% of
the original (issue 3). --quick never fails.

Full-rank random weights have no constant directions, so only the alternating diagonal form acts on the 2048-wide
model: layers 1, 3, 5 become elementwise Muls. Each file is verified in onnxruntime against the float64 torch forward
before it is timed. Timing: one session per file, single thread (intra = inter = 1, sequential), warm-up runs, then
the models alternate call by call (so drift hits all alike); each call is timed with perf_counter_ns; median and p99
reported. The floor is an Identity graph on the same input, timed the same way in the same run (the per-call
overhead).
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

from isocompress.api.shrink import probe_inputs
from isocompress.core.model import random_model
from isocompress.exact.shrink import shrink_exact
from isocompress.export.onnx_export import build_onnx, export_and_verify, node_counts, ort_session
from isocompress.formats import io

SHIPPED = ("digits", "mnist1d")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a 256-wide random network and fewer runs")
    parser.add_argument("--models", default="models", help="directory of the shipped models [models]")
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


def build_case(name: str, original, workdir: Path) -> dict:
    """Shrink exactly, export both (verified), save both; returns the case's files and facts."""
    started = time.perf_counter()
    shrunk = shrink_exact(original)
    shrink_s = time.perf_counter() - started
    probes = probe_inputs(original.widths[0], per_scale=16)
    case = {"name": name, "widths_before": original.widths, "widths_after": shrunk.widths, "shrink_s": shrink_s,
            "kinds_after": [layer.kind for layer in shrunk.layers],
            "params": (original.num_params(), shrunk.num_params()), "files": {}, "checks": {}, "nodes": {},
            "bytes": {}, "st_bytes": {}}
    for side, model in (("original", original), ("shrunk", shrunk)):
        path = workdir / f"{name}.{side}.onnx"
        case["checks"][side] = export_and_verify(model, path, probes, rtol=1e-4)
        case["nodes"][side] = node_counts(build_onnx(model, check=False))
        case["files"][side] = path
        case["bytes"][side] = path.stat().st_size
        st = io.save(model, workdir / f"{name}.{side}.safetensors", dtype=torch.float32)
        case["st_bytes"][side] = st.stat().st_size
    floor_path = workdir / f"{name}.floor.onnx"
    floor_path.write_bytes(identity_model(original.widths[0]).SerializeToString())
    case["files"]["floor"] = floor_path
    return case


def build_cases(args, workdir: Path) -> list[dict]:
    cases = []
    for name in SHIPPED:
        path = Path(args.models) / f"{name}.pt"
        if path.exists():
            cases.append(build_case(name, io.load(path), workdir))
        else:
            print(f"# {path} not found: skipped", file=sys.stderr)
    widths = [args.width] * (args.hidden + 1) + [args.outputs]
    random = random_model(widths, psi=True, o=(0.0, 1.0), seed=args.seed)
    cases.append(build_case(f"random{args.width}", random, workdir))
    return cases


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
        cases = build_cases(args, Path(tmp))
        gen = np.random.default_rng(args.seed)
        for case in cases:
            sessions = {name: ort_session(path, threads=1) for name, path in case["files"].items()}
            n_in = case["widths_before"][0]
            case["times"] = {b: time_alternating(sessions, gen.standard_normal((b, n_in)).astype(np.float32),
                                                 args.warmup, args.runs) for b in batches}
    args.load_end = load_average()
    ok = print_report(args, cases)
    sys.exit(0 if ok or args.quick else 1)


def print_case(case: dict) -> dict[int, float]:
    """One case's lines; returns {batch: shrunk/original median latency}."""
    arrow = lambda w: "→".join(map(str, w))
    name = case["name"]
    print(f"## {name}: {arrow(case['widths_before'])} ({case['params'][0]:,} parameters) → "
          f"{arrow(case['widths_after'])} kinds {','.join(case['kinds_after'])} ({case['params'][1]:,};"
          f" shrink_exact {case['shrink_s']:.2f} s)")
    for side in ("original", "shrunk"):
        nodes = case["nodes"][side]
        print(f"   nodes per layer {side:<8} {nodes} = {sum(nodes)};  onnx check max rel diff"
              f" {case['checks'][side]['max_rel_diff']:.2e} vs float64 torch (tolerance 1e-4)")
    print(f"   {'batch':>5}  {'model':<9} {'median µs':>10} {'p99 µs':>10} {'× floor':>9}")
    ratios = {}
    for b, times in case["times"].items():
        floor = np.median(times["floor"])
        for side in ("floor", "original", "shrunk"):
            med, p99 = np.median(times[side]), np.percentile(times[side], 99)
            print(f"   {b:>5}  {side:<9} {med:>10.1f} {p99:>10.1f} {med / floor:>9.1f}")
        orig, shr = np.median(times["original"]), np.median(times["shrunk"])
        ratios[b] = shr / orig
        print(f"   {b:>5}  latency shrunk/original {shr / orig:.3f} (speedup {orig / shr:.2f}×;"
              f" net of floor {(orig - floor) / max(shr - floor, 1e-9):.2f}×)")
    print(f"   file size onnx {case['bytes']['original']:,} → {case['bytes']['shrunk']:,} B"
          f" ({100 * case['bytes']['shrunk'] / case['bytes']['original']:.1f}%); safetensors"
          f" {case['st_bytes']['original']:,} → {case['st_bytes']['shrunk']:,} B"
          f" ({100 * case['st_bytes']['shrunk'] / case['st_bytes']['original']:.1f}%)")
    return ratios


def print_report(args, cases: list[dict]) -> bool:
    import onnxruntime

    print(f"# onnxruntime {onnxruntime.__version__}, torch {torch.__version__}, Python {platform.python_version()};"
          f" {cpu_name()}, {os.cpu_count()} cores; timed single-threaded")
    print(f"# load average (1/5/15 min) at start {args.load_start}, at end {args.load_end}")
    print(f"# warm-up {args.warmup}, timed calls {args.runs} per model and batch")
    checks = []
    for case in cases:
        ratios = print_case(case)
        if case["name"] == "digits" and 1 in ratios:
            checks.append(("digits exact-shrunk batch-1 latency <= 0.7x the original's", ratios[1] <= 0.7,
                           f"{ratios[1]:.3f}x"))
        if case["name"].startswith("random"):
            size_ratio = case["bytes"]["shrunk"] / case["bytes"]["original"]
            if 1 in ratios:
                checks.append((f"{case['name']} batch-1 median speedup >= 1.7x", 1 / ratios[1] >= 1.7,
                               f"{1 / ratios[1]:.2f}x"))
            checks.append((f"{case['name']} onnx file size shrunk/original <= 55%", size_ratio <= 0.55,
                           f"{100 * size_ratio:.1f}%"))
    for name, passed, value in checks:
        verdict = ("met" if passed else "not met") if args.quick else ("PASS" if passed else "FAIL")
        note = "  (the random-model targets are for the full 2048-wide run)" if args.quick and "random" in name else ""
        print(f"{verdict}  {name}: {value}{note}")
    print("reproduce: python " + " ".join(shlex.quote(a) for a in ["benchmarks/bench_onnx.py", *sys.argv[1:]]))
    return all(passed for _, passed, _ in checks)


if __name__ == "__main__":
    main()
