"""Pruning to a parameter budget: isocompress against what a user would otherwise do at the same budget.

Baselines (no fine-tuning for any method; isocompress does none either):
  svd        truncated-SVD low-rank factorisation of every weight matrix (one rank fraction for all layers)
  magnitude  delete neurons in the original basis by |incoming row| · |outgoing column| (same fraction per layer)
  spectral   the spectral structural-importance criterion (shared/seeds/spectral-structural-pruning-review.txt):
             per hidden layer, graphs over neurons from |correlation| of pre- and post-activations, score = share of
             each neuron in the dominant generalised eigenvectors of (L_in, L_out); delete the lowest, recompute, repeat
  paper rule the paper's data-free neurodegeneration (the reference code's `neurodegenerate`, applied globally):
             remove, one at a time, the direction with the globally smallest singular value (left-singular basis of
             its producing layer), its constant b* = the rotated bias absorbed into o and psi
Each method's parameter count is that of its own stored form. Errors are measured on the held-out test set.

Needs scipy: pip install -e ".[bench]" (the [test] extra has it too).
Run: python benchmarks/bench_prune.py [--model models/digits.pt] [--budgets 0.5,0.2,0.1,0.05]
     python benchmarks/bench_prune.py --nodata        # issue 10: no-data budgets vs the paper's rule
     python benchmarks/bench_prune.py --nodata --seeds 5   # ... and more training seeds of the psi checkpoints
     python benchmarks/bench_prune.py --local         # issue 10: local certificates (fraction, tightness, speed)
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import scipy.linalg  # pip install -e ".[bench]" (or ".[test]")
import torch

from isocompress.api.shrink import ShrinkOptions
from isocompress.bounds import certified as bounds
from isocompress.core.model import IsoMLP, Layer
from isocompress.core.primitives import isotropic_tanh
from isocompress.formats import io
from isocompress.prune import budget as prune

F64 = torch.float64


# --- baselines ----------------------------------------------------------------------------------------------------
class LowRank(torch.nn.Module):
    """The network with every weight matrix replaced by its rank-k truncation, stored as two factors."""

    def __init__(self, model: IsoMLP, fraction: float):
        super().__init__()
        self.layers, self.factors, self.params = model.layers, [], 0
        for layer in self.layers:
            w = layer.dense_weight()
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            k = max(1, round(fraction * s.numel()))
            factored = k * (w.shape[0] + w.shape[1]) < w.numel()
            self.factors.append((u[:, :k] * s[:k], vh[:k]) if factored else (w, None))
            self.params += layer.num_params() - w.numel() + (k * sum(w.shape) if factored else w.numel())

    def forward(self, x):
        h, g = x, None
        for layer, (a, b) in zip(self.layers, self.factors):
            z = (h @ b.T if b is not None else h) @ a.T + layer.bias
            if layer.psi is not None:
                z = z + layer.psi * g
            if layer.is_output:
                return z
            h, g = isotropic_tanh(z, layer.o)


def delete_neurons(model: IsoMLP, keep: list[torch.Tensor]) -> IsoMLP:
    """Delete every hidden neuron not in keep[i] (rows of layer i, columns of layer i+1)."""
    layers = [layer.as_dense() for layer in model.layers]
    out = []
    for l, layer in enumerate(layers):
        rows = keep[l] if l < len(keep) else torch.arange(layer.n_out)
        cols = keep[l - 1] if l > 0 else torch.arange(layer.n_in)
        out.append(Layer(weight=layer.weight[rows][:, cols], bias=layer.bias[rows], n_in=int(cols.numel()),
                         psi=None if layer.psi is None else layer.psi[rows], o=layer.o))
    return IsoMLP(out)


def magnitude(model: IsoMLP, fraction: float, x) -> IsoMLP:
    layers = [layer.as_dense() for layer in model.layers]
    keep = []
    for i in range(len(layers) - 1):
        score = layers[i].weight.norm(dim=1) * layers[i + 1].weight.norm(dim=0)
        k = max(1, round(fraction * score.numel()))
        keep.append(score.argsort(descending=True)[:k].sort().values)
    return delete_neurons(model, keep)


def spectral_scores(z: torch.Tensor, h: torch.Tensor, top: int = 8) -> torch.Tensor:
    def laplacian(a):
        c = np.abs(np.nan_to_num(np.corrcoef(a.T.numpy())))
        np.fill_diagonal(c, 0.0)
        return np.diag(c.sum(1)) - c

    l_in, l_out = laplacian(z), laplacian(h)
    n = l_in.shape[0]
    vals, vecs = scipy.linalg.eigh(l_in, l_out + 1e-6 * np.eye(n))
    k = min(top, n)
    vals, vecs = vals[-k:], vecs[:, -k:]
    vecs = vecs / np.linalg.norm(vecs, axis=0, keepdims=True)
    return torch.from_numpy((np.abs(vals) * vecs**2).sum(1))


def spectral(model: IsoMLP, fraction: float, x, batch_share: float = 0.2) -> IsoMLP:
    """Iterative: per hidden layer, delete the lowest-scoring neurons in batches, rescoring after each batch."""
    keep = [torch.arange(n) for n in model.widths[1:-1]]
    for i in range(len(keep)):
        target = max(1, round(fraction * keep[i].numel()))
        while keep[i].numel() > target:
            with torch.no_grad():
                _, zs, gs = delete_neurons(model, keep).forward_with_hidden(x)
            scores = spectral_scores(zs[i], gs[i] * zs[i])
            drop = max(1, int(batch_share * (keep[i].numel() - target)))
            kept_local = scores.argsort(descending=True)[: keep[i].numel() - drop].sort().values
            keep[i] = keep[i][kept_local]
    return delete_neurons(model, keep)


def fit_fraction(build, budget: int):
    """The largest keep fraction (bisection) whose model has ≤ budget parameters."""
    lo, hi = 0.0, 1.0
    best = build(lo)
    for _ in range(14):
        mid = (lo + hi) / 2
        candidate = build(mid)
        if count(candidate) <= budget:
            lo, best = mid, candidate
        else:
            hi = mid
    return best


def count(model) -> int:
    return model.params if isinstance(model, LowRank) else model.num_params()


# --- measuring ----------------------------------------------------------------------------------------------------
def measure(original, candidate, x, y_true) -> dict:
    with torch.no_grad():
        out = bounds.empirical_errors(original(x), candidate(x), y_true)
    out["params"] = count(candidate)
    return out


def load(model_path: Path):
    stem = model_path.with_suffix("")
    need = [model_path, Path(f"{stem}.calib.npy"), Path(f"{stem}.calib.labels.npy"), Path(f"{stem}.test.npz")]
    missing = [str(p) for p in need if not p.exists()]
    if missing:
        sys.exit(f"bench_prune: missing {', '.join(missing)}; train the shipped models first")
    test = np.load(need[3])
    calib = torch.from_numpy(np.load(need[1])).to(F64)
    return (io.load(model_path), calib, torch.from_numpy(np.load(need[2])),
            torch.from_numpy(test["x"]).to(F64), torch.from_numpy(test["y"]))


def run(model_path: Path, budgets: list[float]) -> list[tuple]:
    model, calib, calib_labels, x_test, y_test = load(model_path)
    rows = []
    for budget in budgets:
        target = int(budget * model.num_params())
        for basis in ("data-aware", "data-free"):
            started = time.perf_counter()
            pruned, report = prune.prune_to_budget(model, ShrinkOptions(budget=budget, basis=basis), calibration=calib,
                                                   labels=calib_labels, search_restarts=8, search_steps=20)
            rows.append((budget, f"isocompress {basis}", measure(model, pruned, x_test, y_test),
                         time.perf_counter() - started, report["certified"]["max_abs"]))
        for name, build in (("truncated SVD", lambda f: LowRank(model, f)),
                            ("magnitude", lambda f: magnitude(model, f, calib)),
                            ("spectral", lambda f: spectral(model, f, calib))):
            started = time.perf_counter()
            candidate = fit_fraction(build, target) if name != "spectral" else fit_spectral(model, calib, target)
            rows.append((budget, name, measure(model, candidate, x_test, y_test), time.perf_counter() - started, None))
    return rows


def paper_rule(model: IsoMLP, target: int) -> IsoMLP:
    """The paper's data-free rule (see the module docstring), on isocompress's embedded State; one SVD per step."""
    from isocompress.exact.constants import remove_all_constant_directions
    from isocompress.exact.shrink import alternate_diagonalise

    state = prune.State.of(remove_all_constant_directions(model.cast(F64)))
    while prune.current_params(state) > target:
        prune.rotate_singular(state)
        compact = prune.materialize(state)
        best = None
        for i in range(len(state.removed)):
            sigma = torch.linalg.vector_norm(compact.layers[i].weight, dim=1)  # rows are σ_j v_jᵀ
            if sigma.numel() > 1 and (best is None or float(sigma.min()) < best[0]):
                best = (float(sigma.min()), i, int(sigma.argmin()))
        if best is None:
            break
        consts = [layer.bias.clone() for layer in compact.layers[:-1]]  # b*: the rotated bias
        prune.remove(state, [(best[1], best[2], best[0])], consts)
    return alternate_diagonalise(prune.materialize(state))


def test_accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).double().mean())


REFERENCE_LAYOUTS = (("ref-psi", (64, 128, 128, 10), True, "trainable"),
                     ("ref-plain", (64, 96, 96, 96, 10), False, "none"),
                     ("ref-psi3", (64, 96, 96, 96, 10), True, "trainable"))  # --seeds > 1 only


def reference_layout_models(out_dir: Path, seeds: int = 1) -> list[Path]:
    """Small digits classifiers trained with the reference code's parametrisation (trainable psi and o; plain) and
    saved in the reference IsotropicTanhMLP state-dict layout (weight_parameters.N, bias_parameters.N,
    psi_parameters.N, activation.N.o_const), read back through isocompress.formats.io's reference loader. seeds > 1: also
    seeds 1 … seeds−1 of the checkpoints with psi, and a three-hidden-layer one with psi (ref-psi3, seeds 0 …)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=1, stratify=y)
    xtr, ytr = torch.from_numpy(xtr), torch.from_numpy(ytr.astype(np.int64))
    paths = []
    for seed in range(seeds):
        for name, widths, psi, o in REFERENCE_LAYOUTS:
            if (seed > 0 and not psi) or (name == "ref-psi3" and seeds == 1):
                continue
            model = train_reference(widths, psi, o, seed, xtr, ytr)
            path = out_dir / (f"{name}.pt" if seed == 0 else f"{name}-s{seed}.pt")
            torch.save(io.reference_state_dict(model), path)
            np.savez(path.with_suffix(".test.npz"), x=xte, y=yte.astype(np.int64))
            np.save(path.with_suffix(".calib.npy"), xtr[:256].numpy().astype(np.float64))  # --local certifies around
            np.save(path.with_suffix(".calib.labels.npy"), ytr[:256].numpy())
            paths.append(path)
    return paths


def train_reference(widths, psi: bool, o: str, seed: int, xtr, ytr) -> IsoMLP:
    """40 epochs of Adam (lr 2e-3, weight decay 1e-4, batches of 64) from the reference initialisation with `seed`."""
    from isocompress.train.nn import IsotropicMLP

    torch.manual_seed(seed)
    net = IsotropicMLP(widths, psi=psi, intrinsic_length=o, seed=seed)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3, weight_decay=1e-4)
    for epoch in range(40):
        order = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(epoch + 1000 * seed))
        for batch in order.split(64):
            loss = torch.nn.functional.cross_entropy(net(xtr[batch]), ytr[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.to_isomlp()


def run_nodata(model_paths: list[Path], budgets: list[float]) -> list[tuple]:
    """No calibration, no --input-radius: isocompress's data-free ranking against the paper's rule, at the same or
    fewer parameters (isocompress is run at the parameter count the paper's rule reached)."""
    rows = []
    for path in model_paths:
        model = io.load(path)
        test = np.load(path.with_suffix("").as_posix() + ".test.npz")
        x, y = torch.from_numpy(test["x"]).to(F64), torch.from_numpy(test["y"])
        for budget in budgets:
            started = time.perf_counter()
            paper = paper_rule(model, int(budget * model.num_params()))
            t_paper = time.perf_counter() - started
            started = time.perf_counter()
            ours, _ = prune.prune_to_budget(model, ShrinkOptions(budget=float(paper.num_params())))
            t_ours = time.perf_counter() - started
            rows.append((path.name, budget, paper.num_params(), test_accuracy(paper, x, y), t_paper,
                         ours.num_params(), test_accuracy(ours, x, y), t_ours, ours.widths, test_accuracy(model, x, y)))
    return rows


def print_nodata(rows, command: str) -> None:
    print("no-data budgets (no calibration, no --input-radius): test accuracy at the same or fewer parameters")
    print(f"{'model':<12} {'budget':>6}  {'orig %':>6}  {'paper params':>12} {'paper %':>7}  {'iso params':>10} "
          f"{'iso %':>6}  {'Δ pt':>6}  widths")
    worst = math.inf
    for name, budget, pp, pa, _, op, oa, _, widths, orig in rows:
        worst = min(worst, 100 * (oa - pa))
        print(f"{name:<12} {budget:>6.0%}  {100 * orig:>6.2f}  {pp:>12} {100 * pa:>7.2f}  {op:>10} {100 * oa:>6.2f}  "
              f"{100 * (oa - pa):>+6.2f}  {'→'.join(map(str, widths))}")
    mean = sum(100 * (r[6] - r[3]) for r in rows) / len(rows)
    print(f"smallest difference isocompress − paper rule: {worst:+.2f} pt (goal ≥ −0.5); mean {mean:+.2f} pt")
    print(f"reproduce: {command}")


def run_local(model_paths: list[Path], budgets: list[float], fractions: list[float], n_points: int,
              repeats: int) -> dict:
    """Local certificates with calibration, per model, budget and ε (a share of the median input norm): the three-way
    verdict at the default effort (certified by the ball bound, by the refinement, refuted, undecided), β against the
    largest |Δy| an attack finds, violations; and per effort the speed of a 512-point run with certificates against
    the same run less its local-certificate time."""
    from isocompress.exact.constants import remove_all_constant_directions

    out = {"rows": [], "speed": []}
    for path in model_paths:
        model, calib, labels, x_test, _ = load(path)
        points = calib[:n_points]
        median = float(calib.norm(dim=-1).median())
        for budget in budgets:
            state = prune.State.of(remove_all_constant_directions(model.cast(F64)))
            state = prune.prune_to_target(state, int(budget * model.num_params()), "data-aware", calib,
                                          float(calib.norm(dim=-1).max()))
            pruned = prune.materialize(state)
            for fraction in fractions:
                out["rows"].append(local_row(path.stem, state, model, pruned, points, median, budget, fraction))
        out["speed"].extend(local_speed(path, model, calib, labels, x_test, repeats))
    return out


def local_row(name, state, model, pruned, points, median, budget, fraction) -> dict:
    """One line of the table: prune.local_report at the default effort (its piece budget, no time cap)."""
    from isocompress.bounds import local as local_bounds

    eps = fraction * median
    started = time.perf_counter()
    rep = prune.local_report(state, points, eps, "bench", "calibration data", networks=(model.cast(F64), pruned))
    seconds = time.perf_counter() - started
    found = local_bounds.local_search(IsoMLP(state.layers), pruned, points, eps, starts=8, steps=40)
    bound = torch.tensor(rep["bounds"], dtype=F64)
    certified = torch.tensor(rep["top1_certified"])
    n = len(points)
    newly = rep["refinement"]["certified_by_refinement"]
    seen = found["max_abs"] > 1e-12  # the balls where the networks differ at all (a budget at the exact rank: none)
    return {"model": name, "budget": budget, "fraction": fraction, "eps": eps, "n": n,
            "certified": rep["certified_top1"], "ball": (rep["n_certified"] - newly) / n,
            "refuted": rep["refuted_fraction"], "undecided": rep["undecided_fraction"],
            "ratio": float((bound / found["max_abs"])[seen].median()) if bool(seen.any()) else math.nan,
            "violations": int((found["max_abs"] > bound).sum()) + int((certified & found["flipped"]).sum()),
            "pieces": rep["refinement"]["pieces"], "seconds": seconds}


def local_speed(path, model, calib, labels, x_test, repeats: int) -> list[dict]:
    """Per effort: the shrink call (5% budget, calibration) with certificates on 512 points (calibration + test
    inputs), best of `repeats`, against the same run less its local-certificate time (prune_to_budget always
    certifies around calibration data, so a run "without" is timed as the rest of the same run)."""
    points = torch.cat([calib, x_test])[:512]
    rows = []
    for effort in ("fast", "normal", "thorough"):
        best = None
        for _ in range(repeats):
            started = time.perf_counter()
            _, report = prune.prune_to_budget(model, ShrinkOptions(budget=0.05, certify_effort=effort),
                                              calibration=calib, labels=labels, certify_data=points)
            total = time.perf_counter() - started
            if best is None or total < best["all"]:
                local = report["local"]
                best = {"model": path.stem, "effort": effort, "all": total, "local": local["seconds"],
                        "n": len(points), "certified": local["certified_top1"],
                        "undecided": local["undecided_fraction"], "pieces": local["refinement"]["pieces"]}
        rows.append(best)
    return rows


def print_local(result: dict, command: str) -> None:
    from isocompress.bounds import branch
    from isocompress.bounds import local as local_bounds

    effort = branch.EFFORTS[branch.DEFAULT_EFFORT]
    print(f"local certificates with calibration (data-aware basis), effort {effort.name} ({effort.directions} split"
          f" direction(s), ≤ {effort.pieces_per_point:g} piece bounds per point, no time cap here); refuted: a verified"
          f" counterexample (disagreement search {effort.search_starts} starts × {effort.search_steps} steps +"
          f" {local_bounds.BISECT_STEPS} bisections on the points not certified); ceiling = 100 − refuted;"
          " β/worst: median of β_i / the largest |Δy| an attack (8 starts × 40 steps) finds in the ball (over the"
          " balls where it finds |Δy| > 1e-12; nan: the pruned network equals the original there);"
          " violations: a search above β or a certified point flipped")
    print(f"{'model':<12} {'budget':>6}  {'ε/median':>8}  {'points':>6}  {'certified %':>11}  {'(ball only)':>11}  "
          f"{'refuted %':>9}  {'undecided %':>11}  {'of ceiling %':>12}  {'β/worst':>8}  {'pieces':>6}  "
          f"{'s':>6}  {'violations':>10}")
    for r in result["rows"]:
        ceiling = 1.0 - r["refuted"]
        share = 100 * r["certified"] / ceiling if ceiling > 0 else float("nan")
        print(f"{r['model']:<12} {r['budget']:>6.0%}  {r['fraction']:>8.1%}  {r['n']:>6}  {100 * r['certified']:>11.1f}  "
              f"{100 * r['ball']:>11.1f}  {100 * r['refuted']:>9.1f}  {100 * r['undecided']:>11.1f}  {share:>12.1f}  "
              f"{r['ratio']:>8.3g}  {r['pieces']:>6}  {r['seconds']:>6.1f}  {r['violations']:>10}")
    print("speed (5% budget, calibration, certify data: 512 points): a run with certificates / the same run less its"
          " local-certificate time (goal for normal: ≤ 3)")
    for t in result["speed"]:
        print(f"  {t['model']:<12} {t['effort']:<9} {t['all']:7.2f} s in all, {t['local']:6.2f} s certificates"
              f" ({t['pieces']} piece bounds): ratio {t['all'] / max(t['all'] - t['local'], 1e-9):5.2f};"
              f" certified {100 * t['certified']:.1f}%, undecided {100 * t['undecided']:.1f}% at the default ε")
    print(f"reproduce: {command}")


def fit_spectral(model, calib, target):
    """Bisection on the keep fraction with the cheap magnitude count (same widths), then one spectral run."""
    probe = fit_fraction(lambda f: magnitude(model, f, calib), target)
    fraction = (probe.widths[1]) / model.widths[1]
    return spectral(model, fraction, calib)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="[default: models/digits.pt; --local: both shipped MLPs and a"
                        " reference-layout checkpoint]; --local takes a comma-separated list")
    parser.add_argument("--budgets", default=None)
    parser.add_argument("--nodata", action="store_true", help="issue 10: no-data budgets against the paper's rule")
    parser.add_argument("--local", action="store_true", help="issue 10: local certificates")
    parser.add_argument("--seeds", type=int, default=1, help="--nodata: training seeds of the reference-layout"
                        " checkpoints with psi (> 1 adds seeds 1 … N−1 and a three-hidden-layer one with psi)")
    parser.add_argument("--radii", default="0.01,0.02,0.03,0.07", help="--local: ε as fractions of the median norm")
    parser.add_argument("--quick", action="store_true", help="--local: 64 points per table line, speed best of 1")
    args = parser.parse_args(argv)
    args.model_given = args.model is not None
    args.model = args.model or "models/digits.pt"
    torch.set_num_threads(2)
    command = "python benchmarks/bench_prune.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.nodata:
        budgets = [float(b) for b in (args.budgets or "0.2,0.1,0.05,0.02,0.01").split(",")]
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            if args.seeds < 1:
                parser.error("--seeds must be at least 1")
            paths = [Path("models/digits.pt"), Path("models/mnist1d.pt")] + reference_layout_models(Path(tmp), args.seeds)
            print_nodata(run_nodata(paths, budgets), command)
        return
    if args.local:
        budgets = [float(b) for b in (args.budgets or "0.05,0.02").split(",")]
        radii = [float(r) for r in args.radii.split(",")]
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            paths = [Path(m) for m in args.model.split(",")] if args.model_given else \
                [Path("models/digits.pt"), Path("models/mnist1d.pt")] + reference_layout_models(Path(tmp), 1)[:1]
            print_local(run_local(paths, budgets, radii, 64 if args.quick else 256, 1 if args.quick else 3), command)
        return
    budgets = [float(b) for b in (args.budgets or "0.5,0.2,0.1,0.05").split(",")]
    rows = run(Path(args.model), budgets)
    original_acc = rows[0][2].get("accuracy_before", float("nan"))
    print(f"{args.model}: test-set errors at each parameter budget (original test accuracy {100 * original_acc:.2f}%)")
    print(f"{'budget':>6}  {'method':<24} {'params':>7}  {'max |Δy|':>9}  {'mean |Δy|':>9}  {'rel %':>8}  "
          f"{'acc %':>6}  {'top-1 %':>7}  {'certified':>9}  {'s':>5}")
    for budget, name, m, seconds, cert in rows:
        cert_text = f"{cert:9.3g}" if cert is not None else f"{'-':>9}"
        print(f"{budget:>6.0%}  {name:<24} {m['params']:>7}  {m['max_abs']:>9.3g}  {m['mean_abs']:>9.3g}  "
              f"{m['mean_rel_percent']:>8.3g}  {100 * m['accuracy_after']:>6.2f}  {100 * m['top1_agreement']:>7.2f}  "
              f"{cert_text}  {seconds:>5.1f}")
    print(f"reproduce: python benchmarks/bench_prune.py --model {args.model} --budgets {','.join(map(str, budgets))}")


if __name__ == "__main__":
    main()
