"""Pruning to a budget (issue 4): budgets respected, exactness of zero directions, and certified ≥ adversarial ≥
empirical on every run."""

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from isocompress.api.shrink import ShrinkOptions
from isocompress.core.errors import IsocompressError
from isocompress.core.model import random_model
from isocompress.exact.constants import remove_all_constant_directions
from isocompress.exact.shrink import alternate_diagonalise
from isocompress.prune import budget as prune

F64 = torch.float64
MODELS = Path(__file__).resolve().parents[1] / "models"


def calibration(n_in, n=128, seed=0, scale=1.0):
    return torch.randn(n, n_in, dtype=F64, generator=torch.Generator().manual_seed(seed)) * scale


def run(model, x, **options):
    return prune.prune_to_budget(model, ShrinkOptions(**options), calibration=x, search_restarts=8, search_steps=30)


def assert_ordered(report):
    cert, adv, emp = (report[k]["max_abs"] for k in ("certified", "adversarial", "empirical"))
    assert cert >= adv >= emp, (cert, adv, emp)


@settings(max_examples=25)
@given(st.lists(st.integers(3, 24), min_size=3, max_size=5), st.booleans(), st.floats(0.0, 2.0),
       st.sampled_from([0.1, 0.4, 0.8]), st.sampled_from(["data-free", "data-aware"]), st.integers(0, 100))
def test_certified_above_adversarial_above_empirical(widths, psi, o, share, basis, seed):
    """Budgets between the smallest reachable size and the exact size, so that every example really prunes."""
    model = random_model(widths, psi=psi, o=o, seed=seed, weight_scale=2.0)
    x = calibration(widths[0], seed=seed)
    exact = prune.State.of(remove_all_constant_directions(model))
    smallest, exact_size = prune.smallest_params(exact), prune.current_params(exact)
    budget = float(smallest + int(share * (exact_size - smallest)))
    pruned, report = run(model, x, budget=max(budget, 2.0), basis=basis)
    assert pruned.num_params() <= max(budget, 2.0)
    assert_ordered(report)


def test_stored_params_matches_the_diagonalised_model():
    state = prune.State.of(random_model([6, 20, 18, 16, 3], psi=False, seed=2))
    state.removed[1][:7] = True
    state.consts[1][:7] = 0.3
    state.removed[2][:2] = True
    assert prune.current_params(state) == alternate_diagonalise(prune.materialize(state)).num_params()


def test_removing_zero_singular_directions_changes_nothing():
    model = random_model([4, 9, 7, 3], psi=False, o=0.5, seed=5)  # 9 > 4: five singular values of W_0 are 0
    state = prune.State.of(model)
    prune.rotate_singular(state)
    costs, consts = prune.data_free_costs(state, radius=10.0)
    zero = [(0, j, 0.0) for j in range(9) if float(costs[0][j]) < 1e-12]
    assert len(zero) == 5
    prune.remove(state, zero, consts)
    x = calibration(4, n=256, scale=10.0)
    diff = (prune.materialize(state)(x) - model(x)).abs().max()
    assert float(diff) <= 1e-10
    assert prune.materialize(state).widths == (4, 4, 7, 3)


def test_materialize_without_removal_is_the_same_function():
    model = random_model([5, 8, 8, 2], psi=True, o=1.0, seed=7)
    state = prune.State.of(model)
    prune.rotate_principal(state, calibration(5))
    x = calibration(5, seed=3, scale=5.0)
    assert float((prune.materialize(state)(x) - model(x)).abs().max()) < 1e-12


def test_absolute_budget_and_error_limit():
    model = random_model([10, 40, 40, 4], psi=True, o=(0.0, 1.0), seed=11, weight_scale=2.0)
    x = calibration(10)
    pruned, _ = run(model, x, budget=900.0)
    assert pruned.num_params() <= 900
    pruned, report = run(model, x, max_error=0.5)
    assert report["certified"]["max_abs"] <= 0.5
    assert pruned.num_params() < prune.current_params(prune.State.of(model))  # it did prune something
    assert_ordered(report)


def test_unreachable_budget_names_the_smallest_size():
    model = random_model([10, 40, 40, 4], seed=1)
    with pytest.raises(IsocompressError, match=r"smallest reachable size is \d+"):
        run(model, calibration(10), budget=10.0)


def test_data_aware_needs_calibration():
    with pytest.raises(IsocompressError, match="--calibration"):
        prune.prune_to_budget(random_model([3, 5, 2]), ShrinkOptions(budget=0.5, basis="data-aware"))


def test_report_has_per_layer_detail():
    model = random_model([8, 30, 30, 3], psi=True, o=0.5, seed=4, weight_scale=2.0)
    _, report = run(model, calibration(8), budget=0.06)
    removed = [layer["removed"] for layer in report["layers"]]
    assert sum(removed) > 0
    for layer in report["layers"]:
        assert len(layer["scores"]) == layer["removed"]
        assert layer["introduced_certified"] >= layer["introduced_empirical_max"]
    assert report["radius_source"] == "largest calibration-input norm"


def load_shipped(name):
    from isocompress.formats import io

    path = MODELS / f"{name}.pt"
    if not path.exists():
        pytest.skip(f"{path} not trained yet")
    x = torch.from_numpy(np.load(MODELS / f"{name}.calib.npy")).to(F64)
    labels = torch.from_numpy(np.load(MODELS / f"{name}.calib.labels.npy"))
    return io.load(path), x, labels


@pytest.mark.slow
@pytest.mark.parametrize("name", ["digits", "mnist1d"])
def test_shipped_models_bounds_are_ordered(name):
    model, x, labels = load_shipped(name)
    pruned, report = prune.prune_to_budget(model, ShrinkOptions(budget=0.05), calibration=x, labels=labels,
                                           search_restarts=16, search_steps=40)
    assert pruned.num_params() <= 0.05 * model.num_params()
    assert_ordered(report)


def test_cli_budget_prints_and_reports_the_three_bounds(tmp_path):
    import json

    from click.testing import CliRunner

    from isocompress.cli import main
    from isocompress.formats import io

    model_path = tmp_path / "m.safetensors"
    io.save(random_model([12, 48, 48, 6], psi=True, o=(0.0, 1.0), seed=3, weight_scale=2.0), model_path)
    calib = tmp_path / "calib.npy"
    np.save(calib, calibration(12, n=64).numpy())
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["shrink", str(model_path), "--budget", "5%", "--calibration", str(calib),
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "certified" in result.output and "adversarial" in result.output and "empirical" in result.output
    pruning = json.loads((out / "report.json").read_text())["pruning"]
    assert pruning["certified"]["max_abs"] >= pruning["adversarial"]["max_abs"] >= pruning["empirical"]["max_abs"]
    assert pruning["empirical"]["max_abs"] > 1e-6  # it really pruned
    assert pruning["radius_source"] == "largest calibration-input norm"
