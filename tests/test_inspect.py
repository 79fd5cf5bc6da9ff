"""`isocompress inspect`: spectra and ranks on analytic cases, the --exact prediction against real shrinking,
--json schema, --plot."""

import json
import sys

import pytest
import torch
from conftest import cli, one_error_line

from isocompress.api import inspection
from isocompress.core.model import IsoMLP, Layer, dense_layer, random_model
from isocompress.exact.shrink import shrink_exact
from isocompress.formats import io

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def diagonal_model() -> IsoMLP:
    """3→3→3→2 with diagonal matrices stored dense: singular values are known exactly.
    Layer 1 has one singular value below 1e-3 and one exact zero (a constant direction: row 2 is zero and psi_1[2] = 0,
    so z_1[2] = b_1[2] for every input)."""
    return IsoMLP([
        dense_layer(torch.diag(torch.tensor([3.0, -2.0, 0.5], dtype=torch.float64)), [0.1, 0.2, 0.3], o=0.5),
        dense_layer(torch.diag(torch.tensor([-4.0, 1e-4, 0.0], dtype=torch.float64)), [0.4, -0.5, 0.7],
                    psi=[1.0, 0.0, 0.0], o=0.0),
        dense_layer([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]], [0.0, 0.0], psi=[0.3, -0.4]),
    ])


def rank_deficient_model() -> IsoMLP:
    """6→10→10→10→3 with W_0 of rank 2 (a product 10×2 · 2×6) and psi on every later layer: the varying part of the
    hidden spaces has dimensions 2, 3, 4 (the rank chain r_{l+1} ≤ r_l + 1 of docs/math.md, attained for random weights)."""
    base = random_model([6, 10, 10, 10, 3], psi=True, o=(0.1, 1.0), seed=21)
    gen = torch.Generator().manual_seed(22)
    w0 = torch.randn(10, 2, dtype=torch.float64, generator=gen) @ torch.randn(2, 6, dtype=torch.float64, generator=gen)
    layers = list(base.layers)
    layers[0] = Layer(weight=w0, bias=layers[0].bias, n_in=6, o=layers[0].o)
    return IsoMLP(layers)


# --- analytic cases ------------------------------------------------------------------------------------------------
def test_diagonal_weights_give_their_absolute_entries_as_singular_values():
    report = inspection.inspect_model(diagonal_model(), threshold=1e-3)
    l0, l1, l2 = report["layers"]
    assert l0["singular_values"] == pytest.approx([3.0, 2.0, 0.5], rel=1e-15)
    assert (l0["sigma_max"], l0["sigma_min"], l0["n_below_threshold"], l0["rank"]) == (3.0, 0.5, 0, 3)
    assert l1["singular_values"] == pytest.approx([4.0, 1e-4, 0.0], rel=1e-15, abs=1e-300)
    assert (l1["n_below_threshold"], l1["rank"]) == (2, 2)
    assert l2["singular_values"] == pytest.approx([2.0, 1.0], rel=1e-15)
    assert (l0["o"], l1["o"], l2["o"]) == (0.5, 0.0, None)
    assert (l0["psi_norm"], l1["psi_norm"]) == (None, 1.0)
    assert l2["psi_norm"] == pytest.approx(0.5)
    assert [layer["shape"] for layer in report["layers"]] == [[3, 3], [3, 3], [2, 3]]
    # Hidden space 0 varies in all 3 directions; hidden space 1 only in 2 (direction 2 is the constant b_1[2]).
    assert [layer["varying_rank"] for layer in report["layers"]] == [3, 2, None]
    assert report["exact"]["widths"] == [3, 3, 2, 2]
    # A different threshold moves only the count.
    assert [layer["n_below_threshold"] for layer in inspection.inspect_model(diagonal_model(), 0.6)["layers"]] == [
        1, 2, 0]


def test_a_stored_diagonal_layer_reports_its_sorted_absolute_entries():
    model = shrink_exact(random_model([5, 9, 9, 9, 2], psi=True, o=(0.1, 1.0), seed=23))
    report = inspection.inspect_model(model)
    for layer, record in zip(model.layers, report["layers"]):
        assert record["kind"] == layer.kind
        expected = torch.linalg.svdvals(layer.dense_weight())
        assert torch.allclose(torch.tensor(record["singular_values"], dtype=torch.float64), expected, rtol=1e-12,
                              atol=1e-14)
    assert "diag" in [record["kind"] for record in report["layers"]]
    assert report["params"] == model.num_params()
    # Already exact-shrunk: --exact changes nothing more.
    assert report["exact"]["widths"] == list(model.widths) and report["exact"]["params"] == model.num_params()


def test_rank_deficient_weight_gives_the_rank_chain():
    report = inspection.inspect_model(rank_deficient_model())
    assert [layer["rank"] for layer in report["layers"]] == [2, 10, 10, 3]
    assert [layer["varying_rank"] for layer in report["layers"]] == [2, 3, 4, None]
    assert report["layers"][0]["sigma_min"] < 1e-12 * report["layers"][0]["sigma_max"]
    assert report["layers"][0]["n_below_threshold"] == 4
    assert report["exact"]["widths"] == [6, 2, 3, 4, 3]


@pytest.mark.parametrize("make", [diagonal_model, rank_deficient_model,
                                  lambda: random_model([12, 64, 64, 64, 6], psi=True, o=(0.0, 1.0), seed=3)],
                         ids=["diagonal", "rank-deficient", "wide"])
def test_exact_prediction_is_what_shrink_gives(tmp_path, make):
    """inspect's prediction against the real command: `isocompress shrink --exact` on the same file."""
    path = tmp_path / "m.safetensors"
    io.save(make(), path, dtype=torch.float64)
    inspected = json.loads(cli(["inspect", path, "--json"]).stdout)
    result = cli(["shrink", path, "--exact", "--out", tmp_path / "out", "--format", "safetensors", "--quiet"])
    assert result.exit_code == 0, result.output
    shrunk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert inspected["exact"]["widths"] == shrunk["widths_after"]
    assert inspected["exact"]["params"] == shrunk["params_after"]
    assert inspected["exact"]["kinds"] == [layer["kind"] for layer in shrunk["layers"]]
    assert [layer["varying_rank"] for layer in inspected["layers"][:-1]] == shrunk["widths_after"][1:-1]
    assert inspected["params"] == shrunk["params_before"]


# --- output formats ---------------------------------------------------------------------------------------------------
LAYER_KEYS = {"index": int, "kind": str, "shape": list, "geometry": str, "out_spatial": list, "params": int,
              "flops": int, "activation": (str, type(None)), "sigma_max": float, "sigma_min": float,
              "n_below_threshold": int, "n_singular_values": int, "rank": int, "varying_rank": (int, type(None)),
              "o": (float, type(None)), "psi_norm": (float, type(None)), "singular_values": list}


def test_json_schema(tmp_path):
    path = tmp_path / "m.pt"
    io.save(rank_deficient_model(), path)
    result = cli(["inspect", path, "--json", "--threshold", "0.01"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report) == {"model", "input_shape", "widths", "params", "flops", "threshold", "layers", "exact"}
    assert report["model"] == str(path) and report["threshold"] == 0.01
    assert report["widths"] == [6, 10, 10, 10, 3]
    assert set(report["exact"]) == {"widths", "kinds", "params", "flops", "fraction"}
    assert report["input_shape"] == [6] and report["flops"] == rank_deficient_model().flops()
    assert report["exact"]["fraction"] == pytest.approx(report["exact"]["params"] / report["params"])
    assert len(report["layers"]) == 4
    for i, layer in enumerate(report["layers"]):
        assert set(layer) == set(LAYER_KEYS)
        for key, kind in LAYER_KEYS.items():
            assert isinstance(layer[key], kind), (key, layer[key])
        assert layer["index"] == i
        s = layer["singular_values"]
        assert len(s) == layer["n_singular_values"] == min(layer["shape"])
        assert s == sorted(s, reverse=True) and s[0] == layer["sigma_max"] and s[-1] == layer["sigma_min"]
        assert layer["n_below_threshold"] == sum(v < 0.01 for v in s)
    assert report["layers"][-1]["varying_rank"] is None and report["layers"][-1]["o"] is None
    assert sum(layer["params"] for layer in report["layers"]) == report["params"]


def test_text_table(tmp_path):
    path = tmp_path / "m.pt"
    io.save(rank_deficient_model(), path)
    result = cli(["inspect", path])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["layer", "kind", "channels", "geometry", "params", "FLOPs", "σ_max", "σ_min",
                                "#σ<0.001", "rank", "varying", "rank", "o", "|psi|"]
    assert lines[1].split()[:4] == ["0", "dense", "6→10", "dense"]
    assert lines[1].split()[9:11] == ["2", "2"]  # rank, varying rank
    assert lines[4].split()[10] == "-"  # the output layer has no varying rank
    assert "--exact would reach widths 6→2→3→4→3" in result.stdout
    assert f"{rank_deficient_model().num_params():,} parameters" in result.stdout


def test_bad_threshold_is_exit_2(tmp_path):
    path = tmp_path / "m.pt"
    io.save(random_model([3, 4, 2]), path)
    result = cli(["inspect", path, "--threshold", "-1"])
    assert result.exit_code == 2
    assert "--threshold" in one_error_line(result)


def test_missing_model_is_exit_2(tmp_path):
    result = cli(["inspect", tmp_path / "nope.pt"])
    assert result.exit_code == 2
    assert "no such file" in one_error_line(result)


# --- --plot ------------------------------------------------------------------------------------------------------------
def test_plot_writes_a_png(tmp_path):
    path = tmp_path / "m.pt"
    io.save(rank_deficient_model(), path)
    png = tmp_path / "spectra.png"
    result = cli(["inspect", path, "--plot", png, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["plot"] == str(png)
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000
    assert [p.name for p in tmp_path.iterdir() if p.suffix != ".pt"] == ["spectra.png"]  # no temporary file left
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")  # the IHDR chunk
    assert width > 600 and height > 400


def test_plot_of_zeros_and_zero_threshold(tmp_path):
    """Exact zeros (drawn at a floor) and threshold 0 (no threshold line on a log axis) still give a PNG."""
    report = inspection.inspect_model(diagonal_model(), threshold=0.0)
    out = inspection.plot_spectra(report, tmp_path / "zeros.PNG")
    assert out.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("name", ["spectra.jpg", "spectra", "spectra.png.txt"])
def test_plot_needs_a_png_name(tmp_path, name):
    path = tmp_path / "m.pt"
    io.save(random_model([3, 4, 2]), path)
    result = cli(["inspect", path, "--plot", tmp_path / name])
    assert result.exit_code == 2
    line = one_error_line(result)
    assert line.startswith("isocompress: error:") and "ending in .png" in line
    assert not (tmp_path / name).exists()
    assert result.stdout == ""


def test_plot_into_a_missing_folder_is_exit_2(tmp_path):
    path = tmp_path / "m.pt"
    io.save(random_model([3, 4, 2]), path)
    result = cli(["inspect", path, "--plot", tmp_path / "no" / "such" / "dir" / "x.png"])
    assert result.exit_code == 2
    assert "does not exist" in one_error_line(result)


def test_plot_without_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "m.pt"
    io.save(random_model([3, 4, 2]), path)
    # A None entry in sys.modules makes the import fail as if matplotlib were not installed.
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    result = cli(["inspect", path, "--plot", tmp_path / "x.png"])
    assert result.exit_code == 2
    assert "pip install 'isocompress[plot]'" in one_error_line(result)
    assert not (tmp_path / "x.png").exists()
    # Without --plot, inspect does not need matplotlib at all.
    assert cli(["inspect", path]).exit_code == 0


def test_spectra_figure_is_readable():
    """What makes the PNG readable, checked on the figure: log y axis, labelled axes, a title, one line per layer
    (each labelled, with its own colour or line style), the threshold line, and a legend outside the plotting area."""
    report = inspection.inspect_model(rank_deficient_model())
    fig = inspection.spectra_figure(report, title="t")
    (ax,) = fig.axes
    assert ax.get_yscale() == "log"
    assert "singular value" in ax.get_ylabel() and "index" in ax.get_xlabel() and ax.get_title() == "t"
    lines = [line for line in ax.get_lines() if not (line.get_gid() or "").startswith("varying-rank")]
    layer_lines = [line for line in lines if line.get_label().startswith("layer ")]
    assert len(layer_lines) == len(report["layers"]) == len(lines) - 1
    assert len({(line.get_color(), line.get_linestyle()) for line in layer_lines}) == len(layer_lines)
    for line, layer in zip(layer_lines, report["layers"]):
        assert len(line.get_xdata()) == layer["n_singular_values"]
        assert min(line.get_ydata()) > 0  # zeros are drawn at a positive floor on the log axis
    assert "4 ≤" in layer_lines[0].get_label()  # W_0 has rank 2 of 6: four (numerical) zeros at the floor
    assert any(line.get_label() == "threshold 0.001" for line in lines)
    fig.canvas.draw()
    legend_box = ax.get_legend().get_window_extent()
    assert legend_box.x0 >= ax.get_window_extent().x1  # beside the axes, never over the data


def test_threshold_counts_strictly_below():
    report = inspection.inspect_model(diagonal_model(), threshold=0.5)
    assert [layer["n_below_threshold"] for layer in report["layers"]] == [0, 2, 0]


def test_negative_diagonal_entries_give_positive_singular_values():
    layers = [
        Layer(weight=torch.eye(4, dtype=torch.float64), bias=torch.zeros(4, dtype=torch.float64), n_in=4,
              o=torch.tensor(0.2, dtype=torch.float64)),
        Layer(weight=torch.tensor([-3.0, 1.0, -0.5], dtype=torch.float64), bias=torch.ones(3, dtype=torch.float64),
              n_in=4, o=torch.tensor(0.0, dtype=torch.float64)),
        Layer(weight=torch.ones(2, 3, dtype=torch.float64), bias=torch.zeros(2, dtype=torch.float64), n_in=3),
    ]
    record = inspection.inspect_model(IsoMLP(layers))["layers"][1]
    assert (record["kind"], record["shape"], record["params"]) == ("diag", [3, 4], 7)
    assert record["singular_values"] == [3.0, 1.0, 0.5]


def test_the_plot_marks_each_hidden_layers_varying_rank_cut(tmp_path):
    """A cross on layer i's spectrum at j = the varying rank of hidden space i (the width --exact keeps), at that
    singular value; none on the output layer. The file is written; a bad path is one line, exit 2, no file."""
    model = rank_deficient_model()
    report = inspection.inspect_model(model)
    floor = 1e-16 * max(layer["sigma_max"] for layer in report["layers"])
    (ax,) = inspection.spectra_figure(report).axes
    cuts = {line.get_gid(): line for line in ax.get_lines() if (line.get_gid() or "").startswith("varying-rank-cut")}
    hidden = report["layers"][:-1]
    assert sorted(cuts) == sorted(f"varying-rank-cut-{layer['index']}" for layer in hidden)
    for layer, width in zip(hidden, shrink_exact(model).widths[1:-1]):
        cut = cuts[f"varying-rank-cut-{layer['index']}"]
        j = min(width, layer["n_singular_values"])
        assert list(cut.get_xdata()) == [j] and layer["varying_rank"] == width
        assert list(cut.get_ydata()) == pytest.approx([max(layer["singular_values"][j - 1], floor)], rel=1e-12)
    assert any("varying-rank cut" in line.get_label() for line in cuts.values())
    io.save(model, tmp_path / "m.pt")
    result = cli(["inspect", tmp_path / "m.pt", "--plot", tmp_path / "s.png"])
    assert result.exit_code == 0 and (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    result = cli(["inspect", tmp_path / "m.pt", "--plot", tmp_path / "missing" / "s.png"])
    assert result.exit_code == 2 and "does not exist; create it" in one_error_line(result)
    assert not (tmp_path / "missing").exists()
