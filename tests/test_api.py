"""The Python API as good as the CLI (issue 11): ShrinkOptions parses what the flags parse, with the same messages;
a top-level, verified export_onnx; float32 inputs."""

from __future__ import annotations

import onnxruntime as ort
import pytest
import torch

import isocompress
from isocompress import CheckFailed, IsocompressError, ShrinkOptions, export_onnx, random_model, shrink_exact
from isocompress.api.recipe import COMMAND_LINE, parse_budget, parse_max_error


@pytest.mark.parametrize("text,value", [("5%", 0.05), ("0.05", 0.05), ("7500", 7500.0), ("7_500", 7500.0),
                                        (0.1, 0.1), (20000, 20000.0)])
def test_budget_is_parsed_as_the_cli_parses_it(text, value):
    assert ShrinkOptions(budget=text).budget == pytest.approx(value)
    assert ShrinkOptions(budget=text).budget == parse_budget(text, COMMAND_LINE, "budget")


@pytest.mark.parametrize("bad", ["5x", "-5%", 0, 7500.5, True, [1]])
def test_bad_budgets_say_what_the_cli_says_without_a_flag_name(bad):
    with pytest.raises(IsocompressError) as cli_error:
        parse_budget(bad, COMMAND_LINE, "budget")
    with pytest.raises(IsocompressError) as api_error:
        ShrinkOptions(budget=bad)
    api_text, cli_text = str(api_error.value), str(cli_error.value)
    assert api_text.startswith("ShrinkOptions: 'budget' ") and "--" not in api_text
    assert api_text.removeprefix("ShrinkOptions: 'budget' ") == cli_text.removeprefix("--budget ")


def test_max_error_takes_a_number_or_a_percentage():
    assert ShrinkOptions(max_error=0.5).max_error == 0.5
    options = ShrinkOptions(max_error="1%")
    assert options.max_error is None and options.max_error_relative == pytest.approx(0.01) and options.lossy
    with pytest.raises(IsocompressError) as cli_error:
        parse_max_error("abc", COMMAND_LINE, "max-error")
    with pytest.raises(IsocompressError, match="ShrinkOptions: 'max_error' is 'abc'; use a number") as api_error:
        ShrinkOptions(max_error="abc")
    assert str(api_error.value).split("; ", 1)[1] == str(cli_error.value).split("; ", 1)[1]
    with pytest.raises(IsocompressError, match="give one goal: a budget, a max-error or a min-certified-top1"):
        ShrinkOptions(budget="5%", max_error="1%")


@pytest.mark.parametrize("kwargs,message", [
    ({"input_radius": "5"}, "input radius '5' must be a positive finite number"),
    ({"onnx_tol": "x"}, "onnx tolerance 'x' must be a positive finite number"),
    ({"formats": "pdf"}, "ShrinkOptions: 'formats' is 'pdf'; choose one of safetensors, onnx"),
    ({"formats": 3}, "formats 3: give a list"),
    ({"max_error_relative": "a"}, "'max_error_relative' is 'a'; it must be a finite fraction ≥ 0"),
])
def test_other_options_raise_isocompress_errors_not_type_errors(kwargs, message):
    with pytest.raises(IsocompressError, match=message):
        ShrinkOptions(**kwargs)


def test_formats_as_the_cli_writes_them():
    assert ShrinkOptions(formats="safetensors,onnx").formats == ("safetensors", "onnx")


def test_export_onnx_is_verified_and_returns_the_record(tmp_path):
    model = shrink_exact(random_model([6, 20, 20, 20, 3], psi=True, o=(0.1, 1.0), seed=2))
    record = export_onnx(model, tmp_path / "m.onnx")
    assert record["max_rel_diff"] <= 1e-5 and record["n_probes"] == 1024 and record["file"] == str(tmp_path / "m.onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(4, 6, dtype=torch.float64)
    y = torch.from_numpy(session.run(["y"], {"x": x.float().numpy()})[0]).double()
    assert torch.allclose(y, model(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(CheckFailed, match="differs from the torch forward"):
        export_onnx(model, tmp_path / "tight.onnx", rtol=1e-300)
    assert not (tmp_path / "tight.onnx").exists()
    with pytest.raises(IsocompressError, match="export_onnx needs an IsoMLP"):
        export_onnx(torch.nn.Linear(2, 2), tmp_path / "x.onnx")
    with pytest.raises(IsocompressError, match="rtol 0 must be a positive finite number"):
        export_onnx(model, tmp_path / "x.onnx", rtol=0)


def test_float32_inputs_give_float32_outputs():
    model = random_model([3, 5, 2], o=0.5)
    x = torch.randn(7, 3, dtype=torch.float64)
    assert torch.allclose(model(x.float()).double(), model(x), rtol=1e-5, atol=1e-6)


def test_every_public_name_is_importable():
    for name in isocompress.__all__:
        assert getattr(isocompress, name) is not None


def test_the_readme_api_section_lists_every_public_name():
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Python API"):]
    section = section[:section.index("\n## ", 3)]
    listed = set(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)", section))
    missing = sorted(set(isocompress.__all__) - listed)
    assert not missing, f"README 'Python API' does not list {missing}"
