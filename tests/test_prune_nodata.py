"""Issue 10: budgets without data that do not collapse, no made-up domain, local certificates in the report and the
table, --min-certified-top1, test data, label counts, and an unreachable --max-error as an error."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli, one_error_line

from isocompress.api.recipe import parse_recipe_text
from isocompress.api.shrink import ShrinkOptions
from isocompress.core.errors import IsocompressError
from isocompress.core.model import IsoMLP, Layer, random_model
from isocompress.formats import io
from isocompress.prune import budget as prune

F64 = torch.float64
MODELS = Path(__file__).resolve().parents[1] / "models"
DIGITS = MODELS / "digits.pt"


def test_data_free_costs_without_a_domain_are_scale_free():
    """No radius: the cost of a direction is its singular value (+ the psi term) whatever inputs one imagines; the
    constant is the paper's b* (the rotated bias, psi·g dropped)."""
    model = random_model([5, 9, 8, 3], psi=True, o=0.4, seed=4)
    state = prune.State.of(model)
    prune.rotate_singular(state)
    costs, consts = prune.data_free_costs(state, None)
    compact = prune.materialize(state)
    assert torch.allclose(costs[0], torch.linalg.vector_norm(compact.layers[0].weight, dim=1))
    g_top = float(torch.tanh(compact.layers[0].o.sqrt()) / compact.layers[0].o.sqrt())
    expected = torch.linalg.vector_norm(compact.layers[1].weight, dim=1) + compact.layers[1].psi.abs() * g_top / 2
    assert torch.allclose(costs[1], expected)
    assert torch.equal(consts[1], compact.layers[1].bias) and torch.equal(consts[0], compact.layers[0].bias)


def psi_carrier_model(sigma=0.5, psi=1.3, o=0.25) -> IsoMLP:
    """Hidden space 1 has a direction A with σ = 0 but psi = 1.3 (z_A = 0.2 + 1.3·g_0: it carries the gain) and a
    direction B with σ = 0.5 and no psi; hidden space 0 is too costly to prune. g(√0.25) = 0.924."""
    eye = torch.eye(2, dtype=F64)
    return IsoMLP([Layer(weight=3.0 * eye, bias=torch.zeros(2, dtype=F64), n_in=2, o=torch.tensor(o, dtype=F64)),
                   Layer(weight=torch.diag(torch.tensor([sigma, 0.0], dtype=F64)), bias=torch.tensor([0.1, 0.2], dtype=F64),
                         n_in=2, psi=torch.tensor([0.0, psi], dtype=F64), o=torch.tensor(o, dtype=F64)),
                   Layer(weight=eye, bias=torch.zeros(2, dtype=F64), n_in=2, psi=torch.zeros(2, dtype=F64))])


def sweep_error(model: IsoMLP, pruned: IsoMLP) -> float:
    """max |Δy| over inputs at every scale from 0 to 10⁴ (the no-data ranking assumes no scale)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(64, 2, dtype=F64, generator=gen), dim=1)
    x = torch.cat([x * s for s in [0.0, 0.01, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0, 1e4]])
    with torch.no_grad():
        return float((model(x) - pruned(x)).abs().max())


def remove_one(model: IsoMLP, j: int) -> IsoMLP:
    """Direction j of hidden space 1 replaced by the no-data constant (the canonical basis is the singular one)."""
    state = prune.State.of(model)
    _, consts = prune.data_free_costs(state, None)
    prune.remove(state, [(1, j, 0.0)], consts)
    return prune.materialize(state)


def test_no_data_ranking_keeps_a_direction_that_carries_psi():
    """The paper's rule (smallest σ) drops A, whose gain term errs by up to 1.3·0.924 at small inputs; the psi-aware
    cost (σ_A + |psi_A| g(√o)/2 = 0.60 > σ_B = 0.5) drops B instead, and the worst error over all scales is smaller."""
    model = psi_carrier_model()
    state = prune.State.of(model)
    target = prune.current_params(state) - prune.savings(state)[1]
    pruned, _ = prune.prune_to_budget(model, ShrinkOptions(budget=float(target)))
    assert pruned.widths == (2, 2, 1, 2)
    assert abs(float(pruned.layers[1].psi.abs().max()) - 1.3) < 1e-9  # A kept
    paper = remove_one(model, 1)  # the paper's choice: A
    assert sweep_error(model, pruned) < 0.8 * sweep_error(model, paper)


def test_no_data_constant_is_exact_in_the_saturated_limit():
    """b* drops psi_A·g_0, which vanishes as |x| grows (g_0 → 0), so removing A is exact in that limit; the
    mid-gain constant b + psi·g(√o)/2 would err by 0.6 in z_A there."""
    model = psi_carrier_model()
    pruned = remove_one(model, 1)
    state = prune.State.of(model)
    centre = model.layers[1].bias + model.layers[1].psi * float(torch.tanh(torch.tensor(0.5)) / 0.5) / 2
    prune.remove(state, [(1, 1, 0.0)], [model.layers[0].bias, centre])
    gen = torch.Generator().manual_seed(1)
    for scale, limit in ((1e3, 2e-3), (1e6, 2e-6)):
        x = scale * torch.nn.functional.normalize(torch.randn(32, 2, dtype=F64, generator=gen), dim=1)
        with torch.no_grad():
            assert float((model(x) - pruned(x)).abs().max()) <= limit
            assert float((model(x) - prune.materialize(state)(x)).abs().max()) > 0.3


@pytest.mark.parametrize("budget", [0.02, 0.01])
def test_digits_without_data_keeps_its_accuracy(budget):
    model = io.load(DIGITS)
    test = np.load(MODELS / "digits.test.npz")
    x, y = torch.from_numpy(test["x"]).to(F64), torch.from_numpy(test["y"])
    pruned, report = prune.prune_to_budget(model, ShrinkOptions(budget=budget))
    with torch.no_grad():
        accuracy = float((pruned(x).argmax(-1) == y).double().mean())
    assert accuracy >= 0.95, (accuracy, pruned.widths)
    assert min(pruned.widths[1:-1]) > 1
    assert report["certified"]["max_abs"] is None and "--input-radius" in report["certified"]["note"]
    assert report["radius"] is None and report["local"]["computed"] is False


def test_shrink_without_data_says_no_bound_was_computed(tmp_path):
    result = cli(["shrink", DIGITS, "--budget", "2%", "--out", tmp_path / "o", "--format", "safetensors"])
    assert result.exit_code == 0, result.output
    assert "no certified bound computed" in result.output
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["pruning"]["certified"]["computed"] is False


def test_max_error_without_a_domain_is_an_input_error(tmp_path):
    result = cli(["shrink", DIGITS, "--max-error", "0.5", "--out", tmp_path / "o"])
    assert result.exit_code == 2
    assert "--max-error needs an input domain" in one_error_line(result)


def test_unreachable_max_error_names_the_smallest_certified_error(tmp_path):
    result = cli(["shrink", DIGITS, "--max-error", "0", "--calibration", MODELS / "digits.calib.npy",
                  "--out", tmp_path / "o"])
    assert result.exit_code == 2
    line = one_error_line(result)
    assert "cannot be met: the smallest certified error reachable is" in line
    assert not (tmp_path / "o").exists()


def test_wrong_length_labels_are_an_input_error(tmp_path):
    labels = tmp_path / "labels.npy"
    np.save(labels, np.zeros(10, dtype=np.int64))
    result = cli(["shrink", DIGITS, "--budget", "5%", "--calibration", MODELS / "digits.calib.npy",
                  "--labels", labels, "--out", tmp_path / "o"])
    assert result.exit_code == 2
    assert "has 10 labels but" in one_error_line(result)


@pytest.mark.slow
def test_report_and_table_have_local_certificates_and_test_data(tmp_path):
    result = cli(["shrink", DIGITS, "--budget", "5%", "--calibration", MODELS / "digits.calib.npy",
                  "--labels", MODELS / "digits.calib.labels.npy", "--test-data", MODELS / "digits.test.npz",
                  "--test-labels", MODELS / "digits.test.npz", "--certify-radius", "0.02",
                  "--out", tmp_path / "o", "--format", "safetensors"])
    assert result.exit_code == 0, result.output
    local = json.loads((tmp_path / "o" / "report.json").read_text())["pruning"]["local"]
    n = len(np.load(MODELS / "digits.calib.npy"))
    assert local["radius"] == 0.02 and len(local["bounds"]) == n and len(local["top1_certified"]) == n
    assert local["certified_top1"] == sum(local["top1_certified"]) / n
    assert f"top-1 certified unchanged within ε = 0.02 for {local['n_certified']} of {n} points" in result.output
    assert f"; disagreement found (verified) for {local['n_refuted']}; undecided {local['n_undecided']}" in result.output
    assert "test data: max |Δy|" in result.output and "held-out" in result.output
    assert "not a held-out measure" in result.output


def test_min_certified_top1_finds_a_model_that_meets_it():
    model = random_model([6, 16, 16, 4], psi=True, o=0.5, seed=8, weight_scale=1.0)
    x = torch.randn(64, 6, dtype=F64, generator=torch.Generator().manual_seed(8))
    options = ShrinkOptions(min_certified_top1=0.5, certify_radius=0.05)
    pruned, report = prune.prune_to_budget(model, options, calibration=x, search_restarts=4, search_steps=10)
    assert report["local"]["certified_top1"] >= 0.5
    assert pruned.num_params() < report["params_exact"]  # it did prune
    with pytest.raises(IsocompressError, match="cannot be met"):
        prune.prune_to_budget(model, ShrinkOptions(min_certified_top1=1.0, certify_radius=50.0), calibration=x)


def test_recipe_keys_round_trip():
    recipe = parse_recipe_text('min-certified-top1 = "95%"\ncertify-radius = 0.1\ncertify-data = "c.npy"\n'
                               'test-data = "t.npz"\ntest-labels = "t.npz"\n')
    assert recipe.min_certified_top1 == 0.95 and recipe.to_options().certify_radius == 0.1
    again = parse_recipe_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in recipe.to_dict().items()))
    assert again.to_dict() == recipe.to_dict()
    with pytest.raises(IsocompressError, match="'test-labels' needs 'test-data'"):
        parse_recipe_text('budget = 0.1\ntest-labels = "t.npz"\n')


def small_files(tmp_path, radius=0.01):
    """A small classifier with calibration and labelled test files (a check runs a whole shrink)."""
    model = random_model([6, 16, 16, 4], psi=True, o=0.5, seed=8, weight_scale=1.0)
    io.save(model, tmp_path / "m.safetensors")
    gen = np.random.default_rng(0)
    np.save(tmp_path / "c.npy", gen.normal(size=(48, 6)))
    x = gen.normal(size=(40, 6))
    with torch.no_grad():
        y = model(torch.from_numpy(x)).argmax(-1).numpy()
    np.savez(tmp_path / "t.npz", x=x, y=y)
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'budget = 0.5\ncalibration = "c.npy"\ncertify-radius = {radius}\nformats = ["safetensors"]\n')
    return tmp_path / "m.safetensors", recipe


def test_check_min_certified_top1_and_test_accuracy(tmp_path):
    model, recipe = small_files(tmp_path, radius=0.5)
    config = tmp_path / "isocompress.toml"
    config.write_text(f'[[check]]\nmodel = "{model}"\nrecipe = "{recipe}"\nmin-certified-top1 = "100%"\n'
                      f'min-accuracy = 0.5\ntest-data = "{tmp_path / "t.npz"}"\ntest-labels = "{tmp_path / "t.npz"}"\n')
    result = cli(["check", "--config", config, "--json"])
    data = json.loads(result.stdout)
    rows = {r["metric"]: r for r in data}
    assert rows["accuracy"]["passed"] and "40 test inputs" in rows["accuracy"]["note"]
    assert rows["certified-top1"]["measured"] < 1.0
    assert not rows["certified-top1"]["passed"] and result.exit_code == 1


def test_check_flags_min_certified_top1(tmp_path):
    model, recipe = small_files(tmp_path)
    result = cli(["check", model, "--recipe", recipe, "--min-certified-top1", "10%", "--json"])
    data = json.loads(result.stdout)
    assert data[0]["metric"] == "certified-top1" and data[0]["measured"] >= 0.1 and result.exit_code == 0
    result = cli(["check", model, "--min-certified-top1", "10%"])
    assert result.exit_code == 2 and "needs a 'recipe'" in one_error_line(result)
