"""Budgets on isotropic CNNs: the certified global bound on maps attacked by a search, the report and the CLI, and the
one-line refusals where no certificate is derived (log1p, local certificates)."""

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from isocompress.api.shrink import ShrinkOptions
from isocompress.bounds import certified as bounds
from isocompress.cli import main
from isocompress.core.errors import IsocompressError
from isocompress.core.measure import sample_norms
from isocompress.core.model import random_cnn
from isocompress.formats import io
from isocompress.prune import budget as prune

F64 = torch.float64
SPECS = [
    ((1, 16), [dict(channels=6, kernel=3, padding=1), dict(channels=6, kernel=3, stride=2), dict(channels=3,
                                                                                                  flatten=True)]),
    ((2, 6, 5), [dict(channels=5, kernel=2), dict(channels=5, pool=2, kernel=1), dict(channels=3, pool="global")]),
    ((1, 12), [dict(channels=8, kernel=2, dilation=2), dict(channels=6, kernel=1), dict(channels=4, pool=2,
                                                                                        flatten=True)]),
]


def calibration(model, n=64, seed=0):
    return torch.randn(n, *model.input_shape, dtype=F64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("index, budget", [(0, 0.35), (1, 0.6), (2, 0.35)])
def test_the_certified_bound_on_maps_survives_a_search(index, budget):
    """Pruned to a budget: a longer search than the report's own never exceeds the certified bound."""
    shape, spec = SPECS[index]
    model = random_cnn(shape, spec, psi=True, o=(0.05, 0.6), seed=index)
    x = calibration(model)
    pruned, report = prune.prune_to_budget(model, ShrinkOptions(budget=budget), calibration=x)
    certified = report["certified"]["max_abs"]
    assert math.isfinite(certified) and certified >= report["adversarial"]["max_abs"]
    radius = report["radius"]
    search = bounds.adversarial_search(model, pruned, radius, restarts=64, steps=250, seed=11)
    assert search["max_abs"] <= certified
    with torch.no_grad():  # and every calibration point (inside the domain by construction)
        assert float(sample_norms(pruned(x) - model(x)).max()) <= certified
    assert report["certified"]["method"] == "chain"


def test_random_points_in_the_ball_never_exceed_the_bound():
    shape, spec = SPECS[0]
    model = random_cnn(shape, spec, psi=True, o=0.2, seed=5)
    x = calibration(model)
    pruned, report = prune.prune_to_budget(model, ShrinkOptions(budget=0.4), calibration=x)
    gen = torch.Generator().manual_seed(3)
    points = torch.randn(4000, *model.input_shape, dtype=F64, generator=gen)
    points = points / sample_norms(points).reshape(-1, 1, 1) * report["radius"] * torch.rand(4000, 1, 1, dtype=F64,
                                                                                             generator=gen) ** 0.5
    with torch.no_grad():
        assert float(sample_norms(pruned(points) - model(points)).max()) <= report["certified"]["max_abs"]


def test_a_cnn_budget_run_from_the_cli(tmp_path):
    model = random_cnn(*SPECS[0], psi=False, o=0.1, seed=2)
    path = io.save(model, tmp_path / "cnn.safetensors")
    x = calibration(model, 128).reshape(128, -1)  # flattened, as a user's N × 16 signals
    np.save(tmp_path / "x.npy", x.numpy())
    np.save(tmp_path / "y.npy", model(x.reshape(-1, 1, 16)).argmax(1).numpy())
    result = CliRunner().invoke(main, ["shrink", str(path), "--budget", "50%", "--calibration", str(tmp_path / "x.npy"),
                                       "--labels", str(tmp_path / "y.npy"), "--out", str(tmp_path / "o"), "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["input_shape"] == [1, 16] and report["flops_after"] < report["flops_before"]
    assert report["params_after"] <= 0.5 * report["params_before"]
    assert report["onnx"]["max_rel_diff"] <= 1e-4
    pruning = report["pruning"]
    assert pruning["certified"]["max_abs"] >= pruning["adversarial"]["max_abs"]
    assert pruning["local"] == {"computed": False, "note": prune.LOCAL_MLP_ONLY}
    table = CliRunner().invoke(main, ["shrink", str(path), "--exact", "--out", str(tmp_path / "e")])
    assert "input        1×16" in table.output and "FLOPs" in table.output


def test_log1p_networks_prune_without_a_certificate_and_say_so():
    model = random_cnn(*SPECS[1], o=0.2, sigma="log1p", seed=3)
    x = calibration(model)
    pruned, report = prune.prune_to_budget(model, ShrinkOptions(budget=0.5), calibration=x)
    assert pruned.num_params() < model.num_params()
    assert report["certified"]["max_abs"] is None and report["certified"]["note"] == prune.TANH_ONLY
    with pytest.raises(IsocompressError, match="--max-error needs a certified bound; the certified bounds are derived"
                                               " for tanh activations"):
        prune.prune_to_budget(model, ShrinkOptions(max_error=0.1), calibration=x)


def test_local_goals_are_refused_for_cnns():
    model = random_cnn(*SPECS[0], o=0.2, seed=4)
    with pytest.raises(IsocompressError, match="--min-certified-top1 needs local certificates; they are computed for"
                                               " MLPs"):
        prune.prune_to_budget(model, ShrinkOptions(min_certified_top1=0.9), calibration=calibration(model))


def test_data_aware_costs_reduce_to_the_mlp_formula_on_vectors():
    """On an MLP (one position) the pooled cost is mean_x |∂y/∂z_j|² (z_j − μ_j)², the formula of the MLP path."""
    from isocompress.core.model import random_model

    model = random_model([5, 7, 6, 3], psi=True, o=0.3)
    state = prune.State.of(model)
    x = torch.randn(40, 5, dtype=F64)
    costs, means = prune.data_aware_costs(state, x)
    xx = x.clone().requires_grad_(True)
    y, zs, _ = model.forward_with_hidden(xx)
    for z, cost, mean in zip(zs, costs, means):
        sq = torch.zeros_like(z)
        for k in range(y.shape[1]):
            g = torch.autograd.grad(y[:, k].sum(), z, retain_graph=True)[0]
            sq = sq + g * g
        expected = (sq * (z.detach() - z.detach().mean(0)) ** 2).mean(0).sqrt()
        assert torch.allclose(cost, expected, rtol=1e-12) and torch.allclose(mean, z.detach().mean(0))


def test_check_measures_a_cnn_recipe_on_its_labelled_data(tmp_path):
    """`check` reads a CNN's labelled data by the model's input shape (it read n × n_in columns), flattened or not."""
    from isocompress.check.run import run_checks

    model = random_cnn(*SPECS[1], o=0.1, seed=8)
    path = io.save(model, tmp_path / "cnn.safetensors", dtype=torch.float64)
    x = calibration(model, 40)
    np.save(tmp_path / "x.npy", x.numpy())
    np.save(tmp_path / "y.npy", model(x).argmax(1).numpy())
    (tmp_path / "exact.toml").write_text('name = "exact"\nversion = 1\n')
    config = tmp_path / "ci.toml"
    config.write_text(f'[[check]]\nmodel = "{path}"\nrecipe = "{tmp_path / "exact.toml"}"\n'
                      f'calibration = "{tmp_path / "x.npy"}"\nlabels = "{tmp_path / "y.npy"}"\nmin-accuracy = "99%"\n')
    results = run_checks(config=config)
    accuracy = [r for r in results if r.metric == "accuracy"]
    assert len(accuracy) == 1 and accuracy[0].passed and accuracy[0].measured == pytest.approx(1.0)
