"""Loading (own format, the reference code's layout) and saving, and every bad input as a clear error."""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from isocompress.cli import main
from isocompress.core.errors import IsocompressError
from isocompress.core.model import random_model
from isocompress.exact.shrink import shrink_exact
from isocompress.formats import io


def reference_state_dict(widths, psi: bool, o_mode: str, seed: int = 0) -> dict:
    """A state_dict in the layout of the reference code's IsotropicTanhMLP (float32, like a trained checkpoint)."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        sd[f"weight_parameters.{i}"] = torch.randn(n_out, n_in, generator=gen) / n_in**0.5
        sd[f"bias_parameters.{i}"] = torch.randn(n_out, generator=gen) * 0.3
    for i, n_out in enumerate(widths[2:]):
        if psi:
            sd[f"psi_parameters.{i}"] = torch.randn(n_out, generator=gen) * 0.3
    for i in range(len(widths) - 2):
        if o_mode == "log":
            sd[f"activation.{i}.intrinsic_length"] = torch.tensor(-1.0 + i)
        elif o_mode == "const":
            sd[f"activation.{i}.o_const"] = torch.tensor(0.5 * i)
    return sd


def independent_forward(sd: dict, x: torch.Tensor, o_mode: str) -> torch.Tensor:
    """Written from the paper's equations, not from isocompress: y = W_L h + b_L + psi_L g."""
    n = len([k for k in sd if k.startswith("weight_parameters.")])
    h, g = x, None
    for i in range(n):
        z = torch.einsum("ij,bj->bi", sd[f"weight_parameters.{i}"].double(), h) + sd[f"bias_parameters.{i}"].double()
        if i > 0 and f"psi_parameters.{i - 1}" in sd:
            z = z + sd[f"psi_parameters.{i - 1}"].double() * g
        if i == n - 1:
            return z
        o = {"log": lambda: sd[f"activation.{i}.intrinsic_length"].double().exp(),
             "const": lambda: sd[f"activation.{i}.o_const"].double(),
             "none": lambda: torch.tensor(0.0, dtype=torch.float64)}[o_mode]()
        m = torch.sqrt(o + (z ** 2).sum(1, keepdim=True))
        g = torch.tanh(m) / m
        h = g * z
    raise AssertionError


@pytest.mark.parametrize("psi", [False, True])
@pytest.mark.parametrize("o_mode", ["log", "const", "none"])
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_reference_layout_loads_and_matches_an_independent_forward(tmp_path, psi, o_mode, suffix):
    sd = reference_state_dict([7, 11, 9, 4], psi, o_mode)
    path = tmp_path / f"ref{suffix}"
    torch.save(sd, path) if suffix == ".pt" else save_file(sd, str(path))
    model = io.load(path)
    x = torch.randn(50, 7, dtype=torch.float64) * 3
    expected = independent_forward(sd, x, o_mode)
    assert torch.allclose(model(x), expected, rtol=1e-12, atol=1e-12)
    assert (model.layers[1].psi is not None) == psi


def test_nested_training_checkpoint_loads(tmp_path):
    sd = reference_state_dict([3, 5, 2], False, "log")
    torch.save({"epoch": 3, "model_state_dict": sd}, tmp_path / "ckpt.pt")
    assert io.load(tmp_path / "ckpt.pt").widths == (3, 5, 2)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_own_format_round_trips_a_shrunk_model(tmp_path, suffix, f64_inputs):
    model = random_model([5, 20, 20, 20, 3], psi=True, o=(0.0, 1.0))
    shrunk = shrink_exact(model)
    path = io.save(shrunk, tmp_path / f"m{suffix}")
    loaded = io.load(path)
    assert loaded.config == shrunk.config
    x = f64_inputs(5)
    assert torch.allclose(loaded(x), model(x), rtol=1e-10, atol=1e-12)


def test_saving_is_atomic_and_leaves_no_temporary_files(tmp_path):
    io.save(random_model([3, 4, 2]), tmp_path / "m.safetensors")
    io.save(random_model([3, 4, 2], seed=1), tmp_path / "m.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch MARKER_CODE_RAN",))


def bad_files(tmp_path: Path) -> dict:
    good = tmp_path / "good.pt"
    io.save(random_model([3, 4, 2]), good)
    files = {}
    files["truncated"] = tmp_path / "truncated.pt"
    files["truncated"].write_bytes(good.read_bytes()[:200])
    files["pickle"] = tmp_path / "evil.pt"
    with open(files["pickle"], "wb") as fh:
        pickle.dump({"weight_parameters.0": RunsCode()}, fh)
    files["layout"] = tmp_path / "layout.pt"
    torch.save({"encoder.weight": torch.ones(2, 2)}, files["layout"])
    files["nan"] = tmp_path / "nan.pt"
    sd = reference_state_dict([3, 4, 2], False, "none")
    sd["weight_parameters.1"][0, 0] = float("nan")
    torch.save(sd, files["nan"])
    files["shape"] = tmp_path / "shape.pt"
    sd = reference_state_dict([3, 4, 2], False, "none")
    sd["bias_parameters.1"] = torch.zeros(5)
    torch.save(sd, files["shape"])
    files["module"] = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), files["module"])
    files["safetensors_garbage"] = tmp_path / "garbage.safetensors"
    files["safetensors_garbage"].write_bytes(b"\xff" * 64)
    files["missing"] = tmp_path / "does-not-exist.pt"
    files["suffix"] = tmp_path / "model.h5"
    files["suffix"].write_bytes(b"x")
    return files


EXPECTED_MESSAGES = {
    "truncated": "not a readable PyTorch checkpoint",
    "pickle": "refused: the checkpoint holds Python objects",
    "layout": "unrecognised layout (found keys: encoder.weight); expected isocompress keys",
    "nan": "'weight_parameters.1' contains NaN or Inf",
    "shape": "'weight_parameters.1' (2, 4) and 'bias_parameters.1' (5,) do not fit",
    "module": "refused: the checkpoint holds Python objects",
    "safetensors_garbage": "not a readable safetensors file",
    "missing": "no such file; check the path",
    "suffix": "unsupported file type '.h5'",
}


@pytest.mark.parametrize("case", sorted(EXPECTED_MESSAGES))
def test_bad_input_is_one_clear_line_exit_2_and_no_output(tmp_path, case, monkeypatch):
    files = bad_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    out_dir = tmp_path / "out"
    result = CliRunner().invoke(main, ["shrink", str(files[case]), "--out", str(out_dir)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("isocompress: error: ")
    assert str(files[case]) in lines[0]
    assert EXPECTED_MESSAGES[case] in lines[0]
    assert "Traceback" not in result.output
    assert not out_dir.exists()
    assert not (tmp_path / "MARKER_CODE_RAN").exists()
    assert {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_malicious_pickle_in_a_real_process_runs_no_code(tmp_path):
    files = bad_files(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "isocompress.cli", "shrink", str(files["pickle"])],
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "MARKER_CODE_RAN").exists()
    assert not (tmp_path / "evil.shrunk").exists()


def test_loader_errors_are_the_projects_own_type(tmp_path):
    for path in bad_files(tmp_path).values():
        with pytest.raises(IsocompressError):
            io.load(path)


def test_reference_state_dict_loads_back_as_the_same_function(tmp_path):
    from isocompress.core.model import random_model

    model = random_model([5, 7, 6, 3], psi=True, o=0.3, seed=4).cast(torch.float64)
    path = tmp_path / "ref.pt"
    torch.save(io.reference_state_dict(model, dtype=torch.float64), path)
    loaded = io.load(path)
    x = torch.randn(32, 5, dtype=torch.float64)
    assert torch.allclose(loaded(x), model(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [1, 5, 1 << 18, (1 << 18) + 3, 3 * (1 << 18) - 1])
def test_all_finite_finds_a_bad_value_in_any_chunk(n):
    """io.all_finite checks in chunks (memory): a NaN or ±Inf at the start, in the middle or in the last element of a
    partial last chunk is found; a finite tensor passes."""
    from isocompress.formats.io import all_finite

    t = torch.randn(n, dtype=torch.float64)
    assert all_finite(t) and all_finite(t.reshape(1, -1))
    for where in {0, n // 2, n - 1}:
        for bad in (float("nan"), float("inf"), float("-inf")):
            u = t.clone()
            u[where] = bad
            assert not all_finite(u)
