"""Issue 10: the three-way local verdict (certified / refuted / undecided). The disagreement search finds a verified
counterexample where one must exist, never refutes a certified point, and its results reach report.json and the
table without changing --min-certified-top1."""

import copy
import json

import numpy as np
import pytest
import torch
from conftest import cli, one_error_line
from hypothesis import given, settings
from hypothesis import strategies as st

from isocompress.api.shrink import ShrinkOptions
from isocompress.bounds import local as lb
from isocompress.cli.shrink import local_lines
from isocompress.core.errors import CheckFailed, IsocompressError
from isocompress.core.model import IsoMLP, random_model
from isocompress.exact.constants import remove_all_constant_directions
from isocompress.formats import io
from isocompress.prune import budget as prune

F64 = torch.float64


def shifted(model: IsoMLP, shift: float) -> IsoMLP:
    """The same network with class 0's output raised by `shift`: its boundary moves, its function stays smooth."""
    other = copy.deepcopy(model)
    other.layers[-1].bias[0] += shift
    return other


def gap(model, x):
    """y_1 − y_0 (2 classes): > 0 where class 1 wins."""
    with torch.no_grad():
        y = model(x)
    return y[..., 1] - y[..., 0]


def straddling_balls(model, shift, n=6, seed=0):
    """Centres where both networks say class 0 and radii such that the ball also holds a point where both say class
    1 (y_1 − y_0 > shift, checked here): by continuity the ball must hold a point with 0 < y_1 − y_0 < shift, where
    the original says 1 and the shifted network 0 — a disagreement must exist in every ball."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(400, model.widths[0], dtype=F64, generator=gen)
    centres, far = x[gap(model, x) < -0.5][:n], x[gap(model, x) > shift + 0.5]
    assert len(centres) == n and len(far) > 0
    b = far[torch.cdist(centres, far).argmin(-1)]  # the nearest point where both networks say class 1
    eps = float(torch.linalg.vector_norm(b - centres, dim=-1).max()) * 1.01
    assert bool((gap(shifted(model, shift), centres) < 0).all()) and bool((gap(shifted(model, shift), b) > 0).all())
    return centres, eps


def test_refutation_finds_the_disagreement_that_must_exist():
    model = random_model([3, 8, 6, 2], psi=True, o=0.4, seed=3, weight_scale=2.0)
    centres, eps = straddling_balls(model, 0.3)
    out = lb.disagreement_search(model, shifted(model, 0.3), centres, eps)
    assert bool(out["refuted"].all()), out["refuted"]
    # the witnesses are real: inside the ball, and the two top-1 classes differ there
    x = out["counterexample"]
    assert bool((torch.linalg.vector_norm(x - centres, dim=-1) <= eps).all())
    g = gap(model, x)
    assert bool(((g > 0) & (g < 0.3)).all())
    assert out["classes"].tolist() == [[1, 0]] * len(centres)


def test_identical_networks_are_never_refuted():
    model = random_model([4, 10, 8, 3], psi=True, o=0.2, seed=2, weight_scale=2.0)
    x = torch.randn(16, 4, dtype=F64, generator=torch.Generator().manual_seed(2))
    out = lb.disagreement_search(model, copy.deepcopy(model), x, 2.0)
    assert not bool(out["refuted"].any())
    assert bool(out["counterexample"].isnan().all()) and bool((out["classes"] == -1).all())


def test_a_hit_outside_the_ball_or_a_tie_is_not_a_witness():
    y = torch.tensor([[1.0, 1.0, 0.0], [2.0, 1.0, 0.0]], dtype=F64)
    y2 = torch.tensor([[0.0, 1.0, 0.0], [1.0, 2.0, 0.0]], dtype=F64)
    assert lb.verdicts(y, y2)[2].tolist() == [False, True]  # a tie at the top of y is no disagreement
    model = random_model([3, 8, 6, 2], psi=True, o=0.4, seed=3, weight_scale=2.0)
    centres, eps = straddling_balls(model, 0.3)
    found = lb.disagreement_search(model, shifted(model, 0.3), centres, eps)["counterexample"]
    out = lb._verify(model, shifted(model, 0.3), centres, 0.5 * float(torch.linalg.vector_norm(
        found - centres, dim=-1).min()), found, torch.ones(len(centres), dtype=torch.bool))
    assert not bool(out["refuted"].any())  # every witness is outside the smaller ball: none is accepted


@settings(max_examples=10, deadline=None)
@given(st.lists(st.integers(2, 8), min_size=3, max_size=4), st.booleans(), st.floats(0.0, 2.0),
       st.sampled_from([0.2, 0.6]), st.sampled_from([0.01, 0.1, 0.5]), st.integers(0, 50))
def test_certified_points_are_never_refuted_on_random_networks(widths, psi, o, share, eps, seed):
    """Every point searched (certified ones too): a certified point with a verified counterexample is unsound."""
    model = random_model(widths + [3], psi=psi, o=o, seed=seed, weight_scale=1.5)
    x = torch.randn(12, widths[0], dtype=F64, generator=torch.Generator().manual_seed(seed))
    state = prune.State.of(remove_all_constant_directions(model))
    smallest, exact = prune.smallest_params(state), prune.current_params(state)
    state = prune.prune_to_target(state, max(int(smallest + share * (exact - smallest)), smallest), "data-aware", x,
                                  float(x.norm(dim=-1).max()))
    cert = prune.local_certificates(state, x, eps)
    pruned = prune.materialize(state)
    out = lb.disagreement_search(IsoMLP(state.layers), pruned, x, eps, starts=6, steps=20, verify=(model, pruned))
    assert not bool((cert["top1"] & out["refuted"]).any())
    prune.check_verdicts(cert["top1"], out["refuted"])


def test_a_certified_and_refuted_point_is_an_internal_error():
    with pytest.raises(CheckFailed, match="internal error: 1 point"):
        prune.check_verdicts(torch.tensor([True, False]), torch.tensor([True, False]))
    prune.check_verdicts(torch.tensor([True, False]), torch.tensor([False, True]))


def three_way(model, x, options):
    pruned, report = prune.prune_to_budget(model, options, calibration=x, search_restarts=4, search_steps=10)
    local = report["local"]
    n = len(x)
    assert len(local["refuted"]) == n and len(local["top1_certified"]) == n and len(local["bounds"]) == n
    assert local["n_refuted"] == sum(local["refuted"]) and local["refuted_fraction"] == local["n_refuted"] / n
    assert local["n_certified"] + local["n_refuted"] + local["n_undecided"] == n
    assert abs(local["certified_top1"] + local["refuted_fraction"] + local["undecided_fraction"] - 1) < 1e-12
    assert not any(c and r for c, r in zip(local["top1_certified"], local["refuted"]))
    assert local["refutation"]["starts"] == lb.DISAGREE_STARTS and local["refutation"]["steps"] == lb.DISAGREE_STEPS
    assert "verified" in local["refutation"]["note"] and "NOT unchanged" in local["refutation"]["note"]
    return pruned, local


def test_report_has_the_three_way_verdict_and_its_witnesses_check_out():
    model = random_model([6, 16, 16, 4], psi=True, o=0.5, seed=8, weight_scale=2.0)
    x = torch.randn(48, 6, dtype=F64, generator=torch.Generator().manual_seed(8))
    pruned, local = three_way(model, x, ShrinkOptions(budget=0.2, certify_radius=0.5))
    assert local["n_refuted"] > 0 and local["counterexamples"]  # the check below has something to check
    for c in local["counterexamples"]:
        w = torch.tensor(c["x"], dtype=F64)
        assert float(torch.linalg.vector_norm(w - x[c["point"]])) <= local["radius"]
        with torch.no_grad():
            assert int(model(w[None]).argmax()) == c["original_class"] != int(pruned(w[None]).argmax()) \
                == c["pruned_class"]
    line = local_lines(local, None)[0]
    assert (f"for {local['n_certified']} of 48 points; disagreement found (verified) for {local['n_refuted']};"
            f" undecided {local['n_undecided']}") in line


def test_min_certified_top1_is_unchanged_by_the_search(monkeypatch):
    """The search only adds verdicts: the same model, certificates and limit check with it as without it."""
    model = random_model([6, 16, 16, 4], psi=True, o=0.5, seed=8, weight_scale=1.0)
    x = torch.randn(64, 6, dtype=F64, generator=torch.Generator().manual_seed(8))
    options = ShrinkOptions(min_certified_top1=0.5, certify_radius=0.05)
    pruned, local = three_way(model, x, options)
    assert local["certified_top1"] >= 0.5
    monkeypatch.setattr(prune, "refutation_report", lambda *args, **kwargs: {})
    alone, report = prune.prune_to_budget(model, options, calibration=x, search_restarts=4, search_steps=10)
    assert alone.num_params() == pruned.num_params() < report["params_exact"]
    assert report["local"]["top1_certified"] == local["top1_certified"] and report["local"]["bounds"] == local["bounds"]
    with pytest.raises(IsocompressError, match="cannot be met"):  # the unreachable limit: still a user error
        prune.prune_to_budget(model, ShrinkOptions(min_certified_top1=1.0, certify_radius=50.0), calibration=x)


def test_regression_outputs_have_no_verdict():
    model = random_model([4, 8, 1], o=0.3, seed=1)
    x = torch.randn(16, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    _, report = prune.prune_to_budget(model, ShrinkOptions(budget=0.5, certify_radius=0.1), calibration=x,
                                      search_restarts=2, search_steps=5)
    assert report["local"]["certified_top1"] is None and "refuted" not in report["local"]


def test_cli_min_certified_top1_exit_codes_are_unchanged(tmp_path):
    """Met: exit 0 and the table line with all three verdicts; unreachable: one line, exit 2, nothing written."""
    model = random_model([6, 16, 16, 4], psi=True, o=0.5, seed=8, weight_scale=1.0)
    x = torch.randn(64, 6, dtype=F64, generator=torch.Generator().manual_seed(8))
    io.save(model, tmp_path / "m.pt")
    np.save(tmp_path / "c.npy", x.numpy())
    args = ["shrink", tmp_path / "m.pt", "--calibration", tmp_path / "c.npy", "--certify-radius", "0.05"]
    result = cli(args + ["--min-certified-top1", "50%", "--out", tmp_path / "ok"])
    assert result.exit_code == 0, result.output
    local = json.loads((tmp_path / "ok" / "report.json").read_text())["pruning"]["local"]
    assert local["certified_top1"] >= 0.5 and len(local["refuted"]) == 64
    assert (f"for {local['n_certified']} of 64 points; disagreement found (verified) for {local['n_refuted']};"
            f" undecided {local['n_undecided']}") in result.output
    result = cli(["shrink", tmp_path / "m.pt", "--calibration", tmp_path / "c.npy", "--certify-radius", "50",
                  "--min-certified-top1", "100%", "--out", tmp_path / "no"])
    assert result.exit_code == 2 and "cannot be met" in one_error_line(result)
    assert not (tmp_path / "no").exists()
