"""Recipes (issue 5): parsing and validation naming the key, JSON/TOML round trips, ShrinkOptions, `shrink --recipe`
with flags overriding the recipe, and the effective recipe in report.json."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from isocompress.api.recipe import Recipe, load_recipe, parse_recipe_text
from isocompress.api.shrink import ShrinkOptions
from isocompress.cli import main
from isocompress.core.errors import IsocompressError
from isocompress.core.model import random_model
from isocompress.formats import io

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def test_shipped_recipes():
    recipes = {p.stem: load_recipe(p) for p in RECIPES.glob("*.toml")}
    assert {"exact", "edge-10pct", "max-error-1pct"} <= set(recipes)
    for stem, recipe in recipes.items():
        assert recipe.name == stem and recipe.version and recipe.description
        assert Recipe.from_dict(recipe.to_dict(), path=recipe.path) == recipe
    exact, edge, one = recipes["exact"].to_options(), recipes["edge-10pct"].to_options(), recipes["max-error-1pct"].to_options()
    assert not exact.lossy and exact.formats == ("safetensors", "onnx")
    assert edge.budget == pytest.approx(0.1) and edge.formats == ("onnx",) and edge.dtype == "float32"
    assert one.max_error_relative == pytest.approx(0.01) and one.budget is None and one.max_error is None


def test_goals():
    assert parse_recipe_text("").exact  # nothing given: lossless
    assert parse_recipe_text("exact = true").exact
    assert parse_recipe_text('budget = "5%"').budget == pytest.approx(0.05)
    assert parse_recipe_text("budget = 20_000").budget == 20000
    assert parse_recipe_text("max-error = 0.05").max_error == 0.05
    assert parse_recipe_text('max-error = "0.5%"').max_error_percent == 0.5


@pytest.mark.parametrize("text, message", [
    ("max_error = 0.1", "unknown key 'max_error'; did you mean 'max-error'?"),
    ("bugdet = 0.1", "unknown key 'bugdet'; did you mean 'budget'?"),
    ("[extra]\nx = 1", "unknown key 'extra'"),
    ("budget = 0.1\nmax-error = 0.1", "'max-error' cannot be combined with 'budget'"),
    ("exact = true\nbudget = 0.1", "'budget' cannot be combined with 'exact = true'"),
    ("exact = false", "'exact' is false but there is no 'budget', 'max-error'"),
    ('exact = "yes"', "'exact' is 'yes'; use true or false"),
    ("budget = 0", "'budget' is 0; it must be positive"),
    ("budget = 1.5", "'budget' is 1.5; above 1 it is a parameter count"),
    ('budget = "ten"', "'budget' is 'ten'"),
    ("budget = true", "'budget' is a bool"),
    ("max-error = -1", "'max-error' is -1"),
    ('max-error = "x%"', "'max-error' is 'x%'"),
    ('basis = "random"', "'basis' is 'random'; choose one of auto, data-free, data-aware"),
    ('formats = ["onnx", "tflite"]', "'formats' is 'tflite'; choose one of safetensors, onnx"),
    ("formats = []", "'formats' is []"),
    ('formats = ["onnx", "onnx"]', "'formats' lists a format twice"),
    ("onnx-tol = 0", "'onnx-tol' is 0; it must be a positive finite number"),
    ("input-radius = -2.0", "'input-radius' is -2.0"),
    ('dtype = "int8"', "'dtype' is 'int8'; choose one of float32"),
    ("version = [1]", "'version' is [1]"),
    ("name = 3", "'name' is 3"),
    ('labels = "l.npy"', "'labels' needs 'calibration'"),
    ("budget = ", "not valid TOML"),
])
def test_bad_recipes_name_the_file_and_the_key(text, message):
    with pytest.raises(IsocompressError, match=re.escape(message)) as info:
        parse_recipe_text(text, "recipes/mine.toml")
    assert str(info.value).startswith("recipes/mine.toml: ") and "\n" not in str(info.value)


def test_recipe_files_errors(tmp_path):
    with pytest.raises(IsocompressError, match="no such file"):
        load_recipe(tmp_path / "absent.toml")
    (tmp_path / "latin1.toml").write_bytes(b'name = "caf\xe9"\n')
    with pytest.raises(IsocompressError, match="latin1.toml: is not UTF-8 text"):
        load_recipe(tmp_path / "latin1.toml")
    with pytest.raises(IsocompressError, match="is a directory"):
        load_recipe(tmp_path)


def test_name_defaults_to_the_file_stem_and_paths_are_relative_to_the_recipe(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "mine.toml"
    path.write_text('calibration = "../data/x.npy"\nbudget = 0.5\n')
    recipe = load_recipe(path)
    assert recipe.name == "mine" and recipe.version == "1"
    assert recipe.calibration == str(tmp_path / "data" / "x.npy")


recipe_dicts = st.fixed_dictionaries({}, optional={
    "name": st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=20).filter(str.strip),
    "version": st.one_of(st.integers(0, 10**6), st.from_regex(r"[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}", fullmatch=True)),
    "description": st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=40),
    "goal": st.one_of(st.none(), st.floats(1e-6, 1.0).map(lambda b: ("budget", b)),
                      st.integers(2, 10**9).map(lambda b: ("budget", b)),
                      st.floats(0, 1e6).map(lambda e: ("max-error", e)),
                      st.floats(0, 100).map(lambda p: ("max-error", f"{p!r}%"))),
    "basis": st.sampled_from(["auto", "data-free", "data-aware"]),
    "input-radius": st.floats(1e-6, 1e6),
    "formats": st.sampled_from([["safetensors"], ["onnx"], ["onnx", "safetensors"]]),
    "onnx-tol": st.floats(1e-12, 1.0),
    "dtype": st.sampled_from(["float32", "float64", "float16", "bfloat16"]),
})


@settings(max_examples=150, deadline=None, derandomize=True)
@given(recipe_dicts)
def test_valid_recipes_round_trip(data):
    goal = data.pop("goal", None)
    if goal is not None:
        data[goal[0]] = goal[1]
    recipe = Recipe.from_dict(data, default_name="r")
    again = Recipe.from_dict(json.loads(json.dumps(recipe.to_dict())))
    assert again == recipe
    assert again.to_options() == recipe.to_options()
    assert isinstance(recipe.to_options(), ShrinkOptions)


def test_shrink_options_validate_the_new_goal():
    assert ShrinkOptions(max_error_relative=0.01).lossy
    for bad in ({"max_error_relative": -0.1}, {"max_error_relative": 0.1, "budget": 0.5},
                {"budget": float("inf")}, {"budget": 2.5}, {"max_error": float("nan")}):
        with pytest.raises(IsocompressError):
            ShrinkOptions(**bad)


# --- shrink --recipe -------------------------------------------------------------------------------------------
@pytest.fixture
def small(tmp_path):
    model = random_model([6, 16, 16, 3], psi=True, o=(0.0, 1.0), seed=5)
    io.save(model, tmp_path / "small.pt", dtype=torch.float32)
    np.save(tmp_path / "calib.npy", np.random.default_rng(1).normal(size=(64, 6)))
    return tmp_path


def shrink(*args):
    return CliRunner().invoke(main, ["shrink", *map(str, args), "--quiet"], catch_exceptions=False)


def test_shrink_with_a_recipe_records_it(small):
    recipe = small / "half.toml"
    recipe.write_text('name = "half"\nversion = "2.1"\nbudget = "50%"\nformats = ["safetensors"]\n'
                      'calibration = "calib.npy"\n')
    result = shrink(small / "small.pt", "--recipe", recipe, "--out", small / "out")
    assert result.exit_code == 0, result.output
    report = json.loads((small / "out" / "report.json").read_text())
    assert report["recipe"]["name"] == "half" and report["recipe"]["version"] == "2.1"
    assert report["recipe"]["path"] == str(recipe) and report["recipe"]["overridden"] == []
    assert report["recipe"]["budget"] == 0.5 and report["recipe"]["calibration"] == str(small / "calib.npy")
    assert report["exact"] is False and report["params_after"] <= 0.5 * report["params_before"]
    assert report["pruning"]["basis"] == "data-aware"  # calibration from the recipe, relative to the recipe file
    assert set(report["files"]) == {"safetensors"}


def test_flags_override_the_recipe(small):
    result = shrink(small / "small.pt", "--recipe", RECIPES / "edge-10pct.toml", "--exact", "--format", "safetensors",
                    "--dtype", "float64", "--out", small / "out")
    assert result.exit_code == 0, result.output
    report = json.loads((small / "out" / "report.json").read_text())
    assert report["exact"] is True and report["recipe"]["budget"] is None
    assert report["recipe"]["name"] == "edge-10pct"
    assert report["recipe"]["overridden"] == ["dtype", "exact", "formats"]
    assert report["recipe"]["formats"] == ["safetensors"] and report["dtype_saved"] == "float64"


def test_relative_max_error_flag(small):
    result = shrink(small / "small.pt", "--max-error", "5%", "--calibration", small / "calib.npy", "--format",
                    "safetensors", "--out", small / "out")
    assert result.exit_code == 0, result.output
    report = json.loads((small / "out" / "report.json").read_text())
    resolved = report["pruning"]["max_error_resolved"]
    assert resolved["relative"] == pytest.approx(0.05)
    assert resolved["absolute"] == pytest.approx(0.05 * resolved["output_scale"])
    assert resolved["output_scale"] == pytest.approx(report["probe"]["float64"]["max_norm_reference"])
    assert report["pruning"]["certified"]["max_abs"] <= resolved["absolute"]


@pytest.mark.parametrize("args, message", [
    (["--recipe", "absent.toml"], "absent.toml: no such file; expected a recipe"),
    (["--recipe", "bad.toml"], "bad.toml: unknown key 'size'"),
    (["--max-error", "lots"], "--max-error is 'lots'"),
    (["--format", "onnx,tflite"], "--format is 'tflite'"),
])
def test_shrink_recipe_errors(small, monkeypatch, args, message):
    monkeypatch.chdir(small)
    (small / "bad.toml").write_text("size = 3\n")
    result = CliRunner().invoke(main, ["shrink", "small.pt", "--out", "out", *args])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and message in result.stderr
    assert not (small / "out").exists()
