"""Isotropic CNNs: isocompress against Torch-Pruning on the same network at the same parameter count, and ONNX latency.

    python benchmarks/bench_cnn.py                  # both shipped CNNs, budgets 50/20/10/5% (minutes)
    python benchmarks/bench_cnn.py --quick          # budget 10%, short fine-tuning, fewer timed calls (< 1 minute)
    python benchmarks/bench_cnn.py --full-train     # ... and a reference row: TP fine-tuned on the whole training set

Needs torch-pruning: pip install -e ".[bench]".

The network is the trained torch module itself (scripts/train_models.py's class, with the shipped file's weights loaded
into it and checked against the file). At each budget B isocompress prunes to B of the parameters; Torch-Pruning then
prunes the same module, in its own architecture, to the largest pruning ratio whose parameter count is ≤ isocompress's
(bisection on the ratio; both counts are every stored number, the intrinsic lengths included). FLOPs are counted by
one rule for both (`IsoMLP.flops`: 2 per multiply-add of the convs and Linear maps, on the converted module).

Without data: isocompress `--budget B` (data-free, scale-free ranking) against Torch-Pruning's magnitude importance
(GroupMagnitudeImportance p = 2, and p = 1) with no fine-tuning, uniform per-layer ratio (its default) and global.

With data (the 256 labelled calibration samples, the same data for both): isocompress's data-aware basis against
Torch-Pruning's recommended recipe: prune iteratively (ITERATIVE_STEPS steps to the final ratio), fine-tuning after
every step, then fine-tune again (epochs, optimiser and data printed with the results), with L2 magnitude and with
Taylor importance (gradients of the loss on the calibration data before each step). `--full-train` adds one row with
the same recipe fine-tuning on the whole training set (a reference: isocompress never sees those data).

Torch-Pruning traces the module's autograd graph. An isotropic activation σ(m)/m · z has no per-channel parameter but
its norm m couples all channels of a position; registered as a customized layer whose input and output channels are
the same channels (`IsotropicActivationPruner`), pruning a conv's output channels prunes the activation's channels
alike, the norm then runs over the channels that remain and its intrinsic length is kept. Every pruned module is
checked: isocompress.from_module must read it as an isotropic network (activations recognised by behaviour) computing
the same outputs to 1e-10, with the same parameter count as torch's.

ONNX: the original file and the isocompress-shrunk models (exact, and data-aware at 10%) are exported by
isocompress's exporter and verified in onnxruntime against the float64 torch forward at tolerance 1e-5 (relative to
max |y|) on the test inputs and Gaussian probes; batch-1 and batch-64 latency, single-threaded onnxruntime, warm-up,
then the sessions alternate call by call; median of the timed calls.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch_pruning as tp  # pip install -e ".[bench]"
from torch import nn

import isocompress
from isocompress.api.shrink import ShrinkOptions
from isocompress.core.measure import probe_inputs
from isocompress.export.onnx_export import export_and_verify, ort_session
from isocompress.formats import io
from isocompress.prune import budget as prune

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "benchmarks"))
import train_models  # the CNN classes, as the training script defines them
from bench_onnx import cpu_name, load_average, time_alternating

F64 = torch.float64
SHIPPED = ("mnist1d_cnn", "digits_cnn")
ITERATIVE_STEPS = 5
ONNX_RTOL = 1e-5
ONNX_BUDGET = 0.1


@dataclass
class Case:
    name: str
    model: isocompress.IsoMLP  # the shipped file, float64
    net: nn.Module  # the torch module with the file's weights, float64, eval mode
    calib: torch.Tensor
    calib_labels: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


@dataclass
class FineTune:
    epochs_per_step: int
    final_epochs: int
    lrs: tuple[float, ...] = (3e-3, 1e-2)
    batch_size: int = 32
    lr: float = 3e-3  # the one run now (tp_rows_finetuned tries each of lrs)

    def describe(self, data: str) -> str:
        lrs = ", ".join(f"{lr:g}" for lr in self.lrs)
        return (f"{ITERATIVE_STEPS} pruning steps to the final ratio, each followed by {self.epochs_per_step} epochs of"
                f" Adam (batch {self.batch_size}) on {data}, then {self.final_epochs} more epochs; learning rate: the"
                f" best of {lrs} by test accuracy (an oracle choice that favours Torch-Pruning)")


# --- the shipped CNN as its torch module ---------------------------------------------------------------------------
def module_with_weights(model: isocompress.IsoMLP, net: nn.Module) -> nn.Module:
    """`net` (a fresh instance of the training script's class) with the file's weights, biases and intrinsic lengths."""
    maps = [m for m in net.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]
    activations = [m for m in net.modules() if isinstance(m, train_models.IsotropicTanh)]
    if len(maps) != len(model.layers) or len(activations) != len(model.layers) - 1:
        sys.exit(f"bench_cnn: the file has {len(model.layers)} layers; the module {type(net).__name__} does not match")
    net = net.to(F64)
    with torch.no_grad():
        for layer, m in zip(model.layers, maps):
            m.weight.copy_(layer.dense_weight().reshape(m.weight.shape))
            m.bias.copy_(layer.bias)
        for layer, act in zip(model.layers, activations):
            act.raw.copy_(torch.log(torch.expm1(layer.o)))
    return net.eval()


def load_case(name: str, models_dir: Path) -> Case:
    stem = models_dir / name
    need = [Path(f"{stem}.safetensors"), Path(f"{stem}.calib.npy"), Path(f"{stem}.calib.labels.npy"),
            Path(f"{stem}.test.npz")]
    missing = [str(p) for p in need if not p.exists()]
    if missing:
        sys.exit(f"bench_cnn: missing {', '.join(missing)}; run python scripts/train_models.py --cnn")
    model = io.load(need[0])
    net = module_with_weights(model, train_models.CNN_RECIPES[name].build())
    test = np.load(need[3])
    case = Case(name, model, net, torch.from_numpy(np.load(need[1])).to(F64), torch.from_numpy(np.load(need[2])),
                torch.from_numpy(test["x"]).to(F64), torch.from_numpy(test["y"]))
    with torch.no_grad():
        drift = relative_difference(model(case.x_test), net(case.x_test))
    if not drift <= 1e-10:
        sys.exit(f"bench_cnn: the module with {need[0]}'s weights differs from the file by {drift:.3g} relative")
    return case


def relative_difference(reference: torch.Tensor, other: torch.Tensor) -> float:
    """max over samples of |Δy| over max |y| (the measure of isocompress's ONNX check)."""
    return float((other - reference).norm(dim=1).max() / reference.norm(dim=1).max())


@torch.no_grad()
def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((net(x).argmax(dim=1) == y).double().mean())


def torch_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# --- Torch-Pruning ------------------------------------------------------------------------------------------------
class IsotropicActivationPruner(tp.pruner.function.BasePruningFunc):
    """The activation's input and output channels are the same channels (prune_in = prune_out, as for an elementwise
    op) and it holds no per-channel parameter: pruning a channel leaves the module as it is (its norm runs over the
    channels that remain; the intrinsic length is one scalar)."""

    def prune_out_channels(self, layer: nn.Module, idxs) -> nn.Module:
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: nn.Module):
        return None

    def get_in_channels(self, layer: nn.Module):
        return None


IMPORTANCES = {
    "L2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
    "L1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
    "Taylor": lambda: tp.importance.GroupTaylorImportance(),
}


def make_pruner(net: nn.Module, example: torch.Tensor, importance: str, ratio: float, global_pruning: bool,
                steps: int = 1):
    head = [m for m in net.modules() if isinstance(m, nn.Linear)][-1]  # the logits keep their 10 outputs
    return tp.pruner.BasePruner(net, example, importance=IMPORTANCES[importance](), pruning_ratio=ratio,
                                iterative_steps=steps, global_pruning=global_pruning, max_pruning_ratio=0.97,
                                ignored_layers=[head],
                                customized_pruners={train_models.IsotropicTanh: IsotropicActivationPruner()})


def tp_pruned(net: nn.Module, example: torch.Tensor, importance: str, ratio: float, global_pruning: bool) -> nn.Module:
    """One-shot pruning of a copy, no fine-tuning."""
    pruned = copy.deepcopy(net)
    make_pruner(pruned, example, importance, ratio, global_pruning).step()
    return pruned


def largest_within(build, target: int, iterations: int = 12) -> tuple[nn.Module, float]:
    """(module, ratio): the largest pruning ratio (bisection) whose module has ≤ target parameters."""
    lo, hi, best = 0.0, 0.97, None
    for _ in range(iterations):
        mid = (lo + hi) / 2
        candidate = build(mid)
        if torch_params(candidate) <= target:
            hi, best = mid, (candidate, mid)
        else:
            lo = mid
    if best is None:
        best = (build(hi), hi)
    return best


def tp_finetuned(net: nn.Module, case: Case, importance: str, ratio: float, recipe: FineTune, x, y) -> nn.Module:
    """Torch-Pruning's recipe: ITERATIVE_STEPS pruning steps to `ratio`, fine-tuning on (x, y) after each, then a final
    fine-tuning. Trained in float32 as a user would; returned in float64 for evaluation."""
    pruned = copy.deepcopy(net).float()
    x32, example = x.float(), case.calib[:8].float()
    pruner = make_pruner(pruned, example, importance, ratio, global_pruning=False, steps=ITERATIVE_STEPS)
    for step in range(ITERATIVE_STEPS):
        if importance == "Taylor":
            pruned.zero_grad()
            nn.functional.cross_entropy(pruned(case.calib.float()), case.calib_labels).backward()
        pruner.step()
        fine_tune(pruned, x32, y, recipe.epochs_per_step, recipe, seed=step)
    fine_tune(pruned, x32, y, recipe.final_epochs, recipe, seed=ITERATIVE_STEPS)
    return pruned.to(F64).eval()


def fine_tune(net: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, recipe: FineTune, seed: int) -> None:
    net.train()
    optimiser = torch.optim.Adam(net.parameters(), lr=recipe.lr)
    order = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=order).split(recipe.batch_size):
            loss = nn.functional.cross_entropy(net(x[batch]), y[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    net.eval()


def checked(pruned: nn.Module, case: Case) -> isocompress.IsoMLP:
    """The pruned module as isocompress reads it: it must still be an isotropic network computing the same function
    with the same parameter count (else the comparison would not be fair); its FLOPs are then counted by one rule."""
    model = isocompress.from_module(pruned, case.x_test[:16])
    with torch.no_grad():
        drift = relative_difference(pruned(case.x_test), model(case.x_test))
    if not drift <= 1e-10 or model.num_params() != torch_params(pruned):
        raise RuntimeError(f"a Torch-Pruning result is not the isotropic network it should be (drift {drift:.3g},"
                           f" params {model.num_params()} vs torch {torch_params(pruned)})")
    return model


# --- rows -----------------------------------------------------------------------------------------------------------
def row(method: str, model: isocompress.IsoMLP, net: nn.Module, case: Case, seconds: float) -> dict:
    with torch.no_grad():
        y, y_pruned = case.net(case.x_test), net(case.x_test)
    change = float(((y_pruned - y).norm(dim=1) / y.norm(dim=1)).mean())
    return {"method": method, "params": model.num_params(), "flops": model.flops(), "widths": model.widths,
            "accuracy": float((y_pruned.argmax(dim=1) == case.y_test).double().mean()), "change": change,
            "seconds": seconds}


def iso_row(case: Case, budget: float, with_data: bool, search: tuple[int, int]) -> dict:
    started = time.perf_counter()
    options = ShrinkOptions(budget=budget, basis="data-aware" if with_data else "data-free")
    pruned, _ = prune.prune_to_budget(case.model, options, calibration=case.calib if with_data else None,
                                      labels=case.calib_labels if with_data else None, search_restarts=search[0],
                                      search_steps=search[1])
    name = "isocompress data-aware" if with_data else "isocompress data-free"
    return {**row(name, pruned, pruned, case, time.perf_counter() - started), "model": pruned}


def tp_rows_nodata(case: Case, target: int) -> list[dict]:
    rows, example = [], case.calib[:8]
    for importance in ("L2", "L1"):
        for global_pruning in (False, True):
            started = time.perf_counter()
            def build(r, importance=importance, global_pruning=global_pruning):
                return tp_pruned(case.net, example, importance, r, global_pruning)

            pruned, ratio = largest_within(build, target)
            name = f"TP {importance} {'global' if global_pruning else 'uniform'} r={ratio:.3f}"
            rows.append(row(name, checked(pruned, case), pruned, case, time.perf_counter() - started))
    return rows


def tp_rows_finetuned(case: Case, target: int, recipe: FineTune, train_data=None) -> list[dict]:
    """Uniform ratio (the count depends on the ratio alone, so the bisection needs no fine-tuning)."""
    _, ratio = largest_within(lambda r: tp_pruned(case.net, case.calib[:8], "L2", r, False), target)
    runs = [("L2", case.calib, case.calib_labels, "calib"), ("Taylor", case.calib, case.calib_labels, "calib")]
    if train_data is not None:
        runs.append(("L2", *train_data, "train"))
    rows = []
    for importance, x, y, data in runs:
        tried = []
        for lr in recipe.lrs:
            started = time.perf_counter()
            pruned = tp_finetuned(case.net, case, importance, ratio, replace(recipe, lr=lr), x, y)
            name = f"TP {importance} r={ratio:.3f} + FT lr {lr:g} ({data})"
            tried.append(row(name, checked(pruned, case), pruned, case, time.perf_counter() - started))
        rows.append(max(tried, key=lambda r: r["accuracy"]))
        rows[-1]["seconds"] = sum(r["seconds"] for r in tried)
    return rows


def training_data(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    recipe = train_models.CNN_RECIPES[name]
    x, y, _, _ = train_models.LOADERS[recipe.data]()
    return torch.from_numpy(x).reshape(-1, *recipe.input_shape).to(F64), torch.from_numpy(y)


def compare_budgets(case: Case, budgets: list[float], recipe: FineTune, search, full_train: bool) -> list[tuple]:
    """(budget, rows without data, rows with data) per budget."""
    train_data = training_data(case.name) if full_train else None
    out = []
    for budget in budgets:
        free = iso_row(case, budget, False, search)
        aware = iso_row(case, budget, True, search)
        out.append((budget, [free] + tp_rows_nodata(case, free["params"]),
                    [aware] + tp_rows_finetuned(case, aware["params"], recipe, train_data)))
    return out


# --- ONNX ------------------------------------------------------------------------------------------------------------
def onnx_case(case: Case, results: list[tuple], workdir: Path, warmup: int, runs: int) -> dict:
    """Export the original, the exact-shrunk and the data-aware ONNX_BUDGET models (each verified at ONNX_RTOL) and
    time them at batch 1 and 64. The budget's model is the one compared above when that budget ran."""
    done = [aware[0]["model"] for budget, _, aware in results if budget == ONNX_BUDGET]
    aware = done[0] if done else iso_row(case, ONNX_BUDGET, True, (2, 10))["model"]
    models = {"original": case.model, "exact": isocompress.shrink_exact(case.model), f"{ONNX_BUDGET:.0%}": aware}
    probes = torch.cat([case.x_test, probe_inputs(case.model.input_shape, per_scale=16)])
    out = {"models": {}, "times": {}}
    sessions = {}
    for side, model in models.items():
        path = workdir / f"{case.name}.{side.rstrip('%')}.onnx"
        record = export_and_verify(model, path, probes, rtol=ONNX_RTOL)
        session = ort_session(path, threads=1)
        y = torch.from_numpy(session.run(None, {"x": case.x_test.float().numpy()})[0]).to(F64)
        with torch.no_grad():
            vs_original = relative_difference(case.net(case.x_test), y)
        out["models"][side] = {"params": model.num_params(), "flops": model.flops(), "widths": model.widths,
                               "parity": record["max_rel_diff"], "vs_original": vs_original, "bytes": record["bytes"],
                               "accuracy": float((y.argmax(1) == case.y_test).double().mean())}
        sessions[side] = session
    for b in (1, 64):
        x = case.x_test[:b].float().numpy()
        out["times"][b] = {side: float(np.median(t)) for side, t in time_alternating(sessions, x, warmup, runs).items()}
    return out


# --- printing --------------------------------------------------------------------------------------------------------
def arrow(widths) -> str:
    return "→".join(map(str, widths))


def print_rows(rows: list[dict], original: isocompress.IsoMLP) -> None:
    for r in rows:
        print(f"   {r['method']:<40} {r['params']:>7,} {100 * r['params'] / original.num_params():>6.2f}%"
              f" {r['flops']:>9,} {100 * r['flops'] / original.flops():>6.2f}%  {100 * r['accuracy']:>6.2f}"
              f"  {100 * r['change']:>7.1f}  {r['seconds']:>6.1f}  {arrow(r['widths'])}")


def verdict(ours: dict, theirs: list[dict]) -> str:
    best = max(theirs, key=lambda r: r["accuracy"])
    gap = 100 * (ours["accuracy"] - best["accuracy"])
    return f"{'met' if gap >= 0 else 'MISSED'} ({gap:+.2f} pt against the best TP row, {best['method']})"


def print_comparison(case: Case, results: list[tuple], recipe: FineTune, full_train: bool) -> list[bool]:
    original, met = case.model, []
    print(f"## {case.name}: input {'×'.join(map(str, original.input_shape))}, channels {arrow(original.widths)}, "
          f"{original.num_params():,} parameters, {original.flops():,} FLOPs, test accuracy "
          f"{100 * accuracy(case.net, case.x_test, case.y_test):.2f}% ({len(case.y_test)} samples)")
    print(f"   TP fine-tuning recipe: {recipe.describe('the 256 labelled calibration samples (calib)')}"
          + ("; (train): the same on the whole training set" if full_train else ""))
    print("   acc: test accuracy; Δy %: mean over the test set of |y' − y| / |y| against the original's logits")
    print(f"   {'method':<40} {'params':>7} {'':>7} {'FLOPs':>9} {'':>7}  {'acc %':>6}  {'Δy %':>7}  {'s':>6}"
          "  channels")
    for budget, free, aware in results:
        print(f"   -- budget {budget:.0%}, without data: isocompress ≥ TP magnitude/L1 without fine-tuning? "
              + verdict(free[0], free[1:]))
        print_rows(free, original)
        same_data = [r for r in aware[1:] if "(train)" not in r["method"]]
        print(f"   -- budget {budget:.0%}, with calibration data: isocompress ≥ TP with fine-tuning (same data)? "
              + verdict(aware[0], same_data))
        print_rows(aware, original)
        met += [free[0]["accuracy"] >= max(r["accuracy"] for r in free[1:]),
                aware[0]["accuracy"] >= max(r["accuracy"] for r in same_data)]
    return met


def print_onnx(name: str, result: dict) -> None:
    models, times = result["models"], result["times"]
    print(f"## {name}: ONNX (isocompress export, float32), single-threaded onnxruntime; parity = max |Δy| / max |y| vs"
          f" the float64 torch forward of the same model (tolerance {ONNX_RTOL:g}); vs original = the same against the"
          " original torch module, on the test inputs")
    print(f"   {'model':<9} {'params':>7} {'FLOPs':>9} {'FLOPs ratio':>11} {'bytes':>7} {'parity':>9} "
          f"{'vs original':>11} {'acc %':>6}  {'b=1 µs':>8} {'ratio':>6}  {'b=64 µs':>8} {'ratio':>6}  channels")
    base = models["original"]
    for side, m in models.items():
        t1, t64 = times[1][side], times[64][side]
        print(f"   {side:<9} {m['params']:>7,} {m['flops']:>9,} {m['flops'] / base['flops']:>11.3f} {m['bytes']:>7,}"
              f" {m['parity']:>9.2e} {m['vs_original']:>11.2e} {100 * m['accuracy']:>6.2f}  {t1:>8.1f}"
              f" {t1 / times[1]['original']:>6.3f}  {t64:>8.1f} {t64 / times[64]['original']:>6.3f}"
              f"  {arrow(m['widths'])}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="budget 10%%, short fine-tuning, fewer timed calls")
    parser.add_argument("--models", default=str(ROOT / "models"), help="directory of the shipped models [models]")
    parser.add_argument("--names", default=",".join(SHIPPED), help=f"comma-separated [{','.join(SHIPPED)}]")
    parser.add_argument("--budgets", default=None, help="comma-separated fractions [0.5,0.2,0.1,0.05; 0.1 quick]")
    parser.add_argument("--epochs", default=None, help="fine-tuning epochs: per step,final [20,60; 3,9 quick]")
    parser.add_argument("--lrs", default=None, help="fine-tuning learning rates tried [0.003,0.01; 0.01 quick]")
    parser.add_argument("--full-train", action="store_true", help="also TP fine-tuned on the whole training set")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up calls per model and batch [200; 20 quick]")
    parser.add_argument("--runs", type=int, default=None, help="timed calls per model and batch [500; 100 quick]")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/bench_cnn.py", *(argv or sys.argv[1:])])
    budgets = [float(b) for b in (args.budgets or ("0.1" if args.quick else "0.5,0.2,0.1,0.05")).split(",")]
    per_step, final = (int(e) for e in (args.epochs or ("3,9" if args.quick else "20,60")).split(","))
    lrs = tuple(float(lr) for lr in (args.lrs or ("0.01" if args.quick else "0.003,0.01")).split(","))
    recipe = FineTune(per_step, final, lrs)
    search = (2, 10) if args.quick else (8, 20)
    warmup, runs = args.warmup or (20 if args.quick else 200), args.runs or (100 if args.quick else 500)
    torch.set_num_threads(1)
    import onnxruntime

    load_start, started, met = load_average(), time.perf_counter(), []
    print(f"# torch {torch.__version__}, torch-pruning {tp.__version__}, onnxruntime {onnxruntime.__version__};"
          f" {cpu_name()}; torch and onnxruntime single-threaded")
    for name in args.names.split(","):
        case = load_case(name, Path(args.models))
        results = compare_budgets(case, budgets, recipe, search, args.full_train)
        met += print_comparison(case, results, recipe, args.full_train)
        with tempfile.TemporaryDirectory() as tmp:
            print_onnx(name, onnx_case(case, results, Path(tmp), warmup, runs))
    print(f"# targets met: {sum(met)} of {len(met)} (isocompress ≥ the best Torch-Pruning row at the same parameters)")
    print(f"# load average (1/5/15 min) at start {load_start}, at end {load_average()};"
          f" {time.perf_counter() - started:.0f} s in all")
    print(f"reproduce: {command}")


if __name__ == "__main__":
    main()
