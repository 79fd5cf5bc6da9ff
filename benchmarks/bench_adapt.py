"""Carried versus reset optimiser state across live restructuring (issue 14), and the second-moment approximation.

    python benchmarks/bench_adapt.py              # 5 seeds, 300 steps before each change (≈ 1 minute)
    python benchmarks/bench_adapt.py --seeds 2 --steps 100 --json

Data: scikit-learn digits, the split of scripts/train_models.py. Network 64→32→32→32→10 (psi, trainable o),
batch 64. For each optimiser (SGD lr 0.05 momentum 0.9, Adam lr 1e-3, AdamW lr 1e-3 wd 1e-2) and seed it trains
`--steps` steps, then restructures one copy in each of three ways — grow every hidden space by 16, degenerate the 8
weakest directions of every hidden space, rotate every hidden space to its layer's left singular basis — and trains
50 more steps on the same batches with (a) the optimiser state carried through the change by isocompress.train.adapt and
(b) a freshly created optimiser. It prints the mean training loss over those 50 steps (and the unrestructured run's).

Part 2 measures the diagonal rule v → (P∘P)ᵀv for Adam's exp_avg_sq on hidden space 1 against the exact second moment
of the mapped gradients, Σ_t (1−β2)β2^(T−t) (Pᵀg_t)², computed from the recorded gradient history: relative Frobenius
error, and the mean loss of the next 50 steps with the exact, the diagonal and an unrotated (kept/sliced) v.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from train_models import load_digits_split  # noqa: E402

from isocompress.train import adapt  # noqa: E402
from isocompress.train.nn import IsotropicMLP  # noqa: E402

F64 = torch.float64
WIDTHS = (64, 32, 32, 32, 10)
AFTER = 50
OPTIMISERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-3),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2),
}


def batches(n_data: int, steps: int, seed: int, size: int = 64) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    while len(out) < steps:
        out.extend(torch.randperm(n_data, generator=gen).split(size))
    return out[:steps]


def train(net, opt, x, y, order, record=None) -> list[float]:
    losses = []
    for idx in order:
        loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        if record is not None:
            record.append({key: p.grad.detach().to(F64).clone() for key, p in record_params(net).items()})
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def record_params(net) -> dict:
    """The parameters a change of hidden space 1 maps: rows of layer 1, columns of layer 2."""
    return {"w1": net.layers[1].weight, "b1": net.layers[1].bias, "p1": net.layers[1].psi, "w2": net.layers[2].weight}


def restructure(net, opt, scenario: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for i in range(len(net.layers) - 1):
        if scenario == "grow":
            net.grow(i, 16, opt, scale=1e-3, generator=gen)
        elif scenario == "degenerate":
            net.degenerate(i, 8, opt)
        else:
            net.diagonalise(i, opt)


def part_carried_vs_reset(x, y, seeds: int, steps: int) -> list[dict]:
    rows = []
    for name, make in OPTIMISERS.items():
        for seed in range(seeds):
            torch.manual_seed(seed)
            net = IsotropicMLP(WIDTHS, psi=True, intrinsic_length="trainable", seed=seed)
            opt = make(net.parameters())
            order = batches(len(x), steps + AFTER, seed)
            train(net, opt, x, y, order[:steps])
            net_none, opt_none = copy.deepcopy((net, opt))
            none = sum(train(net_none, opt_none, x, y, order[steps:])) / AFTER
            for scenario in ("grow", "degenerate", "rotate"):
                results = {}
                for variant in ("carried", "reset"):
                    n, o = copy.deepcopy((net, opt))
                    restructure(n, o if variant == "carried" else None, scenario, seed)
                    if variant == "reset":
                        o = make(n.parameters())
                    results[variant] = sum(train(n, o, x, y, order[steps:])) / AFTER
                rows.append({"optimiser": name, "scenario": scenario, "seed": seed, "unchanged": none, **results})
    return rows


def exact_second_moment(history: list[dict], key: str, p: torch.Tensor, beta2: float) -> torch.Tensor:
    total = len(history)
    mapped = (lambda g: g @ p) if key == "w2" else (lambda g: (p.T @ g.reshape(g.shape[0], -1)).reshape(
        (p.shape[1],) + tuple(g.shape[1:])))
    return sum((1 - beta2) * beta2 ** (total - 1 - t) * mapped(h[key]) ** 2 for t, h in enumerate(history))


def part_second_moment(x, y, seeds: int, steps: int) -> list[dict]:
    rows = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        net = IsotropicMLP(WIDTHS, psi=True, intrinsic_length="trainable", seed=seed)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        beta2 = opt.param_groups[0]["betas"][1]
        order = batches(len(x), steps + AFTER, seed)
        history: list[dict] = []
        train(net, opt, x, y, order[:steps], record=history)
        check = exact_second_moment(history, "w1", torch.eye(32, dtype=F64), beta2)
        assert torch.allclose(check, opt.state[net.layers[1].weight]["exp_avg_sq"].to(F64), rtol=1e-4, atol=1e-12)
        u, _ = adapt.strengths(net, 1)
        haar = torch.linalg.qr(torch.randn(32, 32, dtype=F64, generator=torch.Generator().manual_seed(seed)))[0]
        bases = (("singular basis (diagonalise)", u), ("degenerate 8 (adapt.kept_basis)", adapt.kept_basis(u, 24)),
                 ("random rotation", haar))
        for basis_name, p in bases:
            rows.append(measure_basis(net, opt, history, p, basis_name, seed, beta2, x, y, order[steps:]))
    return rows


def measure_basis(net, opt, history, p, basis_name, seed, beta2, x, y, order) -> dict:
    r = p.shape[1]
    exact = {}
    variants = {}
    for variant in ("diagonal", "exact", "unrotated"):
        n, o = copy.deepcopy((net, opt))
        old_v = {k: o.state[t]["exp_avg_sq"].to(F64).clone() for k, t in record_params(n).items()}
        adapt.map_hidden(n, 1, p, o)
        params = record_params(n)
        for key, t in params.items():
            exact[key] = exact_second_moment(history, key, p, beta2)
            if variant == "exact":
                o.state[t]["exp_avg_sq"] = exact[key].to(t.dtype)
            elif variant == "unrotated":  # v as if the basis were the identity: kept, sliced to r coordinates
                o.state[t]["exp_avg_sq"] = (old_v[key][:, :r] if key == "w2" else old_v[key][:r]).to(t.dtype)
        got = torch.cat([o.state[t]["exp_avg_sq"].to(F64).flatten() for t in params.values()])
        want = torch.cat([exact[k].flatten() for k in params])
        variants[variant] = {"rel_error": float(torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want)),
                             "loss_after": sum(train(n, o, x, y, order)) / AFTER}
    return {"seed": seed, "basis": basis_name, **{f"{v}_{k}": d[k] for v, d in variants.items() for k in d}}


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=300, help="training steps before the change")
    parser.add_argument("--json", action="store_true", help="print the measurements as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    x_train, y_train, _, _ = load_digits_split()
    x, y = torch.from_numpy(x_train), torch.from_numpy(y_train)
    rows = part_carried_vs_reset(x, y, args.seeds, args.steps)
    moments = part_second_moment(x, y, args.seeds, args.steps)
    if args.json:
        print(json.dumps({"carried_vs_reset": rows, "second_moment": moments}, indent=2))
        return
    print(f"# python benchmarks/bench_adapt.py --seeds {args.seeds} --steps {args.steps}")
    print(f"mean training loss over the {AFTER} steps after the change (mean over {args.seeds} seeds)")
    print(f"{'optimiser':9} {'change':11} {'carried':>8} {'reset':>8} {'reset/carried':>13} {'carried wins':>12}"
          f" {'unchanged':>9}")
    for name in OPTIMISERS:
        for scenario in ("grow", "degenerate", "rotate"):
            sel = [r for r in rows if r["optimiser"] == name and r["scenario"] == scenario]
            carried, reset = mean(r["carried"] for r in sel), mean(r["reset"] for r in sel)
            wins = sum(r["carried"] < r["reset"] for r in sel)
            print(f"{name:9} {scenario:11} {carried:8.4f} {reset:8.4f} {reset / carried:13.2f} "
                  f"{wins:>7}/{len(sel):<4} {mean(r['unchanged'] for r in sel):9.4f}")
    print("\nAdam exp_avg_sq on hidden space 1: relative error against the exact mapped second moment; "
          f"mean loss over the next {AFTER} steps")
    print(f"{'basis':40} {'diagonal err':>12} {'unrotated err':>13} {'loss exact':>10} {'loss diag':>9}"
          f" {'loss unrot':>10}")
    for basis in dict.fromkeys(r["basis"] for r in moments):
        sel = [r for r in moments if r["basis"] == basis]
        print(f"{basis:40} {mean(r['diagonal_rel_error'] for r in sel):12.3f} "
              f"{mean(r['unrotated_rel_error'] for r in sel):13.3f} {mean(r['exact_loss_after'] for r in sel):10.4f} "
              f"{mean(r['diagonal_loss_after'] for r in sel):9.4f} {mean(r['unrotated_loss_after'] for r in sel):10.4f}")


if __name__ == "__main__":
    main()
