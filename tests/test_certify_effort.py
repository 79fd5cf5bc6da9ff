"""--certify-effort fast|normal|thorough: the CLI flag, the recipe and [[check]] key, ShrinkOptions, and what each
level does to report.json's local certificates (docs/bounds.md §8.6)."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from isocompress.api.recipe import parse_recipe_text
from isocompress.api.shrink import ShrinkOptions
from isocompress.check.config import CheckSpec
from isocompress.cli import main
from isocompress.core.errors import IsocompressError
from isocompress.core.model import random_model
from isocompress.formats import io


def test_options_recipe_and_check_take_the_effort_and_refuse_others():
    assert ShrinkOptions(budget=0.5).certify_effort == "normal"
    with pytest.raises(IsocompressError, match="certify effort 'hard'"):
        ShrinkOptions(budget=0.5, certify_effort="hard")
    recipe = parse_recipe_text('name = "r"\nbudget = 0.5\ncertify-effort = "thorough"\n')
    assert recipe.to_options().certify_effort == "thorough"
    assert recipe.to_dict()["certify-effort"] == "thorough"
    assert parse_recipe_text('name = "r"\nbudget = 0.5\n').to_options().certify_effort == "normal"
    with pytest.raises(IsocompressError, match="certify-effort"):
        parse_recipe_text('name = "r"\nbudget = 0.5\ncertify-effort = "max"\n')
    spec = CheckSpec.from_dict({"model": "m.pt", "recipe": "r.toml", "max-params": 10, "certify-effort": "fast"})
    assert spec.certify_effort == "fast" and CheckSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(IsocompressError, match="certify-effort"):
        CheckSpec.from_dict({"model": "m.pt", "max-params": 10, "certify-effort": "fast"})  # no recipe
    with pytest.raises(IsocompressError, match="certify-effort"):
        CheckSpec.from_dict({"model": "m.pt", "recipe": "r.toml", "max-params": 10, "certify-effort": "slow"})


@pytest.fixture
def classifier(tmp_path):
    path = tmp_path / "m.pt"
    io.save(random_model([6, 24, 24, 4], psi=True, o=0.5, seed=5, weight_scale=1.5), path, dtype=torch.float64)
    x = np.random.default_rng(5).normal(size=(48, 6))
    np.save(tmp_path / "x.npy", x)
    return path, tmp_path / "x.npy"


def test_cli_effort_reaches_the_report(tmp_path, classifier):
    """fast refines nothing; thorough may only certify more points than fast, never fewer, and reports its pieces;
    the three verdicts always add up."""
    model, x = classifier
    reports = {}
    for effort in ("fast", "thorough"):
        out = tmp_path / effort
        result = CliRunner().invoke(main, ["shrink", str(model), "--budget", "0.5", "--calibration", str(x),
                                           "--certify-radius", "0.3", "--certify-effort", effort, "--quiet",
                                           "--out", str(out)], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        reports[effort] = json.loads((out / "report.json").read_text())["pruning"]["local"]
    fast, thorough = reports["fast"], reports["thorough"]
    assert fast["certify_effort"] == "fast" and fast["refinement"]["pieces"] == 0
    assert thorough["refinement"]["effort"] == "thorough"
    assert thorough["n_certified"] >= fast["n_certified"]
    for rep in (fast, thorough):
        assert rep["n_certified"] + rep["n_refuted"] + rep["n_undecided"] == rep["n_points"]
        assert len(rep["undecided_gaps"]) == rep["n_undecided"]
    if fast["n_undecided"]:
        assert thorough["refinement"]["pieces"] > 0
    bad = CliRunner().invoke(main, ["shrink", str(model), "--budget", "0.5", "--certify-effort", "max"])
    assert bad.exit_code == 2 and "certify-effort" in bad.output
