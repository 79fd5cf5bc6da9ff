"""Train the shipped example models in models/. Deterministic (seeded, one thread, deterministic algorithms).

    pip install -e ".[train]"                 # scikit-learn and mnist1d (the [test] extra has them too)
    python scripts/train_models.py            # all four models (~6 minutes)
    python scripts/train_models.py digits     # one of them
    python scripts/train_models.py --cnn      # the two CNNs only

The MLPs (digits, mnist1d; ~1 minute each) are isocompress.train.nn.IsotropicMLP. The CNNs (mnist1d_cnn, digits_cnn;
~1–3 minutes each) are ordinary torch modules written below as a user would write them (an activation class with a
trainable intrinsic length, Conv1d/Conv2d, strided convs or AvgPool, a flatten or global-average-pool Linear head),
converted with `isocompress.from_module` and written with `isocompress.save`.

Writes, for each model M: the model (models/M.pt for the MLPs, models/M.safetensors for the CNNs; isocompress's own
format, float32), models/M.calib.npy (256 training inputs, float32, in the model's input shape: n × 64 and n × 40 for
the MLPs, n × 1 × 40 and n × 1 × 8 × 8 for the CNNs), models/M.calib.labels.npy (their int64 labels) and
models/M.test.npz (held-out `x` float32 in the same shape, `y` int64).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

import isocompress
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
    fit(net, optimiser, x, y, recipe.epochs, recipe.batch_size, seed, after_epoch=schedule.step)
    return net


def fit(net: nn.Module, optimiser, x: torch.Tensor, y: torch.Tensor, epochs: int, batch_size: int, seed: int,
        after_step=None, after_epoch=None) -> None:
    """Cross-entropy training, batches in an order seeded by `seed`; the schedule steps per batch or per epoch."""
    order = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=order).split(batch_size):
            loss = torch.nn.functional.cross_entropy(net(x[batch]), y[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            if after_step is not None:
                after_step()
        if after_epoch is not None:
            after_epoch()


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
    save_shared_files(name, out_dir, x_train, y_train, x_test, y_test)
    o_values = [round(float(layer.o), 4) for layer in model.layers[:-1]]
    print(f"{name}: widths {'→'.join(map(str, model.widths))}, {model.num_params():,} parameters, "
          f"test accuracy {100 * test_accuracy:.2f}% ({len(y_test)} samples), o = {o_values}, "
          f"trained in {seconds:.1f} s")
    return {"name": name, "params": model.num_params(), "accuracy": test_accuracy, "seconds": seconds}


# --- the isotropic CNNs: ordinary torch modules, converted with isocompress.from_module ----------------------------
class IsotropicTanh(nn.Module):
    """f(z) = tanh(m)/m · z over the channel axis (dim 1), m = sqrt(o + |z|²), with a trainable intrinsic length
    o = softplus(raw) > 0 (initially 0.3)."""

    def __init__(self, o: float = 0.3):
        super().__init__()
        self.raw = nn.Parameter(torch.tensor(math.log(math.expm1(o))))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        m = torch.sqrt(nn.functional.softplus(self.raw) + (z * z).sum(dim=1, keepdim=True))
        return torch.tanh(m) / m * z


class Mnist1dCNN(nn.Module):
    """N × 1 × 40 signals → 10 logits: five 1-D convs (kernel 5 then 3; strides 1, 2, 1, 2, 2: 40 → 40 → 20 → 20 → 10
    → 5 positions), `channels` wide, an isotropic tanh after each, and a Linear head on the flattened 5 positions."""

    def __init__(self, channels: int = 32):
        super().__init__()
        c = channels
        self.convs = nn.ModuleList([nn.Conv1d(1, c, 5, stride=1, padding=2), nn.Conv1d(c, c, 3, stride=2, padding=1),
                                    nn.Conv1d(c, c, 3, stride=1, padding=1), nn.Conv1d(c, c, 3, stride=2, padding=1),
                                    nn.Conv1d(c, c, 3, stride=2, padding=1)])
        self.activations = nn.ModuleList([IsotropicTanh() for _ in self.convs])
        self.head = nn.Linear(5 * c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, activation in zip(self.convs, self.activations):
            x = activation(conv(x))
        return self.head(x.flatten(1))


class DigitsCNN(nn.Module):
    """N × 1 × 8 × 8 images → 10 logits: a 3×3 conv (`channels`), 2×2 average pooling (8×8 → 4×4), two 3×3 convs
    (2·`channels`), an isotropic tanh after each conv, global average pooling and a Linear head."""

    def __init__(self, channels: int = 16):
        super().__init__()
        c = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1), IsotropicTanh(), nn.AvgPool2d(2),
            nn.Conv2d(c, 2 * c, 3, padding=1), IsotropicTanh(),
            nn.Conv2d(2 * c, 2 * c, 3, padding=1), IsotropicTanh(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(2 * c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@dataclass(frozen=True)
class CNNRecipe:
    name: str
    build: Callable[[], nn.Module]
    data: str  # a key of LOADERS
    input_shape: tuple[int, ...]
    epochs: int
    batch_size: int
    lr: float  # the peak of a one-cycle schedule
    weight_decay: float = 0.0


CNN_RECIPES = {
    "mnist1d_cnn": CNNRecipe("mnist1d_cnn", Mnist1dCNN, "mnist1d", (1, 40), epochs=80, batch_size=100, lr=2e-2,
                             weight_decay=1e-5),
    "digits_cnn": CNNRecipe("digits_cnn", DigitsCNN, "digits", (1, 8, 8), epochs=80, batch_size=64, lr=2e-2),
}


def train_cnn(recipe: CNNRecipe, x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> nn.Module:
    """Adam with a one-cycle learning-rate schedule peaking at recipe.lr; batches in a seeded order."""
    torch.manual_seed(seed)
    net = recipe.build()
    optimiser = torch.optim.Adam(net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps = recipe.epochs * math.ceil(len(x) / recipe.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=recipe.lr, total_steps=steps)
    fit(net, optimiser, x, y, recipe.epochs, recipe.batch_size, seed, after_step=schedule.step)
    return net.eval()


def build_cnn(name: str, out_dir: Path) -> dict:
    recipe = CNN_RECIPES[name]
    x_train, y_train, x_test, y_test = LOADERS[recipe.data]()
    x_train = x_train.reshape(-1, *recipe.input_shape)
    x_test = x_test.reshape(-1, *recipe.input_shape)
    start = time.perf_counter()
    net = train_cnn(recipe, torch.from_numpy(x_train), torch.from_numpy(y_train))
    seconds = time.perf_counter() - start
    model = isocompress.from_module(net, torch.from_numpy(x_train[:64]), notify=print)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = isocompress.save(model, out_dir / f"{name}.safetensors", dtype=torch.float32)
    saved = isocompress.load(path)
    x64 = torch.from_numpy(x_test).double()
    with torch.no_grad():
        drift = float((saved(x64) - net.double()(x64)).abs().max())
    test_accuracy = accuracy(saved, x64, torch.from_numpy(y_test))
    save_shared_files(name, out_dir, x_train, y_train, x_test, y_test)
    o_values = [round(float(layer.o), 4) for layer in saved.layers[:-1]]
    print(f"{name}: input {'×'.join(map(str, saved.input_shape))}, channels {'→'.join(map(str, saved.widths))}, "
          f"{saved.num_params():,} parameters, {saved.flops():,} FLOPs, test accuracy {100 * test_accuracy:.2f}% "
          f"({len(y_test)} samples), o = {o_values}, trained in {seconds:.1f} s; saved file vs the torch module: "
          f"max |Δy| {drift:.2e} on the test set")
    return {"name": name, "params": saved.num_params(), "accuracy": test_accuracy, "seconds": seconds}


def save_shared_files(name: str, out_dir: Path, x_train, y_train, x_test, y_test) -> None:
    """M.calib.npy (256 training inputs chosen with default_rng(0)), M.calib.labels.npy and M.test.npz."""
    pick = np.random.default_rng(0).choice(len(x_train), size=CALIBRATION_SIZE, replace=False)
    save_array(x_train[pick].astype(np.float32), out_dir / f"{name}.calib.npy")
    save_array(y_train[pick].astype(np.int64), out_dir / f"{name}.calib.labels.npy")
    save_test_set(x_test.astype(np.float32), y_test.astype(np.int64), out_dir / f"{name}.test.npz")


ALL_MODELS = list(RECIPES) + list(CNN_RECIPES)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"models to train: {', '.join(ALL_MODELS)} [default: all]")
    parser.add_argument("--cnn", action="store_true", help="the CNNs only (with no names)")
    parser.add_argument("--out", type=Path, default=MODELS_DIR, help="output directory [default: models/]")
    args = parser.parse_args()
    unknown = [name for name in args.names if name not in ALL_MODELS]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r}; choose from {', '.join(ALL_MODELS)}")
    if args.cnn and args.names:
        parser.error("give model names or --cnn, not both")
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    for name in args.names or (list(CNN_RECIPES) if args.cnn else ALL_MODELS):
        (build_cnn if name in CNN_RECIPES else build)(name, args.out)


if __name__ == "__main__":
    main()
