"""The user-facing side of local certificates: input holes in --certify-data and --certify-radius (each one line,
exit 2, naming the option and the fix), the prune progress line, labelled test files, radius lists and their curve."""

import io as text_io
import json
import re

import numpy as np
import pytest
import torch
from conftest import cli, one_error_line
from hypothesis import given, settings
from hypothesis import strategies as st

from isocompress.api.shrink import ShrinkOptions
from isocompress.core.errors import IsocompressError
from isocompress.core.model import random_model
from isocompress.core.progress import progress_bar
from isocompress.formats import io
from isocompress.prune import budget as prune

F64 = torch.float64


@pytest.fixture
def small(tmp_path):
    """A small tanh classifier (6 → 16 → 16 → 4) with calibration inputs, and its file paths."""
    model = random_model([6, 16, 16, 4], psi=True, o=0.5, seed=8, weight_scale=1.0)
    io.save(model, tmp_path / "m.pt")
    x = np.random.default_rng(0).normal(size=(48, 6))
    np.save(tmp_path / "c.npy", x)
    return model, torch.from_numpy(x), tmp_path


def shrink(small, *args):
    _, _, tmp = small
    return cli(["shrink", tmp / "m.pt", "--calibration", tmp / "c.npy", "--out", tmp / "out",
                "--format", "safetensors", *args])


# --- holes -------------------------------------------------------------------------------------------------------
def test_all_zero_certify_points_with_the_default_radius_are_refused(small):
    _, _, tmp = small
    np.save(tmp / "zeros.npy", np.zeros((5, 6)))
    result = shrink(small, "--budget", "50%", "--certify-data", tmp / "zeros.npy")
    assert result.exit_code == 2
    line = one_error_line(result)
    assert "--certify-radius 1% (the default)" in line and "median input norm of the certify data" in line
    assert "which is 0" in line and "give --certify-radius EPS as an absolute radius" in line
    assert not (tmp / "out").exists()
    # a percentage given explicitly fails the same way; an absolute radius works on the same points
    assert "--certify-radius 2% is a share" in one_error_line(
        shrink(small, "--budget", "50%", "--certify-data", tmp / "zeros.npy", "--certify-radius", "2%"))
    ok = shrink(small, "--budget", "50%", "--certify-data", tmp / "zeros.npy", "--certify-radius", "0.1", "--json")
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["pruning"]["local"]["radius"] == 0.1


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_in_certify_data_names_the_file_and_the_data(small, bad):
    _, x, tmp = small
    dirty = x.numpy().copy()
    dirty[3, 2] = bad
    np.save(tmp / "dirty.npy", dirty)
    line = one_error_line(shrink(small, "--budget", "50%", "--certify-data", tmp / "dirty.npy"))
    assert line.endswith("dirty.npy: contains NaN or Inf; clean the certify data (--certify-data)"), line
    np.save(tmp / "c.npy", dirty)  # the calibration file: its own name
    assert one_error_line(shrink(small, "--budget", "50%")).endswith("c.npy: contains NaN or Inf; clean the"
                                                                     " calibration data")


def test_a_1d_array_is_refused_as_certify_data_and_as_calibration(small):
    _, x, tmp = small
    np.save(tmp / "one.npy", x[0].numpy())
    result = shrink(small, "--budget", "50%", "--certify-data", tmp / "one.npy")
    assert result.exit_code == 2
    line = one_error_line(result)
    assert "one.npy: has shape (6,), a 1-D array; certify data (--certify-data) must be 2-D" in line
    assert "save x[None, :]" in line
    result = cli(["shrink", tmp / "m.pt", "--calibration", tmp / "one.npy", "--budget", "50%", "--out", tmp / "o"])
    assert result.exit_code == 2 and "a 1-D array; calibration data must be 2-D" in one_error_line(result)
    np.save(tmp / "row.npy", x[:1].numpy())  # the fix the message names works
    assert shrink(small, "--budget", "50%", "--certify-data", tmp / "row.npy").exit_code == 0


def test_certify_data_or_radius_without_a_goal_is_a_usage_error(small):
    _, _, tmp = small
    for args, flag in [(["--certify-data", tmp / "c.npy"], "--certify-data"), (["--certify-radius", "0.1"],
                                                                             "--certify-radius")]:
        for goal in ([], ["--exact"]):
            result = shrink(small, *args, *goal)
            assert result.exit_code == 2, result.output
            line = one_error_line(result)
            assert f"{flag} needs a lossy goal" in line and "nothing to certify" in line
        assert not (tmp / "out").exists()
    recipe = tmp / "r.toml"
    recipe.write_text('certify-data = "c.npy"\n')
    line = one_error_line(cli(["shrink", tmp / "m.pt", "--recipe", recipe, "--out", tmp / "out"]))
    assert "r.toml: 'certify-data' needs a lossy goal" in line
    from isocompress.api.shrink import shrink_file

    with pytest.raises(IsocompressError, match="--certify-data needs a lossy goal"):
        shrink_file(tmp / "m.pt", tmp / "out", ShrinkOptions(), certify_data=tmp / "c.npy", progress=False)
    with pytest.raises(IsocompressError, match="certify radius: needs a lossy goal"):
        ShrinkOptions(certify_radius=0.1)


# --- the progress line -------------------------------------------------------------------------------------------
def test_a_progress_line_never_counts_past_its_total():
    out = text_io.StringIO()
    with progress_bar(10, "prune", enabled=True, stream=out, unit="parameter") as step:
        step("a", 4)
        step("b", 14)  # the last removal saved more than was left
    assert re.match(r"prune: 10/10 parameters \(100%\), b, ", out.getvalue().splitlines()[-1]), out.getvalue()


@pytest.mark.parametrize("budget", [0.3, 0.2])
def test_the_prune_progress_stays_within_its_total_and_the_budget_is_not_overshot(capsys, budget):
    """On this network one removal round's per-direction savings were a far underestimate (a layer turning diagonal):
    a 30% budget landed at 9% (67 of 750 parameters) and the line counted past its total."""
    model = random_model([24, 24, 24, 4], seed=1)
    pruned, report = prune.prune_to_budget(model, ShrinkOptions(budget=budget), progress=True, search_restarts=1,
                                           search_steps=1)
    lines = capsys.readouterr().err.splitlines()
    parsed = [re.fullmatch(r"prune: ([\d,]+)/([\d,]+) parameters .*", line) for line in lines]
    assert parsed and all(parsed), lines
    assert all(int(m.group(1).replace(",", "")) <= int(m.group(2).replace(",", "")) for m in parsed), lines
    assert 0.9 * report["target"] <= pruned.num_params() <= report["target"], (pruned.num_params(), report["target"])


# --- a test file holding x and y ---------------------------------------------------------------------------------
def labelled_test_files(small):
    """T.npz holding x and y (y: the model's own classes, a few flipped so that accuracy is not 100%) and X.npz holding
    only x."""
    model, _, tmp = small
    x = np.random.default_rng(1).normal(size=(40, 6))
    with torch.no_grad():
        y = model(torch.from_numpy(x)).argmax(-1).numpy()
    y[:4] = (y[:4] + 1) % 4
    np.savez(tmp / "t.npz", x=x, y=y)
    np.savez(tmp / "xonly.npz", x=x)
    return tmp / "t.npz", tmp / "xonly.npz"


def test_test_data_holding_x_and_y_reports_accuracy(small):
    with_y, x_only = labelled_test_files(small)
    result = shrink(small, "--budget", "50%", "--test-data", with_y, "--json")
    assert result.exit_code == 0, result.output
    test = json.loads(result.stdout)["pruning"]["test"]
    explicit = json.loads(shrink(small, "--budget", "50%", "--test-data", with_y, "--test-labels", with_y,
                                 "--json").stdout)["pruning"]["test"]
    assert test == explicit and test["accuracy_before"] == 0.9  # 36 of 40 labels are the model's own classes
    alone = json.loads(shrink(small, "--budget", "50%", "--test-data", x_only, "--json").stdout)["pruning"]["test"]
    assert "accuracy_before" not in alone and "top1_agreement" in alone


def test_check_reads_the_labels_of_a_test_file(small):
    _, _, tmp = small
    with_y, x_only = labelled_test_files(small)
    result = cli(["check", tmp / "m.pt", "--test-data", with_y, "--min-accuracy", "90%", "--json"])
    assert result.exit_code == 0, result.output
    assert [(r["metric"], r["measured"]) for r in json.loads(result.stdout)] == [("accuracy", 0.9)]
    result = cli(["check", tmp / "m.pt", "--test-data", x_only, "--min-accuracy", "90%"])
    assert result.exit_code == 2
    assert "--min-accuracy needs labels" in one_error_line(result) and "xonly.npz holds none" in one_error_line(result)
    (tmp / "r.toml").write_text('budget = 0.5\ncalibration = "c.npy"\ntest-data = "t.npz"\nformats = ["safetensors"]\n')
    (tmp / "isocompress.toml").write_text('[[check]]\nmodel = "m.pt"\nrecipe = "r.toml"\nmin-accuracy = "80%"\n'
                                          'test-data = "t.npz"\n')
    result = cli(["check", "--config", tmp / "isocompress.toml", "--json"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)[0]
    assert row["metric"] == "accuracy" and "on 40 test inputs" in row["note"] and 0.8 <= row["measured"] <= 1


# --- several radii: the curve ------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, message", [
    ("1%,x", "has 'x', which is not a number"), ("0", "has 0.0; a radius must be a positive finite number"),
    ("1%,,2%", "has an empty entry"), ("1%,1%", "lists a radius twice"), ("-2%", "a percentage radius must be above"),
    ("nan", "a radius must be a positive finite number"), ("5%%", "write a percentage like '10%'"),
])
def test_certify_radius_parse_errors_are_one_line(small, text, message):
    result = shrink(small, "--budget", "50%", "--certify-radius", text)
    assert result.exit_code == 2
    line = one_error_line(result)
    assert line.startswith("isocompress: error: --certify-radius ") and message in line, line


def test_recipes_take_a_radius_string_or_list_and_round_trip():
    import json as j

    from isocompress.api.recipe import parse_recipe_text

    for text, value in [('"0.5%,1%,2%"', ("0.5%", "1%", "2%")), ('["1%", 0.2]', ("1%", 0.2)), ('"3%"', "3%"),
                        ("0.1", 0.1), ('["0.1"]', 0.1)]:
        recipe = parse_recipe_text(f"budget = 0.5\ncertify-radius = {text}\n")
        assert recipe.certify_radius == value and recipe.to_options().certify_radius == value
        again = parse_recipe_text("\n".join(f"{k} = {j.dumps(v)}" for k, v in recipe.to_dict().items()))
        assert again.to_dict() == recipe.to_dict()
    for text, message in [("[[0.1]]", "not nested lists"), ('"1%,abc"', "'abc', which is not a number"),
                          ("[]", "give at least one radius"), ("true", "a radius must be a positive")]:
        with pytest.raises(IsocompressError, match=re.escape(message)):
            parse_recipe_text(f"budget = 0.5\ncertify-radius = {text}\n", where="r.toml")


@pytest.mark.parametrize("effort", ["fast", "thorough"])  # the efforts without a time cap: deterministic
def test_the_curve_is_the_single_radius_run_at_each_radius(small, effort):
    """Every entry of the curve equals what a run with that one radius reports (counts, shares, radius, bounds)."""
    model = random_model([6, 16, 16, 4], psi=True, o=0.5, seed=8, weight_scale=2.0)
    x = torch.randn(48, 6, dtype=F64, generator=torch.Generator().manual_seed(8))
    radii = ("5%", 0.25, "20%", "40%")
    _, report = prune.prune_to_budget(model, ShrinkOptions(budget=0.2, certify_radius=radii, certify_effort=effort),
                                      calibration=x, search_restarts=2, search_steps=5)
    curve = report["local"]["curve"]
    median = float(torch.linalg.vector_norm(x, dim=-1).median())
    assert [e["radius_given"] for e in curve] == list(radii)
    assert report["local"]["radius"] == curve[0]["radius"] == pytest.approx(0.05 * median, rel=1e-12)
    for entry, spec in zip(curve, radii):
        _, alone = prune.prune_to_budget(model, ShrinkOptions(budget=0.2, certify_radius=spec, certify_effort=effort),
                                         calibration=x, search_restarts=2, search_steps=5)
        assert alone["constant_directions"]["bound"] == report["constant_directions"]["bound"]  # the same allowance D
        one = alone["local"]
        assert "curve" not in one and entry["radius"] == one["radius"] and entry["radius_source"] == one["radius_source"]
        assert (entry["n_certified"], entry["n_refuted"], entry["n_undecided"]) == \
            (one["n_certified"], one["n_refuted"], one["n_undecided"])
        assert entry["certified_fraction"] == one["certified_top1"] and entry["refuted_fraction"] == \
            one["refuted_fraction"] and entry["undecided_fraction"] == one["undecided_fraction"]
        assert entry["bound_median"] == one["summary"]["bound_median"]
        assert entry["radius_relative"] == pytest.approx(entry["radius"] / median, rel=1e-12)
    # the radii were chosen to show all three verdicts: the equalities above compared non-trivial counts
    assert len({e["n_certified"] for e in curve}) >= 3 and any(e["n_refuted"] for e in curve) and \
        any(e["n_undecided"] for e in curve)


def test_cli_prints_the_curve_and_plots_it(small):
    _, _, tmp = small
    result = shrink(small, "--budget", "50%", "--certify-radius", "5%,40%", "--plot", tmp / "curve.png")
    assert result.exit_code == 0, result.output
    curve = json.loads((tmp / "out" / "report.json").read_text())["pruning"]["local"]["curve"]
    assert "against ε (48 points): certified / refuted (verified) / undecided" in result.output
    for e in curve:
        assert re.search(rf"ε = {e['radius']:.4g}\s+\({e['radius_given']}\)\s+{100 * e['certified_fraction']:.1f}% /"
                         rf" +{100 * e['refuted_fraction']:.1f}% / +{100 * e['undecided_fraction']:.1f}%",
                         result.output), result.output
    assert (tmp / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"wrote {tmp / 'curve.png'}" in result.output
    assert not list(tmp.glob("*.tmp*")) and not list(tmp.glob(".curve*"))  # written atomically: no stray temp file


@pytest.mark.parametrize("args, message", [
    (["--budget", "50%", "--plot", "{tmp}/curve.txt"], "--plot writes a PNG"),
    (["--budget", "50%", "--plot", "{tmp}/no/such/dir/c.png"], "does not exist; create it"),
    (["--exact", "--plot", "{tmp}/c.png"], "--plot draws the local certificates against ε; they need a lossy goal"),
])
def test_bad_plot_requests_fail_before_any_work(small, args, message):
    _, _, tmp = small
    result = shrink(small, *[a.format(tmp=tmp) for a in args])
    assert result.exit_code == 2 and message in one_error_line(result)
    assert not (tmp / "out").exists()


def test_a_plot_without_points_to_certify_fails_before_any_work(small):
    _, _, tmp = small
    result = cli(["shrink", tmp / "m.pt", "--budget", "50%", "--plot", tmp / "c.png", "--out", tmp / "out"])
    assert result.exit_code == 2 and "and --calibration or --certify-data" in one_error_line(result)
    assert not (tmp / "out").exists() and not (tmp / "c.png").exists()


values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
                      lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                   max_size=3), max_leaves=8)


@given(values)
@settings(max_examples=300, deadline=None)
def test_radius_and_sweep_parsers_accept_or_fail_cleanly(value):
    """Any value: a parsed radius (positive, finite; a "p%" string with p > 0) or one IsocompressError, never another
    exception; the same for a [sweep] table holding it."""
    import math

    from isocompress.api.recipe import parse_sweep_table
    from isocompress.core.parsing import parse_radii

    try:
        parsed = parse_radii(value, "r.toml")
    except IsocompressError:
        pass
    else:
        for r in parsed if isinstance(parsed, tuple) else (parsed,):
            number = float(r[:-1]) if isinstance(r, str) else r
            assert isinstance(r, (str, float)) and 0 < number < math.inf
    for key in ("budgets", "max-bytes", "min-accuracy", "max-params", "min-certified-top1"):
        try:
            parse_sweep_table({key: value, "max-params": 5} if key != "max-params" else {key: value}, "r.toml")
        except IsocompressError:
            pass
