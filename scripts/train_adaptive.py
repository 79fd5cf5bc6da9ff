"""Adaptive-topology training (issue 14): digits and MNIST-1D from a narrow start, growing and pruning while training.

    python scripts/train_adaptive.py                    # both data sets, writes adaptive/ (models, PNG, JSON)
    python scripts/train_adaptive.py digits --out DIR   # one of them

Each run starts 16 wide in every hidden layer and trains with the fixed-width recipe of scripts/train_models.py (same
data split, Adam, weight decay, cosine schedule, batch size, seed), with an `isocompress.adapt.Neuroadaptation`
schedule that keeps a few scaffold directions per hidden layer: scaffolds are grown when the old ones have trained
into real directions, directions whose singular value decays below the threshold are degenerated (optimiser state is
carried through every change). At the end the remaining scaffold directions are degenerated. Writes DIR/M.pt
(shrinkable with `isocompress shrink DIR/M.pt`), DIR/adaptive.png (hidden widths and training loss against step) and
DIR/adaptive.json (what the run measured, with the fixed-width reference of docs/models.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_models import LOADERS, RECIPES, accuracy  # noqa: E402  (same data split and recipe)

from isocompress.adapt import Neuroadaptation  # noqa: E402
from isocompress.api import shrink_exact  # noqa: E402
from isocompress.io import atomic_path  # noqa: E402
from isocompress.nn import IsotropicMLP  # noqa: E402

OUT_DIR = Path(__file__).resolve().parent.parent / "adaptive"
# The shipped fixed-width models (docs/models.md), trained by scripts/train_models.py.
FIXED_REFERENCE = {"digits": {"params": 151_319, "accuracy": 0.9667}, "mnist1d": {"params": 144_653, "accuracy": 0.6470}}


@dataclass(frozen=True)
class Adaptive:
    start_width: int = 16
    every: int = 100  # steps between restructurings
    threshold: float = 0.1  # singular value below which a direction is scaffold
    scaffold: int = 4  # scaffold directions kept per hidden layer
    max_width: int = 256
    stop_fraction: float = 0.75  # no restructuring in the last quarter of training (the cosine tail)
    final_threshold: float = 1e-3  # the scaffold degenerated at the end
    scale: float = 1e-3  # outgoing weights of grown neurons
    measure: str = "directions"  # what counts as scaffold: weak singular directions, or weak neurons
    epochs: int | None = None  # None: the fixed-width recipe's


ADAPTIVE = {"digits": Adaptive(), "mnist1d": Adaptive()}


def train(name: str, settings: Adaptive, x, y, seed: int = 0, log=print):
    recipe = RECIPES[name]
    epochs = settings.epochs or recipe.epochs
    torch.manual_seed(seed)
    n_hidden = len(recipe.widths) - 2
    widths = (recipe.widths[0],) + (settings.start_width,) * n_hidden + (recipe.widths[-1],)
    net = IsotropicMLP(widths, psi=recipe.psi, intrinsic_length=recipe.intrinsic_length, seed=seed,
                       weight_scale=recipe.weight_scale)
    optimiser = torch.optim.Adam(net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    lr_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=epochs)
    steps_per_epoch = -(-len(x) // recipe.batch_size)
    adaptation = Neuroadaptation(net, optimiser, every=settings.every, threshold=settings.threshold,
                                 scaffold=settings.scaffold, max_width=settings.max_width, scale=settings.scale,
                                 measure=settings.measure,
                                 stop=int(settings.stop_fraction * epochs * steps_per_epoch), seed=seed, log=log)
    order = torch.Generator().manual_seed(seed)
    trace = {"step": [], "loss": [], "widths": []}
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=order).split(recipe.batch_size):
            loss = torch.nn.functional.cross_entropy(net(x[batch]), y[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            adaptation.step()
            trace["step"].append(adaptation.steps)
            trace["loss"].append(float(loss.detach()))
            trace["widths"].append(list(net.widths[1:-1]))
        lr_schedule.step()
    return net, optimiser, trace, adaptation.history


def finish(net, optimiser, settings: Adaptive, log=print) -> list:
    """Drop the remaining scaffold: degenerate every direction below the threshold."""
    final = net.neuroadapt(settings.final_threshold, 0, optimiser)
    for change in final:
        log(f"end: {change.describe()}")
    return final


def dense_params(widths) -> int:
    """Weights and biases of a dense network with these widths (psi and o not counted)."""
    return sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))


def build(name: str, out_dir: Path, settings: Adaptive, quiet: bool = False) -> dict:
    x_train, y_train, x_test, y_test = LOADERS[name]()
    log = (lambda message: None) if quiet else (lambda message: print(f"{name}: {message}", file=sys.stderr))
    x_test, y_test = torch.from_numpy(x_test), torch.from_numpy(y_test)
    start = time.perf_counter()
    net, optimiser, trace, history = train(name, settings, torch.from_numpy(x_train), torch.from_numpy(y_train),
                                           log=log)
    net.eval()
    before = {"widths": list(net.widths), "params": net.to_isomlp().num_params(),
              "test_accuracy": accuracy(net.to_isomlp().cast(torch.float32), x_test, y_test)}
    history = history + finish(net, optimiser, settings, log)
    seconds = time.perf_counter() - start
    trace["step"].append(trace["step"][-1])
    trace["loss"].append(trace["loss"][-1])
    trace["widths"].append(list(net.widths[1:-1]))
    model = net.to_isomlp()
    test_accuracy = accuracy(model.cast(torch.float32), x_test, y_test)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = net.save(out_dir / f"{name}.pt", dtype=torch.float32)
    shrunk = shrink_exact(model)
    reference = FIXED_REFERENCE[name]
    ends = RECIPES[name].widths[0], RECIPES[name].widths[-1]
    peak = max(dense_params([ends[0], *w, ends[1]]) for w in dict.fromkeys(map(tuple, trace["widths"])))
    result = {
        "name": name, "model": str(path), "widths": list(model.widths), "params": model.num_params(),
        "test_accuracy": test_accuracy, "seconds": seconds, "before_final_pruning": before,
        "peak_weights_and_biases_while_training": peak,
        "shrunk_widths": list(shrunk.widths), "shrunk_params": shrunk.num_params(),
        "shrunk_test_accuracy": accuracy(shrunk.cast(torch.float32), x_test, y_test),
        "fixed_params": reference["params"], "fixed_accuracy": reference["accuracy"],
        "param_ratio": model.num_params() / reference["params"],
        "accuracy_gap_pt": 100 * (reference["accuracy"] - test_accuracy),
        "grown": sum(c.count for c in history if c.kind == "grow"),
        "degenerated": sum(c.count for c in history if c.kind == "degenerate"),
        "settings": asdict(settings), "trace": trace,
    }
    print(f"{name}: widths {'→'.join(map(str, model.widths))}, {model.num_params():,} parameters "
          f"({100 * result['param_ratio']:.1f}% of the fixed {reference['params']:,}), test accuracy "
          f"{100 * test_accuracy:.2f}% (fixed-width {100 * reference['accuracy']:.2f}%); before the final pruning "
          f"{'→'.join(map(str, before['widths']))}, {before['params']:,} parameters, "
          f"{100 * before['test_accuracy']:.2f}%; peak while training {peak:,} weights and biases; {result['grown']} neurons grown, "
          f"{result['degenerated']} degenerated, {seconds:.1f} s; `isocompress shrink` exactly: "
          f"{'→'.join(map(str, shrunk.widths))} ({shrunk.num_params():,} parameters)")
    return result


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(results), figsize=(6 * len(results), 7), squeeze=False, sharex="col")
    for column, result in enumerate(results):
        trace = result["trace"]
        steps, widths = np.asarray(trace["step"]), np.asarray(trace["widths"])
        top, bottom = axes[0][column], axes[1][column]
        for layer in range(widths.shape[1]):
            top.plot(steps, widths[:, layer], label=f"hidden layer {layer + 1}")
        top.axhline(RECIPES[result["name"]].widths[1], color="grey", linestyle=":", label="fixed-width model")
        top.set_ylabel("hidden width (neurons)")
        top.set_title(f"{result['name']}: {result['params']:,} params ({100 * result['param_ratio']:.0f}% of fixed), "
                      f"test {100 * result['test_accuracy']:.2f}% vs {100 * result['fixed_accuracy']:.2f}%",
                      fontsize=10)
        top.legend(fontsize=8)
        loss = np.asarray(trace["loss"])
        window = max(1, len(loss) // 200)
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        bottom.plot(steps[window - 1:], smooth, color="black", label=f"training loss (mean of {window} steps)")
        bottom.set_yscale("log")
        bottom.set_xlabel("training step")
        bottom.set_ylabel("cross-entropy loss")
        bottom.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"data sets: {', '.join(ADAPTIVE)} [default: all]")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output directory [default: adaptive/]")
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's number of epochs")
    parser.add_argument("--quiet", action="store_true", help="do not log each restructuring")
    args = parser.parse_args()
    unknown = [name for name in args.names if name not in ADAPTIVE]
    if unknown:
        parser.error(f"unknown data set {unknown[0]!r}; choose from {', '.join(ADAPTIVE)}")
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    results = []
    for name in args.names or list(ADAPTIVE):
        settings = ADAPTIVE[name] if args.epochs is None else Adaptive(**{**asdict(ADAPTIVE[name]), "epochs": args.epochs})
        results.append(build(name, args.out, settings, args.quiet))
    plot(results, args.out / "adaptive.png")
    with atomic_path(args.out / "adaptive.json") as tmp:
        Path(tmp).write_text(json.dumps([{k: v for k, v in r.items() if k != "trace"} for r in results], indent=2))
    print(f"wrote {args.out / 'adaptive.png'} and {args.out / 'adaptive.json'}")


if __name__ == "__main__":
    main()
