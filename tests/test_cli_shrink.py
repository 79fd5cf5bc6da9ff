"""`isocompress shrink --exact` end to end: files written, report contents, table, flags."""

import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from isocompress.api.shrink import shrink_file
from isocompress.cli import main
from isocompress.cli.shrink import parse_budget
from isocompress.core.errors import IsocompressError
from isocompress.core.model import random_model
from isocompress.formats import io


@pytest.fixture
def wide_model(tmp_path):
    path = tmp_path / "wide.pt"
    io.save(random_model([12, 64, 64, 64, 6], psi=True, o=(0.0, 1.0), seed=3), path, dtype=torch.float32)
    return path


def run(args, cwd=None):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def test_shrink_writes_weights_and_report(tmp_path, wide_model, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run(["shrink", str(wide_model), "--exact", "--format", "safetensors"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "wide.shrunk"
    report = json.loads((out / "report.json").read_text())
    assert report["exact"] is True
    assert report["widths_before"] == [12, 64, 64, 64, 6]
    assert report["widths_after"] == [12, 12, 13, 14, 6]
    assert report["params_after"] == io.load(out / "model.safetensors").num_params() < report["params_before"]
    assert [layer["kind"] for layer in report["layers"]] == ["dense", "dense", "diag", "dense"]
    assert report["layers"][2]["shape"] == [14, 13]
    assert report["probe"]["float64"]["max_rel"] < 1e-10
    assert report["probe"]["saved_file"]["max_rel"] < 1e-5
    assert "12→12→13→14→6" in result.stdout
    assert "max |Δy|" in result.stdout


def test_saved_model_reloads_with_the_same_function(tmp_path, wide_model):
    run(["shrink", str(wide_model), "--out", str(tmp_path / "o"), "--dtype", "float64", "--format", "safetensors",
         "--quiet"])
    original, shrunk = io.load(wide_model), io.load(tmp_path / "o" / "model.safetensors")
    x = torch.randn(100, 12, dtype=torch.float64) * 10
    assert torch.allclose(shrunk(x), original(x), rtol=1e-10, atol=1e-12)


def test_json_output_is_the_report(tmp_path, wide_model):
    result = run(["shrink", str(wide_model), "--out", str(tmp_path / "o"), "--json", "--format", "safetensors"])
    printed = json.loads(result.stdout)
    assert printed == json.loads((tmp_path / "o" / "report.json").read_text())


def test_quiet_prints_nothing(tmp_path, wide_model):
    result = run(["shrink", str(wide_model), "--out", str(tmp_path / "o"), "--quiet", "--format", "safetensors"])
    assert result.stdout == "" and result.stderr == ""


def test_progress_goes_to_stderr_in_a_real_process(tmp_path, wide_model):
    proc = subprocess.run([sys.executable, "-m", "isocompress.cli", "shrink", str(wide_model), "--out",
                           str(tmp_path / "o"), "--format", "safetensors"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "shrink" in proc.stderr and "widths" in proc.stdout


def test_output_may_not_replace_the_input(tmp_path):
    model = tmp_path / "model.safetensors"
    io.save(random_model([3, 5, 2]), model)
    before = model.read_bytes()
    result = CliRunner().invoke(main, ["shrink", str(model), "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "would overwrite the input model" in result.stderr
    assert model.read_bytes() == before


def test_out_that_is_a_file_is_refused(tmp_path, wide_model):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    result = CliRunner().invoke(main, ["shrink", str(wide_model), "--out", str(blocker)])
    assert result.exit_code == 2 and "'--out'" in result.stderr and "is a file" in result.stderr
    with pytest.raises(IsocompressError, match="exists and is not a directory"):
        shrink_file(wide_model, blocker)


def test_exact_and_budget_together_are_refused(tmp_path, wide_model):
    result = CliRunner().invoke(main, ["shrink", str(wide_model), "--exact", "--budget", "0.1"])
    assert result.exit_code == 2 and "--exact cannot be combined" in result.stderr


@pytest.mark.parametrize("text,value", [("10%", 0.1), ("0.25", 0.25), ("20000", 20000.0), ("1", 1.0)])
def test_budget_parsing(text, value):
    assert parse_budget(text) == pytest.approx(value)


@pytest.mark.parametrize("text,message", [("ten", "use a fraction"), ("-3", "must be positive"),
                                           ("0", "must be positive"), ("12.5", "whole number")])
def test_bad_budgets(text, message):
    with pytest.raises(IsocompressError, match=message):
        parse_budget(text)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["shrink", "m.pt", "--dtype", "x"], "isocompress shrink: Invalid value for '--dtype'"),
        (["shrink"], "isocompress shrink: Missing argument 'MODEL'"),
        (["bogus"], "No such command 'bogus'"),
        (["--bogus"], "No such option '--bogus'"),
    ],
)
def test_usage_errors_are_one_line_with_exit_code_2(args, expected):
    from click.testing import CliRunner

    from isocompress.cli import main

    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("isocompress: error: ") and expected in lines[0]
    assert "--help" in lines[0]


def test_outputs_have_ordinary_file_permissions(tmp_path):
    import os
    import stat

    model_path = tmp_path / "m.safetensors"
    io.save(random_model([4, 6, 3], seed=0), model_path)
    out = tmp_path / "out"
    shrink_file(model_path, out, progress=False)
    umask = os.umask(0)
    os.umask(umask)
    for name in ("model.safetensors", "model.onnx", "report.json"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o666 & ~umask, name


def test_weights_beyond_float32_give_one_clear_error_and_no_output(tmp_path):
    import dataclasses

    model = random_model([4, 6, 3], seed=0)
    model = model.with_layers({0: dataclasses.replace(model.layers[0], weight=model.layers[0].weight * 1e40)})
    model_path = tmp_path / "big.safetensors"
    io.save(model, model_path)  # float64: representable
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["shrink", str(model_path), "--dtype", "float32", "--out", str(out), "--quiet"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "beyond the float32 range" in lines[0] and "big.safetensors" in lines[0]
    assert not out.exists()
