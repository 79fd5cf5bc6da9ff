"""Train the shipped example models in models/ (issue 2 item 7, issue 6 item 3). Deterministic; ~1 minute each.

    pip install -e ".[train]"                 # scikit-learn and mnist1d (the [test] extra has them too)
    python scripts/train_models.py            # both models
    python scripts/train_models.py digits     # one of them

Writes, for each model M: models/M.pt (isocompress's own format, float32), models/M.calib.npy (256 training inputs,
float32), models/M.calib.labels.npy (their int64 labels) and models/M.test.npz (held-out `x` float32, `y` int64).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from isocompress.formats.io import atomic_path
from isocompress.train.nn import IsotropicMLP

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
CALIBRATION_SIZE = 256


@dataclass(frozen=True)
class Recipe:
    name: str
    widths: tuple[int, ...]
    psi: bool
    intrinsic_length: str
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    weight_scale: float = 1.0


RECIPES = {
    "digits": Recipe("digits", (64, 256, 256, 256, 10), psi=True, intrinsic_length="trainable",
                     epochs=150, batch_size=64, lr=1e-3, weight_decay=1e-4),
    "mnist1d": Recipe("mnist1d", (40, 256, 256, 256, 10), psi=False, intrinsic_length="none",
                      epochs=150, batch_size=32, lr=1e-3, weight_decay=1e-4),
}


def load_digits_split():
    from sklearn.datasets import load_digits  # pip install -e ".[train]"
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)  # pixel values 0..16 → [0, 1]
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    return x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64)


def load_mnist1d_split():
    from mnist1d.data import get_dataset_args, make_dataset

    data = make_dataset(get_dataset_args())  # deterministic: the default args fix the seed
    as32 = lambda a: np.asarray(a, dtype=np.float32)
    as64 = lambda a: np.asarray(a, dtype=np.int64)
    return as32(data["x"]), as64(data["y"]), as32(data["x_test"]), as64(data["y_test"])


LOADERS = {"digits": load_digits_split, "mnist1d": load_mnist1d_split}


def train(recipe: Recipe, x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> IsotropicMLP:
    torch.manual_seed(seed)
    net = IsotropicMLP(recipe.widths, psi=recipe.psi, intrinsic_length=recipe.intrinsic_length, seed=seed,
                       weight_scale=recipe.weight_scale)
    optimiser = torch.optim.Adam(net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=recipe.epochs)
    order = torch.Generator().manual_seed(seed)
    for _ in range(recipe.epochs):
        for batch in torch.randperm(len(x), generator=order).split(recipe.batch_size):
            loss = torch.nn.functional.cross_entropy(net(x[batch]), y[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        schedule.step()
    return net


@torch.no_grad()
def accuracy(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((net(x).argmax(dim=1) == y).double().mean())


def save_array(array: np.ndarray, path: Path) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, array)


def save_test_set(x: np.ndarray, y: np.ndarray, path: Path) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, x=x, y=y)


def build(name: str, out_dir: Path) -> dict:
    recipe = RECIPES[name]
    x_train, y_train, x_test, y_test = LOADERS[name]()
    start = time.perf_counter()
    net = train(recipe, torch.from_numpy(x_train), torch.from_numpy(y_train))
    seconds = time.perf_counter() - start
    net.eval()
    model = net.to_isomlp()
    test_accuracy = accuracy(model.cast(torch.float32), torch.from_numpy(x_test), torch.from_numpy(y_test))
    out_dir.mkdir(parents=True, exist_ok=True)
    net.save(out_dir / f"{name}.pt", dtype=torch.float32)
    pick = np.random.default_rng(0).choice(len(x_train), size=CALIBRATION_SIZE, replace=False)
    save_array(x_train[pick].astype(np.float32), out_dir / f"{name}.calib.npy")
    save_array(y_train[pick].astype(np.int64), out_dir / f"{name}.calib.labels.npy")
    save_test_set(x_test.astype(np.float32), y_test.astype(np.int64), out_dir / f"{name}.test.npz")
    o_values = [round(float(layer.o), 4) for layer in model.layers[:-1]]
    print(f"{name}: widths {'→'.join(map(str, model.widths))}, {model.num_params():,} parameters, "
          f"test accuracy {100 * test_accuracy:.2f}% ({len(y_test)} samples), o = {o_values}, "
          f"trained in {seconds:.1f} s")
    return {"name": name, "params": model.num_params(), "accuracy": test_accuracy, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"models to train: {', '.join(RECIPES)} [default: all]")
    parser.add_argument("--out", type=Path, default=MODELS_DIR, help="output directory [default: models/]")
    args = parser.parse_args()
    unknown = [name for name in args.names if name not in RECIPES]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r}; choose from {', '.join(RECIPES)}")
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    for name in args.names or list(RECIPES):
        build(name, args.out)


if __name__ == "__main__":
    main()
