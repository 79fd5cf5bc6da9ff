"""The shipped isotropic CNNs (models/*_cnn.*, trained by scripts/train_models.py): their files load, have the shapes
docs/models.md documents, reach the parameter count and test accuracy its table states, and shrink exactly to the
rank floor."""

from pathlib import Path

import numpy as np
import pytest
import torch

import isocompress

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
DOC = ROOT / "docs" / "models.md"
# name: (input shape, test-set size), as docs/models.md describes the files
CNNS = {"mnist1d_cnn": ((1, 40), 1000), "digits_cnn": ((1, 8, 8), 360)}


def documented_row(name: str) -> dict[str, str]:
    """The row of docs/models.md's CNN table for models/<name>.safetensors, by its header's column names."""
    lines = DOC.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith(f"| `models/{name}.safetensors`"):
            header = next(lines[j] for j in range(i, -1, -1) if lines[j].startswith("| model"))
            keys = [c.strip() for c in header.strip("|").split("|")]
            return dict(zip(keys, (c.strip() for c in line.strip("|").split("|"))))
    raise AssertionError(f"docs/models.md has no row for models/{name}.safetensors")


def shipped(name: str):
    model = isocompress.load(MODELS / f"{name}.safetensors")
    calib = np.load(MODELS / f"{name}.calib.npy")
    labels = np.load(MODELS / f"{name}.calib.labels.npy")
    with np.load(MODELS / f"{name}.test.npz") as test:
        x, y = test["x"], test["y"]
    return model, calib, labels, x, y


@pytest.mark.parametrize("name", CNNS)
def test_shipped_cnn_files_have_the_documented_shapes(name):
    shape, n_test = CNNS[name]
    model, calib, labels, x, y = shipped(name)
    assert not model.is_mlp and tuple(model.input_shape) == shape and model.widths[-1] == 10
    assert model.layers[-1].geometry.flatten  # a flatten or global-average-pool Linear head
    assert calib.shape == (256, *shape) and calib.dtype == np.float32
    assert labels.shape == (256,) and labels.dtype == np.int64 and set(labels.tolist()) <= set(range(10))
    assert x.shape == (n_test, *shape) and x.dtype == np.float32
    assert y.shape == (n_test,) and y.dtype == np.int64
    assert all(layer.sigma == "tanh" and float(layer.o) > 0 for layer in model.layers[:-1])  # trained o, tanh


@pytest.mark.parametrize("name", CNNS)
def test_shipped_cnn_reaches_the_documented_accuracy(name):
    model, calib, labels, x, y = shipped(name)
    row = documented_row(name)
    with torch.no_grad():
        predicted = model(torch.from_numpy(x).double()).argmax(dim=1).numpy()
    assert f"{model.num_params():,}" == row["parameters"]
    assert f"{model.flops():,}" == row["FLOPs"]
    assert f"{100 * (predicted == y).mean():.2f}%" == row["test accuracy"]
    with torch.no_grad():
        calib_predicted = model(torch.from_numpy(calib).double()).argmax(dim=1).numpy()
    assert (calib_predicted == labels).mean() > 0.9  # the calibration labels belong to the calibration inputs


def test_the_mnist1d_cnn_beats_the_mlp_by_far():
    """The reason to ship it: ≥ 90% test accuracy where the shipped MLP has 64.7% (docs/models.md)."""
    model, _, _, x, y = shipped("mnist1d_cnn")
    with torch.no_grad():
        accuracy = (model(torch.from_numpy(x).double()).argmax(dim=1).numpy() == y).mean()
    mlp = isocompress.load(MODELS / "mnist1d.pt")
    with np.load(MODELS / "mnist1d.test.npz") as test:
        assert np.array_equal(test["x"], x.reshape(len(x), -1)) and np.array_equal(test["y"], y)  # same test set
        with torch.no_grad():
            mlp_accuracy = (mlp(torch.from_numpy(test["x"]).double()).argmax(dim=1).numpy() == y).mean()
    assert accuracy >= 0.90 and accuracy > mlp_accuracy + 0.25


@pytest.mark.parametrize("name", CNNS)
def test_exact_shrink_of_a_shipped_cnn_reaches_the_rank_floor(name):
    """The first conv keeps at most C_in·k output channels, and the function is unchanged (float64, 1e-10 relative)."""
    model, calib, _, _, _ = shipped(name)
    shrunk = isocompress.shrink_exact(model)
    first = model.layers[0]
    assert shrunk.widths[1] <= first.n_in * int(np.prod(first.geometry.kernel)) < model.widths[1]
    assert shrunk.num_params() < model.num_params() and shrunk.flops() < model.flops()
    gen = torch.Generator().manual_seed(0)
    scaled = [s * torch.randn(16, *model.input_shape, dtype=torch.float64, generator=gen) for s in (0.01, 10, 1e3)]
    x = torch.cat([torch.from_numpy(calib).double()[:64], *scaled])
    with torch.no_grad():
        y, y_shrunk = model(x), shrunk(x)
    assert float((y_shrunk - y).norm(dim=1).max() / y.norm(dim=1).max()) <= 1e-10
