"""Issue 13: hostile inputs — deep nesting, out-of-range values, files and tensors the loaders do not expect, limits —
each one line (exit 2) naming the file; and item 7, "exact" and certified bounds that account for every direction
dropped as constant, even when a later layer amplifies it."""

import dataclasses
import json
import os
import warnings

import numpy as np
import pytest
import torch
from conftest import cli, one_error_line
from safetensors.torch import save_file

from isocompress.api import shrink as api
from isocompress.core.model import IsoMLP, Layer, random_model
from isocompress.exact import constants
from isocompress.exact import shrink as exact
from isocompress.formats import io

F64 = torch.float64


def t(v):
    return torch.tensor(v, dtype=F64)


@pytest.fixture
def small(tmp_path):
    model = random_model([3, 5, 4, 2], psi=True, o=(0.2, 1.0), seed=1)
    path = tmp_path / "small.safetensors"
    io.save(model, path, dtype=torch.float32)
    return path


def expect_input_error(result, *fragments):
    assert result.exit_code == 2, result.output
    line = one_error_line(result)
    for fragment in fragments:
        assert fragment in line, line
    return line


# --- item 4: nesting ---------------------------------------------------------------------------------------------
DEEP = 3000


def test_a_deeply_nested_recipe(tmp_path, small):
    recipe = tmp_path / "deep.toml"
    recipe.write_text("budget = " + "[" * DEEP + "]" * DEEP + "\n")
    expect_input_error(cli(["shrink", small, "--recipe", recipe, "--out", tmp_path / "o"]), "deep.toml",
                       f"nests {DEEP} levels deep", "flatten it")
    recipe.write_text(".".join(["k"] * DEEP) + " = 1\n")  # dotted keys nest without brackets
    expect_input_error(cli(["shrink", small, "--recipe", recipe, "--out", tmp_path / "o"]), "deep.toml", "nests more")


def test_a_deeply_nested_check_config(tmp_path, small):
    config = tmp_path / "isocompress.toml"
    config.write_text("[[check]]\nmodel = 'small.safetensors'\nmax-params = " + "{a = " * DEEP + "1" + "}" * DEEP)
    expect_input_error(cli(["check", "--config", config]), "isocompress.toml", "levels deep")


def test_a_deeply_nested_baseline_and_bad_numbers(tmp_path, small):
    cases = {
        "deep": "[" * DEEP + "]" * DEEP,
        "nan": '[{"model": "m", "metric": "params", "measured": NaN}]',
        "infinity": '[{"model": "m", "metric": "params", "measured": Infinity}]',
        "huge-int": '[{"model": "m", "metric": "params", "measured": 1' + "0" * 400 + "}]",
        "huge-float": '[{"model": "m", "metric": "params", "measured": 1e400}]',
        "recipe-not-a-string": '[{"model": "m", "metric": "params", "measured": 1, "recipe": 5}]',
    }
    for name, text in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(text)
        result = cli(["check", small, "--max-params", "1000", "--baseline", path])
        expect_input_error(result, f"{name}.json")


def test_deeply_nested_safetensors_metadata(tmp_path):
    model = random_model([3, 4, 2], seed=0)
    path = tmp_path / "meta.safetensors"
    save_file(io.model_tensors(model, torch.float32), str(path), metadata={"isocompress_config": "[" * DEEP})
    expect_input_error(cli(["shrink", path, "--out", tmp_path / "o"]), "meta.safetensors", "levels deep")


# --- item 5: out-of-range values ---------------------------------------------------------------------------------
@pytest.mark.parametrize("exponent", [30, 100, 300])
def test_calibration_beyond_the_range_is_an_input_error_naming_the_file(tmp_path, small, exponent):
    calib = tmp_path / "calib.npy"
    np.save(calib, np.full((8, 3), 10.0 ** exponent))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy overflow warning may escape either
        result = cli(["shrink", small, "--calibration", calib, "--budget", "0.5", "--out", tmp_path / "o"])
    line = expect_input_error(result, "calib.npy", "beyond the float", "rescale the calibration inputs")
    assert "small.safetensors" not in line
    assert not (tmp_path / "o").exists()


def test_weights_near_1e38_are_an_input_error_not_a_parity_failure(tmp_path):
    model = random_model([3, 5, 2], seed=0)
    model = model.with_layers({1: dataclasses.replace(model.layers[1], weight=model.layers[1].weight * 1e37)})
    path = tmp_path / "w38.safetensors"
    io.save(model, path, dtype=torch.float32)
    expect_input_error(cli(["shrink", path, "--out", tmp_path / "o"]), "w38.safetensors", "float32 range",
                       "--dtype float64")


@pytest.mark.parametrize("log_o", [88.0, 100.0])
def test_an_intrinsic_length_that_overflows_is_refused(tmp_path, log_o):
    sd = {"weight_parameters.0": torch.randn(4, 3), "bias_parameters.0": torch.randn(4),
          "activation.0.intrinsic_length": torch.tensor([log_o]), "weight_parameters.1": torch.randn(2, 4),
          "bias_parameters.1": torch.randn(2)}
    path = tmp_path / "o.safetensors"
    save_file(sd, str(path))
    # --ref-intrinsic-length log: the reading is stated, so the only line on stderr is the error
    expect_input_error(cli(["shrink", path, "--ref-intrinsic-length", "log", "--out", tmp_path / "o"]), "o.safetensors",
                       "beyond the float")


# --- item 6 and 9: files and tensors the loaders do not expect ----------------------------------------------------
def test_a_fifo_as_the_model_is_refused_without_reading(tmp_path):
    fifo = tmp_path / "model.pt"
    os.mkfifo(fifo)
    expect_input_error(cli(["shrink", fifo, "--out", tmp_path / "o"]), "model.pt", "not a regular file")


def own_tensors():
    model = random_model([3, 5, 4, 2], psi=True, o=(0.2, 1.0), seed=1)
    return model, io.model_tensors(model, torch.float32)


@pytest.mark.parametrize("case,fragment", [
    ("zero-width", "zero-size layer"),
    ("float8", "has dtype float8_e4m3fn"),
    ("leading-zero", "without leading zeros"),
])
def test_unexpected_safetensors_tensors(tmp_path, case, fragment):
    model, sd = own_tensors()
    metadata = {"isocompress_config": model.config.to_json()}
    if case == "zero-width":
        sd = {"layers.0.weight": torch.zeros(0, 3), "layers.0.bias": torch.zeros(0), "layers.0.o": torch.zeros(()),
              "layers.1.weight": torch.zeros(2, 0), "layers.1.bias": torch.zeros(2)}
        metadata = None
    elif case == "float8":
        sd = {k: v.to(torch.float8_e4m3fn) for k, v in sd.items()}
    else:
        sd["layers.00.weight"] = sd["layers.0.weight"] * 2
        metadata = None
    path = tmp_path / f"{case}.safetensors"
    save_file(sd, str(path), metadata=metadata)
    expect_input_error(cli(["shrink", path, "--out", tmp_path / "o"]), f"{case}.safetensors", fragment)


def test_sparse_tensors_are_refused(tmp_path):
    _, sd = own_tensors()
    sd["layers.0.weight"] = sd["layers.0.weight"].to_sparse()
    path = tmp_path / "sparse.pt"
    torch.save(sd, path)
    expect_input_error(cli(["shrink", path, "--out", tmp_path / "o"]), "sparse.pt", "sparse_coo", "dense")


def test_random_bytes_named_pt_are_not_called_a_code_running_pickle(tmp_path):
    path = tmp_path / "random.pt"
    path.write_bytes(np.random.default_rng(0).bytes(4096).replace(b"PK", b"pk"))
    line = expect_input_error(cli(["shrink", path, "--out", tmp_path / "o"]), "random.pt", "not a PyTorch checkpoint")
    assert "could run code" not in line
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")  # a real object pickle is still refused as such
    expect_input_error(cli(["shrink", tmp_path / "module.pt", "--out", tmp_path / "o"]), "could run code")


def test_a_budget_percentage_above_100_is_refused(tmp_path, small):
    recipe = tmp_path / "r.toml"
    recipe.write_text('budget = "200%"\n')
    expect_input_error(cli(["shrink", small, "--recipe", recipe, "--out", tmp_path / "o"]), "r.toml", "at most 100%")
    expect_input_error(cli(["shrink", small, "--budget", "200%", "--out", tmp_path / "o"]), "at most 100%")


# --- item 8: limits ----------------------------------------------------------------------------------------------
def test_grow_by_a_billion_neurons_is_refused_before_allocating(tmp_path, small):
    result = cli(["grow", small, "--layer", "0", "--add", "1000000000", "--out", tmp_path / "g.safetensors"])
    expect_input_error(result, "--add 1000000000", "GiB of memory", "add fewer neurons")
    assert not (tmp_path / "g.safetensors").exists()


def test_a_model_beyond_the_memory_limit_is_one_line(tmp_path):
    import resource

    from forked import forked_cli

    path = tmp_path / "m.safetensors"
    save_file({"layers.0.weight": torch.zeros(4096, 4096), "layers.0.bias": torch.zeros(4096),
               "layers.0.o": torch.zeros(()), "layers.1.weight": torch.zeros(4, 4096),
               "layers.1.bias": torch.zeros(4)}, str(path))  # 64 MiB; its float64 copy needs 128 MiB more
    with open("/proc/self/statm") as handle:
        used = int(handle.read().split()[0]) * resource.getpagesize()
    limit = used + (96 << 20)  # this process with its imports, plus less than the model needs

    code, err = forked_cli(["shrink", path, "--out", tmp_path / "o", "--quiet"],
                           lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "memory" in lines[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists()


# --- item 7: constant directions judged by their effect on the output ----------------------------------------------
def amplified_2_2_1() -> IsoMLP:
    """W_0 = diag(1, 1e-16), W_1 = [0, 1e16], o = 0: y = g·x_2 with g = tanh(m)/m, m = |z_0|."""
    return IsoMLP([Layer(weight=t([[1.0, 0.0], [0.0, 1e-16]]), bias=t([0.0, 0.0]), n_in=2, o=t(0.0)),
                   Layer(weight=t([[0.0, 1e16]]), bias=t([0.0]), n_in=2)])


def amplified_3_4_4_2() -> IsoMLP:
    """A direction of hidden space 0 with σ = 1e-16 that W_1 = diag(1, 1, 1e8, 1) and then W_2 amplify by 1e8 each:
    y_2 = g_1·g_0·x_3, O(1), although the direction is 1e-16 of σ_max in its own layer."""
    w0 = t([[1, 0, 0], [0, 1, 0], [0, 0, 1e-16], [0, 0, 0]])
    return IsoMLP([Layer(weight=w0, bias=t([0.1, 0.0, 0.0, 0.2]), n_in=3, o=t(0.0)),
                   Layer(weight=torch.diag(t([1.0, 1.0, 1e8, 1.0])), bias=torch.zeros(4, dtype=F64), n_in=4, o=t(0.0)),
                   Layer(weight=t([[0.5, 0, 0, 0], [0, 0, 1e8, 0]]), bias=t([0.0, 0.0]), n_in=4)])


def test_the_old_relative_rank_rule_drops_the_amplified_direction():
    # what the issue found (and why the tests below can fail): a tolerance relative to σ_max of one layer
    assert constants.remove_all_constant_directions(amplified_2_2_1(), rtol=1e-15).widths == (2, 1, 1)
    assert constants.remove_all_constant_directions(amplified_3_4_4_2(), rtol=1e-15).widths[1] == 2


def test_exact_shrink_keeps_an_amplified_direction(tmp_path):
    model = amplified_2_2_1()
    path = tmp_path / "amp.safetensors"
    io.save(model, path, dtype=torch.float64)
    report = api.shrink_file(path, tmp_path / "out", progress=False)
    assert report["widths_after"] == [2, 2, 1]
    x = torch.randn(256, 2, dtype=F64) * 3
    y = model(x)
    assert float(y.abs().max()) > 0.1  # the function is not ≡ 0 ...
    shrunk = io.load(tmp_path / "out" / "model.safetensors")
    assert torch.allclose(shrunk(x), y, rtol=1e-10, atol=1e-12)  # ... and the shrunk model keeps it
    record = report["constant_directions"]
    assert record["rtol"] == constants.EXACT_RTOL and record["bound"] == 0.0 and record["dropped"] == [0]
    assert json.loads((tmp_path / "out" / "report.json").read_text())["constant_directions"] == record


def test_what_is_dropped_is_proven_small():
    """The recorded bound covers the actual change: a model with genuinely small directions (σ = 1e-13 relative,
    below the rank rule's reach only because nothing amplifies them), attacked at random inputs in the radius."""
    gen = torch.Generator().manual_seed(3)
    u, _ = torch.linalg.qr(torch.randn(6, 6, dtype=F64, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(4, 4, dtype=F64, generator=gen))
    s = t([2.0, 1.0, 1e-11, 1e-12])
    w0 = u[:, :4] @ torch.diag(s) @ v.T
    model = IsoMLP([Layer(weight=w0, bias=torch.randn(6, dtype=F64, generator=gen), n_in=4, o=t(0.3)),
                    Layer(weight=torch.randn(3, 6, dtype=F64, generator=gen), bias=torch.zeros(3, dtype=F64), n_in=6)])
    x = torch.randn(4000, 4, dtype=F64, generator=gen)
    x = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True) * 10.0
    scale = float(torch.linalg.vector_norm(model(x), dim=-1).max())
    shrunk, record = constants.remove_constant_directions_accounted(model, input_radius=10.0, output_scale=scale * 1e3)
    assert shrunk.widths[1] < 6 and sum(record["dropped"]) > 0
    error = float(torch.linalg.vector_norm(shrunk(x) - model(x), dim=-1).max())
    assert 0 < error <= record["bound"] <= constants.EXACT_RTOL * scale * 1e3 * len(record["dropped"])


@pytest.mark.parametrize("budget", [1.0, 0.7])
def test_a_budget_certificate_covers_the_amplified_direction(tmp_path, budget):
    model = amplified_3_4_4_2()
    path = tmp_path / "amp3.safetensors"
    io.save(model, path, dtype=torch.float64)
    report = api.shrink_file(path, tmp_path / "out", api.ShrinkOptions(budget=budget, input_radius=3.0,
                                                                        formats=("safetensors",)), progress=False)
    pruned = io.load(tmp_path / "out" / "model.safetensors")
    cert = report["pruning"]["certified"]
    assert "constant_directions" in cert
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 3, dtype=F64, generator=gen)
    x = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True) * 3.0 * torch.rand(20000, 1, dtype=F64, generator=gen)
    error = float(torch.linalg.vector_norm(pruned(x) - model(x), dim=-1).max())
    assert error <= cert["max_abs"]
    assert report["pruning"]["adversarial"]["max_abs"] <= cert["max_abs"]


def test_with_the_old_rule_the_run_would_fail_loudly(tmp_path, monkeypatch):
    # the case: the old relative rule drops the direction, the certificate (0 for the dropped part) misses
    # an O(1) error; the run's own search now catches that and the run fails instead of reporting a bound
    from isocompress.prune import budget as prune

    real = constants.remove_constant_directions_accounted

    def old_rule(model, rtol=None, progress=None, input_radius=None, output_scale=None):
        out, record = real(model, rtol=1e-15, progress=progress, input_radius=input_radius, output_scale=output_scale)
        return out, {**record, "bound": 0.0}

    monkeypatch.setattr(prune, "remove_constant_directions_accounted", old_rule)
    path = tmp_path / "amp3.safetensors"
    io.save(amplified_3_4_4_2(), path, dtype=torch.float64)
    result = cli(["shrink", path, "--budget", "100%", "--input-radius", "3", "--format", "safetensors",
                  "--out", tmp_path / "o", "--quiet"])
    assert result.exit_code == 1
    assert "above the certified bound" in one_error_line(result)
    assert not (tmp_path / "o").exists()


def test_a_search_above_the_certificate_fails_the_run(tmp_path, small, monkeypatch):
    from isocompress.bounds import certified as bounds

    real = bounds.certified_bound

    def unsound(*args, **kwargs):
        out = real(*args, **kwargs)
        return {**out, "bound": out["bound"] * 1e-9}

    monkeypatch.setattr(bounds, "certified_bound", unsound)
    monkeypatch.setattr("isocompress.prune.budget.ROUNDING_ALLOWANCE", 0.0)
    # a domain (--input-radius): without one no certificate is computed (issue 10), so none could be refuted
    result = cli(["shrink", small, "--budget", "0.5", "--input-radius", "3", "--out", tmp_path / "o", "--quiet"])
    assert result.exit_code == 1
    assert "above the certified bound" in one_error_line(result)
    assert not (tmp_path / "o").exists()


def test_an_exact_run_with_a_real_probe_error_fails(tmp_path, small, monkeypatch):
    real = exact.shrink_exact_accounted

    def wrong(model, progress=None, x=None):
        shrunk, record = real(model, progress, x)
        last = shrunk.layers[-1]
        return shrunk.with_layers({len(shrunk.layers) - 1: dataclasses.replace(last, bias=last.bias + 1e-3)}), record

    monkeypatch.setattr(api, "shrink_exact_accounted", wrong)  # the in-memory path
    from isocompress.exact import stream

    real_pass = stream.diagonalise_pass

    def wrong_pass(shapes, tmp, emit, step):  # the streamed path (this file streams): the same wrong output bias
        def wrong_emit(j, layer):
            emit(j, dataclasses.replace(layer, bias=layer.bias + 1e-3) if j == len(shapes) - 1 else layer)
        real_pass(shapes, tmp, wrong_emit, step)

    monkeypatch.setattr(stream, "diagonalise_pass", wrong_pass)
    for extra in ([], ["--format", "onnx"]):
        result = cli(["shrink", small, "--out", tmp_path / "o", "--quiet", *extra])
        assert result.exit_code == 1
        assert "exact shrinking changed the outputs" in one_error_line(result)
        assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("make", [amplified_2_2_1, amplified_3_4_4_2])
def test_the_streamed_exact_shrink_uses_the_same_output_relative_rule(tmp_path, make):
    # safetensors-only output of our own format takes the one-layer-at-a-time path (isocompress.exact.stream): it must keep
    # what the in-memory path keeps, and record the same bound on what it dropped
    path = tmp_path / "amp.safetensors"
    io.save(make(), path, dtype=torch.float64)
    streamed = api.shrink_file(path, tmp_path / "s", api.ShrinkOptions(formats=("safetensors",)), progress=False)
    in_memory = api.shrink_file(path, tmp_path / "m", progress=False, stream=False)
    assert streamed.get("streamed") and not in_memory.get("streamed")
    assert streamed["widths_after"] == in_memory["widths_after"]
    assert streamed["constant_directions"]["dropped"] == in_memory["constant_directions"]["dropped"]
    assert streamed["constant_directions"]["bound"] == pytest.approx(in_memory["constant_directions"]["bound"],
                                                                     rel=1e-9, abs=1e-300)
    assert streamed["probe"]["float64"]["max_rel"] < 1e-10
