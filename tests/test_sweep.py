"""`isocompress sweep` and `isocompress.sweep`: one row per budget with what `shrink --budget` gives at it, the
smallest model meeting every limit marked, the same limits as a recipe's [sweep] goal (shrink and check)."""

import json

import numpy as np
import pytest
import torch
from conftest import cli, one_error_line

import isocompress
from isocompress.api import sweep as sweeping
from isocompress.api.recipe import parse_recipe_text
from isocompress.core.errors import IsocompressError
from isocompress.core.model import random_model
from isocompress.formats import io


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A 12 → 24 → 24 → 4 tanh classifier (exact shrinking reaches 24.6% of it), calibration inputs, and a test file
    holding x and y (3 of 40 labels differ from the model's classes)."""
    tmp = tmp_path_factory.mktemp("sweep")
    model = random_model([12, 24, 24, 4], psi=True, o=0.5, seed=8, weight_scale=1.0)
    io.save(model, tmp / "m.pt")
    np.save(tmp / "c.npy", np.random.default_rng(0).normal(size=(48, 12)))
    x = np.random.default_rng(1).normal(size=(40, 12))
    with torch.no_grad():
        y = model(torch.from_numpy(x)).argmax(-1).numpy()
    y[:3] = (y[:3] + 1) % 4
    np.savez(tmp / "t.npz", x=x, y=y)
    return tmp


@pytest.fixture(scope="module")
def swept(files):
    return isocompress.sweep(files / "m.pt", calibration=files / "c.npy", test_data=files / "t.npz",
                             budgets="30%,15%,5", certify_radius="5%", limits={"max_bytes": 3000}, progress=False)


def test_each_row_is_what_shrink_gives_at_its_budget(files, swept):
    rows = swept["rows"]
    assert [r["budget"] for r in rows] == ["30%", "15%", "5"] and swept["budgets"] == ["30%", "15%", "5"]
    result = cli(["shrink", files / "m.pt", "--calibration", files / "c.npy", "--test-data", files / "t.npz",
                  "--budget", "15%", "--certify-radius", "5%", "--format", "onnx", "--out", files / "o15", "--json"])
    report = json.loads(result.stdout)
    row = rows[1]
    assert row["params"] == report["params_after"] and row["flops"] == report["flops_after"]
    assert row["onnx_bytes"] == (files / "o15" / "model.onnx").stat().st_size  # measured on the file itself
    assert row["accuracy"] == report["pruning"]["test"]["accuracy_after"] and row["measured_on"] == "test data"
    assert row["certified_top1"] == report["pruning"]["local"]["certified_top1"]
    assert rows[0]["params"] > rows[1]["params"] and rows[0]["onnx_bytes"] > rows[1]["onnx_bytes"]
    assert not rows[2]["reachable"] and "is unreachable" in rows[2]["note"]


def test_the_chosen_row_is_the_smallest_meeting_every_limit(swept):
    rows = swept["rows"]
    for r in rows:
        assert r["meets"] == {"max-bytes": r["reachable"] and r["onnx_bytes"] <= 3000}
    meeting = [i for i, r in enumerate(rows) if r["reachable"] and all(r["meets"].values())]
    assert meeting and swept["chosen"] == min(meeting, key=lambda i: rows[i]["params"])
    assert swept["chosen_budget"] == rows[swept["chosen"]]["budget"]
    limits = isocompress.SweepLimits(max_bytes=3000, min_accuracy="99%")  # nothing reaches 99%: 37 of 40 labels
    assert sweeping.choose([{**r, "meets": limits.meets(r)} for r in rows], limits) is None
    assert sweeping.choose(rows, isocompress.SweepLimits()) is None  # no limits: nothing is marked


def test_the_table_marks_the_chosen_row(swept):
    text = sweeping.format_sweep(swept)
    lines = text.splitlines()
    chosen = next(line for line in lines if "← smallest meeting the limits" in line)
    assert chosen.startswith(swept["chosen_budget"]) and f"{swept['rows'][swept['chosen']]['onnx_bytes']:,}" in chosen
    assert "fails max-bytes" in lines[1] and "5       unreachable" in text
    assert f"limits: max-bytes ≤ 3,000 B; smallest meeting them: budget {swept['chosen_budget']}" in text


def test_cli_sweep_json_plot_and_limits(files):
    result = cli(["sweep", files / "m.pt", "--calibration", files / "c.npy", "--budgets", "30%,15%",
                  "--max-params", "200", "--min-accuracy", "85%", "--test-data", files / "t.npz", "--plot",
                  files / "s.png", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["limits"] == {"max-params": 200, "min-accuracy": 0.85} and data["plot"] == str(files / "s.png")
    assert [r["meets"]["max-params"] for r in data["rows"]] == [r["params"] <= 200 for r in data["rows"]]
    assert (files / "s.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args, message", [
    (["--budgets", "50%,,5%"], "--budgets has an empty entry"),
    (["--budgets", "150%"], "a percentage budget must be above 0% and at most 100%"),
    (["--budgets", "5%,5%"], "--budgets lists a budget twice"),
    (["--max-bytes", "lots"], "--max-bytes is 'lots'; write a size like 60000"),
    (["--min-accuracy", "90%"], "--min-accuracy needs labels"),
    (["--min-certified-top1", "90%"], "--min-certified-top1 needs points to certify"),
    (["--certify-radius", "x"], "--certify-radius has 'x', which is not a number"),
    (["--plot", "s.jpg"], "--plot writes a PNG"),
])
def test_cli_sweep_input_errors_are_one_line_before_any_work(files, args, message):
    result = cli(["sweep", files / "m.pt", *args])
    assert result.exit_code == 2 and message in one_error_line(result)
    assert "sweep 1/" not in result.stderr


# --- the same limits in a recipe ---------------------------------------------------------------------------------
SWEEP_RECIPE = 'calibration = "c.npy"\ntest-data = "t.npz"\nformats = ["safetensors"]\n[sweep]\nbudgets = ["30%", "15%"]\n'


def test_recipe_sweep_tables_parse_and_round_trip():
    recipe = parse_recipe_text('[sweep]\nbudgets = "50%,10%"\nmax-bytes = "4 kB"\nmin-accuracy = "90%"\n')
    assert recipe.sweep == {"budgets": ("50%", "10%"), "max-bytes": 4000, "min-accuracy": 0.9} and not recipe.exact
    assert recipe.to_dict()["sweep"] == {"budgets": ["50%", "10%"], "max-bytes": 4000, "min-accuracy": 0.9}
    assert parse_recipe_text("[sweep]\nmax-params = 100\n").sweep["budgets"] == sweeping.DEFAULT_BUDGETS
    for text, message in [("[sweep]\nbudgets = [\"5%\"]\n", "'sweep' has no limits"),
                          ("budget = 0.1\n[sweep]\nmax-params = 5\n", "'sweep' cannot be combined with another goal"),
                          ("[sweep]\nmax-param = 5\n", "did you mean 'max-params'"),
                          ("[sweep]\nmax-bytes = -1\n", "'max-bytes' is -1"), ("sweep = 3\n", "'sweep' is 3")]:
        with pytest.raises(IsocompressError, match=message):
            parse_recipe_text(text, where="r.toml")


def test_shrink_with_a_sweep_recipe_writes_the_chosen_budget(files, swept):
    (files / "r.toml").write_text(SWEEP_RECIPE + "max-bytes = 3000\n")
    result = cli(["shrink", files / "m.pt", "--recipe", files / "r.toml", "--out", files / "rs", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    record = report["recipe"]["sweep"]
    assert record["chosen_budget"] == "15%" == swept["chosen_budget"] and record["limits"] == {"max-bytes": 3000}
    assert report["recipe"]["budget"] == 0.15 and report["params_after"] == swept["rows"][1]["params"]
    (files / "never.toml").write_text(SWEEP_RECIPE + "max-params = 10\n")
    result = cli(["shrink", files / "m.pt", "--recipe", files / "never.toml", "--out", files / "none"])
    *progress, last = result.stderr.strip().splitlines()  # the sweep ran (its lines), then one error line
    assert result.exit_code == 2 and [line.split(",")[0] for line in progress] == ["sweep 1/2: m.pt at budget 30%",
                                                                                  "sweep 2/2: m.pt at budget 15%"]
    assert "no budget of its [sweep] (30%, 15%) meets every limit (max-params ≤ 10); nothing was written" in last
    assert not (files / "none").exists()
    result = cli(["sweep", files / "m.pt", "--recipe", files / "never.toml", "--max-params", "300", "--json"])
    assert json.loads(result.stdout)["limits"] == {"max-params": 300}  # the flag over the recipe's limit


def test_check_measures_a_sweep_recipe_at_its_chosen_budget(files, swept):
    (files / "r2.toml").write_text(SWEEP_RECIPE + "max-bytes = 3000\n")
    (files / "isocompress.toml").write_text(f'[[check]]\nmodel = "m.pt"\nrecipe = "r2.toml"\n'
                                            f'max-params = {swept["rows"][1]["params"]}\n')
    result = cli(["check", "--config", files / "isocompress.toml", "--json"])
    assert result.exit_code == 0, result.output
    assert [(r["metric"], r["measured"]) for r in json.loads(result.stdout)] == [("params", swept["rows"][1]["params"])]


def test_sweep_refuses_a_recipe_with_a_goal(files):
    (files / "goal.toml").write_text("budget = 0.1\n")
    result = cli(["sweep", files / "m.pt", "--recipe", files / "goal.toml"])
    assert result.exit_code == 2 and "a sweep tries its own budgets" in one_error_line(result)
