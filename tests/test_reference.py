"""Checkpoints written by an independent re-implementation of the reference code's IsotropicTanhMLP (issue 11).

`RefNet` below is written from the reference's documented behaviour (state-dict names, m = sqrt(|o + |z|²|), o
stored as log o or raw, psi of layer N+1 under psi_parameters.N), not from isocompress: it computes its own forward
with its own small-m branch. Every combination of {log, raw with o < 0, o_const, none} × {psi, no psi} is written,
loaded, shrunk exactly, grown, saved, reloaded and exported to ONNX, and compared with RefNet's own forward.
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import cli, one_error_line
from torch import nn

from isocompress.api.shrink import ShrinkOptions, shrink_file
from isocompress.core.errors import IsocompressError
from isocompress.exact.shrink import shrink_exact
from isocompress.export.onnx_export import build_onnx, export_and_verify
from isocompress.formats import io
from isocompress.train.grow import grow

MODES = ("log", "raw", "const", "none")
WIDTHS = (5, 12, 12, 12, 3)  # hidden wider than the input: exact shrinking removes directions and moves o
RAW_O = (-0.077, 0.3, -0.5)  # raw intrinsic lengths, two of them negative (the issue's −0.077 among them)


class RefActivation(nn.Module):
    def __init__(self, mode: str, value: float):
        super().__init__()
        self.positive_intrinsic_length = mode == "log"
        if mode in ("log", "raw"):
            self.intrinsic_length = nn.Parameter(torch.tensor(value, dtype=torch.float64))
        elif mode == "const":
            self.register_buffer("o_const", torch.tensor(value, dtype=torch.float64))
        self.mode = mode

    def o(self) -> torch.Tensor:
        if self.mode == "log":
            return self.intrinsic_length.exp()
        if self.mode == "raw":
            return self.intrinsic_length
        if self.mode == "const":
            return self.o_const
        return torch.zeros((), dtype=torch.float64)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = torch.sqrt(torch.abs(self.o() + torch.sum(z**2, dim=-1, keepdim=True)))
        tiny = m <= 1e-3
        m_safe = torch.where(tiny, torch.ones_like(m), m)
        gain = torch.where(tiny, 1 - m**2 / 3 + 2 * m**4 / 15 - 17 * m**6 / 315, torch.tanh(m_safe) / m_safe)
        return gain * z, gain


class RefNet(nn.Module):
    """An independent IsotropicTanhMLP: weight_parameters.N (out × in), bias_parameters.N, psi_parameters.N (the psi
    of weight layer N+1), activation.N.intrinsic_length | activation.N.o_const."""

    def __init__(self, widths, mode: str, psi: bool, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        pairs = list(zip(widths[:-1], widths[1:]))
        self.weight_parameters = nn.ParameterList(
            [nn.Parameter(torch.randn(o, i, generator=gen, dtype=torch.float64) / i**0.5) for i, o in pairs])
        self.bias_parameters = nn.ParameterList(
            [nn.Parameter(torch.randn(o, generator=gen, dtype=torch.float64) * 0.3) for _, o in pairs])
        self.psi_parameters = nn.ParameterList(
            [nn.Parameter(torch.randn(o, generator=gen, dtype=torch.float64) * 0.4) for _, o in pairs[1:]] if psi else [])
        values = {"log": (-1.0, 0.2, -2.5), "raw": RAW_O, "const": (0.4, 0.0, 1.5), "none": (0, 0, 0)}[mode]
        self.activation = nn.ModuleList([RefActivation(mode, values[l]) for l in range(len(pairs) - 1)])
        if mode == "raw":  # x = 0 puts z_0 = b_0 exactly on the sphere |z|² = −o where m = 0
            with torch.no_grad():
                b = self.bias_parameters[0]
                b.mul_((-RAW_O[0]) ** 0.5 / b.norm())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, g = x, None
        n = len(self.weight_parameters)
        for i in range(n):
            z = h @ self.weight_parameters[i].T + self.bias_parameters[i]
            if i > 0 and len(self.psi_parameters):
                z = z + self.psi_parameters[i - 1] * g
            if i == n - 1:
                return z
            h, g = self.activation[i](z)


def probe(n_in: int, n: int = 120, seed: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scales = torch.tensor([0.0, 1e-3, 0.1, 0.5, 1.0, 10.0, 1e3], dtype=torch.float64)
    x = torch.randn(n, n_in, dtype=torch.float64, generator=gen)
    return x * scales[torch.arange(n) % len(scales)][:, None]


def rel(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    reference, candidate = reference.detach(), candidate.detach()
    diff = torch.linalg.vector_norm(candidate.double() - reference, dim=-1).max()
    return float(diff / torch.linalg.vector_norm(reference, dim=-1).max())


def write(tmp_path, mode: str, psi: bool) -> tuple[RefNet, object]:
    net = RefNet(WIDTHS, mode, psi)
    path = tmp_path / f"ref-{mode}-{psi}.pt"
    torch.save(net.state_dict(), path)
    return net, path


def load_as_author(path, mode: str, notes: list | None = None):
    return io.load(path, ref_intrinsic_length="raw" if mode == "raw" else None,
                   notify=(notes.append if notes is not None else lambda _: None))


COMBOS = [(mode, psi) for mode in MODES for psi in (True, False)]


@pytest.mark.parametrize("mode,psi", COMBOS)
def test_load_shrink_grow_save_export_match_the_reference_forward(tmp_path, mode, psi):
    net, path = write(tmp_path, mode, psi)
    x = probe(WIDTHS[0])
    with torch.no_grad():
        y_ref = net(x)
    model = load_as_author(path, mode)
    assert rel(y_ref, model(x)) <= 1e-12
    shrunk = shrink_exact(model)
    assert shrunk.widths[1] < WIDTHS[1]  # the shrink did act
    assert rel(y_ref, shrunk(x)) <= 1e-10
    assert rel(y_ref, grow(shrunk, 1, 3, scale=0.1)(x)) <= 1e-10
    io.save(shrunk, tmp_path / "s.safetensors", dtype=torch.float64)
    assert rel(y_ref, io.load(tmp_path / "s.safetensors")(x)) <= 1e-10
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-10)):
        record = export_and_verify(shrunk, tmp_path / "s.onnx", x, rtol=tol, dtype=dtype)
        session = ort.InferenceSession(str(tmp_path / "s.onnx"), providers=["CPUExecutionProvider"])
        np_dtype = np.float32 if dtype == torch.float32 else np.float64
        y_onnx = torch.from_numpy(session.run(["y"], {"x": x.numpy().astype(np_dtype)})[0].astype(np.float64))
        assert rel(y_ref, y_onnx) <= tol, (dtype, record)


def test_raw_checkpoint_hits_m_zero_and_the_graph_guards_it(tmp_path):
    """x = 0 lands on |z_0|² = −o_0 (m = 0): the model, the ONNX graph (Abs + Max guard) and RefNet agree there."""
    net, path = write(tmp_path, "raw", True)
    model = load_as_author(path, "raw")
    assert float(model.layers[0].o) == pytest.approx(RAW_O[0])
    x = torch.zeros(2, WIDTHS[0], dtype=torch.float64)
    x[1] = 1e-9
    _, _, gains = model.forward_with_hidden(x)
    assert float(gains[0][0]) == 1.0  # m = 0 exactly: g = 1
    proto = build_onnx(model, dtype=torch.float64)
    ops = [node.op_type for node in proto.graph.node]
    assert "Abs" in ops and "Max" in ops
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    y_onnx = torch.from_numpy(session.run(["y"], {"x": x.numpy()})[0])
    with torch.no_grad():
        assert rel(net(x), y_onnx) <= 1e-12


def test_log_is_assumed_with_a_note_and_raw_changes_the_model(tmp_path):
    net, path = write(tmp_path, "raw", False)
    notes: list[str] = []
    misread = io.load(path, notify=notes.append)
    assert len(notes) == 1 and "read activation.N.intrinsic_length as log o" in notes[0]
    assert "--ref-intrinsic-length raw" in notes[0]
    x = probe(WIDTHS[0])
    with torch.no_grad():
        assert rel(net(x), misread(x)) > 1e-3  # read as log o it is another network
    assert rel(net(x), io.load(path, ref_intrinsic_length="raw", notify=notes.append)(x)) <= 1e-12
    assert len(notes) == 1  # told explicitly: no note
    with pytest.raises(IsocompressError, match="ref_intrinsic_length 'exp': choose log"):
        io.load(path, ref_intrinsic_length="exp")


def test_cli_shrink_note_on_stderr_and_in_the_report(tmp_path):
    net, path = write(tmp_path, "raw", True)
    result = cli(["shrink", path, "--exact", "--out", tmp_path / "a", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "isocompress: note:" in result.stderr and "--ref-intrinsic-length raw" in result.stderr
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert "positive_intrinsic_length=True" in report["notes"][0]
    result = cli(["shrink", path, "--exact", "--ref-intrinsic-length", "raw", "--out", tmp_path / "b", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "note" not in result.stderr
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert "notes" not in report and report["recipe"]["ref_intrinsic_length"] == "raw"
    x = probe(WIDTHS[0])
    with torch.no_grad():
        assert rel(net(x), io.load(tmp_path / "b" / "model.safetensors")(x.float())) <= 1e-5


@pytest.mark.parametrize("command", [["inspect"], ["export", "--format", "safetensors"],
                                     ["grow", "--layer", "0", "--add", "2"]])
def test_every_loading_command_takes_the_flag(tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    _, path = write(tmp_path, "raw", False)
    result = cli([command[0], path, *command[1:], "--ref-intrinsic-length", "raw"])
    assert result.exit_code == 0, result.output
    assert "note" not in result.stderr
    result = cli([command[0], path, *command[1:], "--ref-intrinsic-length", "exp"])
    assert result.exit_code == 2 and "'exp' is not one of 'log', 'raw'" in one_error_line(result)


def test_recipe_and_check_config_take_the_key(tmp_path):
    net, path = write(tmp_path, "raw", False)
    recipe = tmp_path / "r.toml"
    recipe.write_text('name = "raw"\nexact = true\nref-intrinsic-length = "raw"\nformats = ["safetensors"]\n')
    result = cli(["shrink", path, "--recipe", recipe, "--out", tmp_path / "o", "--quiet"])
    assert result.exit_code == 0 and "note" not in result.stderr, result.output
    config = tmp_path / "isocompress.toml"
    config.write_text(f'[[check]]\nmodel = "{path.name}"\nmax-params = 100000\nref-intrinsic-length = "raw"\n')
    result = cli(["check", "--config", config])
    assert result.exit_code == 0 and "note" not in result.stderr, result.output
    recipe.write_text('name = "raw"\nexact = true\nref-intrinsic-length = "exp"\n')
    result = cli(["shrink", path, "--recipe", recipe, "--out", tmp_path / "o2"])
    assert result.exit_code == 2 and "ref-intrinsic-length" in one_error_line(result)


def test_lossy_shrink_refuses_negative_o_in_one_line(tmp_path):
    _, path = write(tmp_path, "raw", True)
    result = cli(["shrink", path, "--budget", "50%", "--ref-intrinsic-length", "raw", "--out", tmp_path / "o"])
    assert result.exit_code == 2
    line = one_error_line(result)
    assert f"{path}: hidden layer 0 has o = -0.077 < 0: the certified error bounds of lossy shrinking assume o ≥ 0" in line
    assert not (tmp_path / "o").exists()


# --- error messages for what isocompress cannot read -------------------------------------------------------------
def test_notebook_pickle_is_refused_with_the_way_out(tmp_path):
    net = RefNet(WIDTHS, "raw", True)
    cache = tmp_path / "cache.pkl"
    with open(cache, "wb") as f:
        pickle.dump({"model": net}, f)
    result = cli(["shrink", cache])
    line = one_error_line(result)
    assert result.exit_code == 2
    assert "is never unpickled by default" in line and "isocompress convert FILE --trust-pickle" in line
    disguised = tmp_path / "cache.pt"  # the same bytes under a torch suffix
    disguised.write_bytes(cache.read_bytes())
    line = one_error_line(cli(["inspect", disguised]))
    assert "refused: the checkpoint holds Python objects" in line and "isocompress convert FILE --trust-pickle" in line


def test_convert_needs_the_explicit_word_then_reads_the_module(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    net = RefNet(WIDTHS, "raw", True)
    cache = tmp_path / "cache.pkl"
    with open(cache, "wb") as f:
        pickle.dump({"model": net}, f)
    result = cli(["convert", cache])
    assert result.exit_code == 2
    assert "pass --trust-pickle (trust_pickle=True) only for a file you trust" in one_error_line(result)
    assert not (tmp_path / "cache.safetensors").exists()
    result = cli(["convert", cache, "--trust-pickle"])
    assert result.exit_code == 0, result.output
    assert "measured by running the module's activations" in result.output  # no flag is read: o is measured
    x = probe(WIDTHS[0])
    with torch.no_grad():
        assert rel(net(x), io.load(tmp_path / "cache.safetensors")(x)) <= 1e-12
    # a reading mode that contradicts the module changes nothing: the module is run, and the option said to be unused
    result = cli(["convert", cache, "--trust-pickle", "--ref-intrinsic-length", "log", "--out", tmp_path / "b.pt"])
    assert result.exit_code == 0 and "was not needed and not used" in result.output
    with torch.no_grad():
        assert rel(net(x), io.load(tmp_path / "b.pt")(x)) <= 1e-12


def test_convert_names_missing_reference_code(tmp_path):
    cache = tmp_path / "cache.pkl"
    # A pickle that refers to a module that does not exist here (as a notebook cache does without the reference code).
    cache.write_bytes(b"\x80\x02cno_such_ref_mod\nNet\n)\x81.")  # GLOBAL, EMPTY_TUPLE, NEWOBJ, STOP
    line = one_error_line(cli(["convert", cache, "--trust-pickle"]))
    assert "refers to code that is not importable here" in line and "PYTHONPATH" in line


def test_non_isotropic_checkpoints_say_so(tmp_path):
    relu = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    torch.save(relu.state_dict(), tmp_path / "relu.pt")
    line = one_error_line(cli(["inspect", tmp_path / "relu.pt"]))
    assert "a plain (non-isotropic) network's weights" in line and "isocompress handles isotropic networks only" in line
    bare = {"layers.0.weight": torch.randn(8, 4), "layers.0.bias": torch.zeros(8),
            "layers.1.weight": torch.randn(2, 8), "layers.1.bias": torch.zeros(2)}
    torch.save(bare, tmp_path / "bare.pt")
    line = one_error_line(cli(["inspect", tmp_path / "bare.pt"]))
    assert "no hidden layer has an intrinsic length (no layers.N.o): not an isotropic network" in line
    assert "isocompress handles isotropic networks only" in line


def test_float32_and_float64_inputs_to_a_loaded_model(tmp_path):
    net, path = write(tmp_path, "log", True)
    model = load_as_author(path, "log")
    x = probe(WIDTHS[0])
    y32 = model(x.float())
    assert y32.dtype == torch.float32 and model(x).dtype == torch.float64
    with torch.no_grad():
        assert rel(net(x), y32) <= 1e-6
    with pytest.raises(IsocompressError, match="model input has dtype torch.int64"):
        model(torch.zeros(2, WIDTHS[0], dtype=torch.long))
    with pytest.raises(IsocompressError, match=r"expected \(\.\.\., 5\)"):
        model(torch.zeros(2, 4))


def test_shrink_options_name_the_mode(tmp_path):
    with pytest.raises(IsocompressError, match="reference intrinsic length 'exp'"):
        ShrinkOptions(ref_intrinsic_length="exp")
    _, path = write(tmp_path, "raw", False)
    report = shrink_file(path, tmp_path / "o", ShrinkOptions(ref_intrinsic_length="raw", formats=("safetensors",)),
                         progress=False)
    assert "notes" not in report and report["layers_before"][0]["o"] == pytest.approx(RAW_O[0])


def test_negative_o_breaks_the_lipschitz_bound_the_certificates_use():
    """Why lossy shrinking refuses o < 0 (docs/math.md, "Negative o"): just inside the sphere |z|² = −o the radial
    slope of f is 1 + 2|o|/3 > 1, while for o ≥ 0 it never exceeds 1."""
    from isocompress.core.primitives import isotropic_tanh

    def radial_slope(o: float, r: float, h: float = 1e-7) -> float:
        z = torch.tensor([[r - h], [r]], dtype=torch.float64)
        f = isotropic_tanh(z, o)[0][:, 0]
        return float((f[1] - f[0]) / h)

    assert radial_slope(-0.3, 0.3**0.5) == pytest.approx(1.2, rel=1e-5)
    assert max(radial_slope(0.0, r) for r in (1e-3, 0.5, 1.0, 2.0)) <= 1.0 + 1e-6
