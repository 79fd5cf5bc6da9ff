"""Pruning to a parameter budget: isocompress against what a user would otherwise do at the same budget.

Baselines (no fine-tuning for any method; isocompress does none either):
  svd        truncated-SVD low-rank factorisation of every weight matrix (one rank fraction for all layers)
  magnitude  delete neurons in the original basis by |incoming row| · |outgoing column| (same fraction per layer)
  spectral   the spectral structural-importance criterion (shared/seeds/spectral-structural-pruning-review.txt):
             per hidden layer, graphs over neurons from |correlation| of pre- and post-activations, score = share of
             each neuron in the dominant generalised eigenvectors of (L_in, L_out); delete the lowest, recompute, repeat
Each method's parameter count is that of its own stored form. Errors are measured on the held-out test set.

Needs scipy: pip install -e ".[bench]" (the [test] extra has it too).
Run: python benchmarks/bench_prune.py [--model models/digits.pt] [--budgets 0.5,0.2,0.1,0.05]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import scipy.linalg  # pip install -e ".[bench]" (or ".[test]")
import torch

from isocompress import bounds, io, prune
from isocompress.api import ShrinkOptions
from isocompress.model import IsoMLP, Layer
from isocompress.primitives import isotropic_tanh

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


def fit_spectral(model, calib, target):
    """Bisection on the keep fraction with the cheap magnitude count (same widths), then one spectral run."""
    probe = fit_fraction(lambda f: magnitude(model, f, calib), target)
    fraction = (probe.widths[1]) / model.widths[1]
    return spectral(model, fraction, calib)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/digits.pt")
    parser.add_argument("--budgets", default="0.5,0.2,0.1,0.05")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    budgets = [float(b) for b in args.budgets.split(",")]
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
    print(f"reproduce: python benchmarks/bench_prune.py --model {args.model} --budgets {args.budgets}")


if __name__ == "__main__":
    main()
