"""ONNX export (isocompress.export.onnx_export) and the commands that write it: parity with the torch forward in onnxruntime,
graph structure, dynamic batch, verification failures, `shrink`/`export` formats."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import cli, one_error_line
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

from isocompress.api.shrink import probe_inputs
from isocompress.core.errors import CheckFailed, IsocompressError
from isocompress.core.model import IsoMLP, random_model
from isocompress.exact.shrink import shrink_exact
from isocompress.export import onnx_export
from isocompress.export.onnx_export import build_onnx, export_and_verify, write_onnx
from isocompress.formats import io

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "models"
SHIPPED = ("digits", "mnist1d")
FLOAT32_RTOL = 1e-5


# --- helpers ---------------------------------------------------------------------------------------------------------
def session_for(source) -> ort.InferenceSession:
    """A CPU session from a file path or serialised bytes."""
    data = str(source) if isinstance(source, Path) else source
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def run(session, x: torch.Tensor, np_dtype=np.float32) -> torch.Tensor:
    y = session.run(["y"], {"x": x.numpy().astype(np_dtype)})[0]
    return torch.from_numpy(y.astype(np.float64))


def rel_diff(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """max over rows of |Δy| (L2), relative to the largest |y|: the measure report.json records. NaN → inf."""
    if not bool(torch.isfinite(candidate).all()):
        return float("inf")
    diff = torch.linalg.vector_norm(candidate - reference, dim=-1).max()
    return float(diff / torch.linalg.vector_norm(reference, dim=-1).max())


def inputs(n_in: int, n: int, seed: int = 0) -> torch.Tensor:
    """n rows at scales from 1e-3 to 1e3 (far outside any data as well as inside)."""
    gen = torch.Generator().manual_seed(seed)
    scales = torch.tensor([1e-3, 0.1, 1.0, 3.0, 10.0, 1e3], dtype=torch.float64)
    return torch.randn(n, n_in, dtype=torch.float64, generator=gen) * scales[torch.arange(n) % len(scales)][:, None]


def torch_forward(model: IsoMLP, x: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    with torch.no_grad():
        return model.cast(dtype)(x.to(dtype)).to(torch.float64)


def check_batches(model: IsoMLP, path: Path, x: torch.Tensor, np_dtype=np.float32, rtol=FLOAT32_RTOL) -> None:
    """One file, one session: batch 37, then rows alone (batch 1); each within rtol of the torch forward (float64,
    and the torch forward in the file's own precision)."""
    session = session_for(path)
    assert x.shape[0] == 37
    y37 = run(session, x, np_dtype)
    assert y37.shape == (37, model.widths[-1])
    reference = torch_forward(model, x)
    own = torch_forward(model, x, torch.float32 if np_dtype == np.float32 else torch.float64)
    assert rel_diff(reference, y37) <= rtol
    assert rel_diff(own, y37) <= rtol
    for row in (0, 17, 36):
        y1 = run(session, x[row:row + 1], np_dtype)
        assert y1.shape == (1, model.widths[-1])
        assert rel_diff(reference[row:row + 1], y1) <= rtol
    # The batch of 1 computes the same numbers as the same row inside the batch of 37 (no batch-size dependence
    # beyond float32 rounding).
    assert rel_diff(y37[:1], run(session, x[:1], np_dtype)) <= rtol


def shipped(name: str) -> tuple[IsoMLP, torch.Tensor]:
    model = io.load(MODELS / f"{name}.pt")
    calib = torch.from_numpy(np.load(MODELS / f"{name}.calib.npy")).to(torch.float64)
    return model, calib


def graph_dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def with_zero_biases(model: IsoMLP) -> IsoMLP:
    return IsoMLP([replace(layer, bias=torch.zeros_like(layer.bias)) for layer in model.layers])


# --- parity in onnxruntime -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SHIPPED)
@pytest.mark.parametrize("shrunk", [False, True], ids=["original", "exact-shrunk"])
def test_shipped_models_match_torch_at_batch_1_and_37(tmp_path, name, shrunk):
    model, calib = shipped(name)
    if shrunk:
        model = shrink_exact(model)
        assert any(layer.kind == "diag" for layer in model.layers)
    path = write_onnx(model, tmp_path / "model.onnx")
    x = torch.cat([calib[:31], inputs(model.widths[0], 6)])  # data and far-from-data inputs in one batch of 37
    check_batches(model, path, x)


@pytest.mark.parametrize("widths, seed", [([7, 16, 16, 16, 3], 1), ([12, 48, 48, 48, 6], 2), ([9, 5, 11, 4, 2], 3)])
@pytest.mark.parametrize("shrunk", [False, True], ids=["original", "exact-shrunk"])
def test_random_models_with_psi_and_o_match_torch(tmp_path, widths, seed, shrunk):
    model = random_model(widths, psi=True, o=(0.1, 1.0), seed=seed)
    assert all(float(layer.o) > 0 for layer in model.layers[:-1])
    if shrunk:
        model = shrink_exact(model)
    path = write_onnx(model, tmp_path / "model.onnx")
    check_batches(model, path, inputs(widths[0], 37, seed=seed))


def test_batch_axis_is_dynamic_and_checker_passes(tmp_path):
    model = shrink_exact(random_model([6, 20, 20, 20, 4], psi=True, o=(0.1, 1.0), seed=4))
    path = write_onnx(model, tmp_path / "model.onnx")
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    (x_info,), (y_info,) = proto.graph.input, proto.graph.output
    assert (x_info.name, y_info.name) == ("x", "y")
    for info, width in ((x_info, model.widths[0]), (y_info, model.widths[-1])):
        batch, features = info.type.tensor_type.shape.dim
        assert batch.dim_param == "batch" and not batch.HasField("dim_value")
        assert features.dim_value == width
    assert proto.ir_version == 8
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", 17)]
    assert not list(tmp_path.glob("*.data")), "the file must be self-contained"
    # Any batch size runs from the same file, including sizes never seen at export time.
    session = session_for(path)
    for n in (1, 2, 37, 300):
        assert session.run(["y"], {"x": np.zeros((n, 6), np.float32)})[0].shape == (n, 4)


def test_exact_shrunk_graph_stores_diagonal_layers_as_vectors(tmp_path):
    """Walk the graph: every diagonal layer is a 1-D initializer consumed by Mul; the only 2-D initializers are the
    Gemm weights of the dense layers, one Gemm per dense layer, no MatMul."""
    model = shrink_exact(random_model([140, 140, 140, 140, 140, 140, 3], psi=True, o=(0.1, 1.0), seed=5))
    kinds = [layer.kind for layer in model.layers]
    assert kinds.count("diag") >= 2  # 140 × 140 > DIAG_AS_GEMM_MAX: these stay vectors
    proto = onnx.load(str(write_onnx(model, tmp_path / "model.onnx")))
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    consumers: dict[str, list] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    ops = [node.op_type for node in proto.graph.node]
    assert ops.count("Gemm") == kinds.count("dense")
    assert "MatMul" not in ops
    gemm_weights = [node.input[1] for node in proto.graph.node if node.op_type == "Gemm"]
    two_d = sorted(name for name, value in inits.items() if value.ndim >= 2)
    assert two_d == sorted(gemm_weights)
    # The graph may carry one extra first coordinate (o folded as sqrt(o), psi folded as a column) and zero rows
    # that keep a widening diagonal elementwise: the matrices hold the dense weights and psi, and nothing else.
    dense = [layer for layer in model.layers if layer.kind == "dense"]
    for name, layer in zip(gemm_weights, dense):
        rows, cols = inits[name].shape
        assert layer.n_out <= rows <= layer.n_out + 1 + layer.n_out and layer.n_in <= cols <= layer.n_in + 1 + 140
    n_nonzero = sum(int(np.count_nonzero(inits[name])) for name in two_d)
    allowed = sum(layer.weight.numel() + (0 if layer.psi is None else layer.n_out) for layer in dense)
    assert n_nonzero <= allowed
    for i, layer in enumerate(model.layers):
        if layer.kind != "diag":
            continue
        # Find the diagonal by value, not by name: a 1-D initializer holding exactly this layer's diagonal, with at
        # most a leading 0 (the carried coordinate) and trailing zeros.
        d = layer.weight.to(torch.float32).numpy()
        matches = [name for name, value in inits.items() if value.ndim == 1 and value.dtype == np.float32
                   and any(np.array_equal(value[s:s + d.size], d) and not value[:s].any() and not value[s + d.size:].any()
                           for s in (0, 1))]
        assert len(matches) == 1, f"layer {i}: its diagonal is not stored as one vector"
        (users,) = [consumers[matches[0]]]
        assert [node.op_type for node in users] == ["Mul"]


def test_zero_input_with_o_zero_gives_finite_output(tmp_path):
    """o = 0 and zero biases: a zero input row makes m = 0 in every hidden layer (the series branch)."""
    model = with_zero_biases(random_model([5, 8, 8, 3], psi=True, o=0.0, seed=6))
    assert all(float(layer.o) == 0 for layer in model.layers[:-1])
    path = write_onnx(model, tmp_path / "model.onnx")
    session = session_for(path)
    x = torch.zeros(3, 5, dtype=torch.float64)
    x[1] = 1e-6  # tiny: m² below the series threshold
    x[2] = 1.0
    y = run(session, x)
    assert bool(torch.isfinite(y).all())
    reference = torch_forward(model, x)
    assert torch.allclose(y, reference, rtol=1e-5, atol=1e-6)
    # With zero biases and zero input, z_1 = 0 and h_1 = 0, so z_2 = psi_2 · g_1 = psi_2 (g → 1), and so on.
    assert not bool((y[0] == 0).all()), "psi must carry g = 1 through the series branch"


def test_float64_export(tmp_path):
    model = shrink_exact(random_model([7, 30, 30, 30, 4], psi=True, o=(0.1, 1.0), seed=7))
    record = export_and_verify(model, tmp_path / "model.onnx", probe_inputs(7, per_scale=16), rtol=1e-12,
                               dtype=torch.float64)
    assert record["dtype"] == "float64"
    assert record["max_rel_diff"] <= 1e-12
    proto = onnx.load(str(tmp_path / "model.onnx"))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.DOUBLE
    assert all(t.data_type in (onnx.TensorProto.DOUBLE, onnx.TensorProto.INT64) for t in proto.graph.initializer)
    check_batches(model, tmp_path / "model.onnx", inputs(7, 37), np_dtype=np.float64, rtol=1e-12)


def test_unsupported_dtype_is_a_clear_error():
    with pytest.raises(IsocompressError, match="float32 or float64"):
        build_onnx(random_model([3, 4, 2]), dtype=torch.float16)


# --- verification: the record and its failures ----------------------------------------------------------------------
def test_export_and_verify_records_the_check(tmp_path):
    model = random_model([6, 12, 12, 2], psi=True, o=(0.1, 1.0), seed=8)
    probes = probe_inputs(6, per_scale=50)
    record = export_and_verify(model, tmp_path / "m.onnx", probes)
    assert 0 <= record["max_rel_diff"] <= FLOAT32_RTOL
    assert 0 <= record["max_abs_diff"]
    assert record["n_probes"] == 200
    assert 1 in record["batch_sizes"] and max(record["batch_sizes"]) > 1
    assert record["bytes"] == (tmp_path / "m.onnx").stat().st_size
    assert (record["opset"], record["ir_version"], record["tolerance"]) == (17, 8, 1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no temporary file left


def test_tiny_tolerance_fails_and_removes_the_file(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"stale file from an earlier run")
    model = random_model([6, 12, 12, 2], psi=True, o=(0.1, 1.0), seed=9)
    with pytest.raises(CheckFailed, match="differs from the torch forward") as excinfo:
        export_and_verify(model, path, probe_inputs(6, per_scale=8), rtol=1e-300)
    assert excinfo.value.exit_code == 1
    assert list(tmp_path.iterdir()) == []


def test_a_wrong_graph_fails_verification(tmp_path, monkeypatch):
    """A graph that does not compute the model (here: another model's weights) must fail at the default tolerance."""
    model = random_model([6, 12, 12, 2], psi=True, o=(0.1, 1.0), seed=10)
    impostor = random_model([6, 12, 12, 2], psi=True, o=(0.1, 1.0), seed=11)
    real_build = onnx_export.build_onnx
    monkeypatch.setattr(onnx_export, "build_onnx", lambda m, *a, **k: real_build(impostor, *a, **k))
    with pytest.raises(CheckFailed):
        export_and_verify(model, tmp_path / "model.onnx", probe_inputs(6, per_scale=8))
    assert not (tmp_path / "model.onnx").exists()


def test_nan_output_fails_every_tolerance(tmp_path, monkeypatch):
    model = random_model([4, 6, 2], seed=12)
    real_run = onnx_export.run_onnx

    def poisoned(*args, **kwargs):
        y, sizes = real_run(*args, **kwargs)
        y[0, 0] = float("nan")
        return y, sizes

    monkeypatch.setattr(onnx_export, "run_onnx", poisoned)
    with pytest.raises(CheckFailed, match="nan"):
        export_and_verify(model, tmp_path / "model.onnx", probe_inputs(4, per_scale=4), rtol=1e300)
    assert not (tmp_path / "model.onnx").exists()


def test_probe_shape_is_checked(tmp_path):
    with pytest.raises(IsocompressError, match="probe inputs of shape"):
        export_and_verify(random_model([4, 6, 2]), tmp_path / "m.onnx", torch.zeros(3, 5))
    assert not (tmp_path / "m.onnx").exists()


# --- hypothesis: any small model, dense or shrunk ---------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(
    widths=st.lists(st.integers(1, 9), min_size=2, max_size=6),
    psi=st.booleans(),
    o_low=st.sampled_from([0.0, 0.1, 2.0]),
    shrink=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_any_small_model_exports_exactly(widths, psi, o_low, shrink, seed):
    model = random_model(widths, psi=psi, o=(o_low, o_low + 1.0), seed=seed)
    if shrink and len(widths) > 2:
        model = shrink_exact(model)
    proto = build_onnx(model)
    ops = [node.op_type for node in proto.graph.node]
    from isocompress.export.onnx_export import small_diagonals_dense

    assert ops.count("Gemm") == sum(small_diagonals_dense(layer).kind == "dense" for layer in model.layers)
    assert ops.count("Tanh") == len(model.layers) - 1
    session = session_for(proto.SerializeToString())
    x = inputs(widths[0], 37, seed=seed)
    reference = torch_forward(model, x)
    assert rel_diff(reference, run(session, x)) <= FLOAT32_RTOL
    assert rel_diff(reference[5:6], run(session, x[5:6])) <= FLOAT32_RTOL


# --- commands ----------------------------------------------------------------------------------------------------------
@pytest.fixture
def wide_model(tmp_path):
    path = tmp_path / "wide.pt"
    io.save(random_model([12, 64, 64, 64, 6], psi=True, o=(0.1, 1.0), seed=3), path, dtype=torch.float32)
    return path


def test_shrink_writes_a_verified_onnx_file_by_default(tmp_path, wide_model):
    out = tmp_path / "out"
    result = cli(["shrink", wide_model, "--out", out, "--quiet"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.safetensors", "report.json"]
    report = json.loads((out / "report.json").read_text())
    assert 0 <= report["onnx"]["max_abs_diff"]
    assert 0 <= report["onnx"]["max_rel_diff"] <= FLOAT32_RTOL
    assert report["onnx"]["tolerance"] == 1e-4
    assert report["files"]["onnx"] == str(out / "model.onnx")
    assert report["bytes_after"]["onnx"] == (out / "model.onnx").stat().st_size
    # The ONNX file computes the shrunk model, which computes the original.
    original = io.load(wide_model)
    shrunk = io.load(out / "model.safetensors")
    assert shrunk.widths == (12, 12, 13, 14, 6)
    check_batches(original, out / "model.onnx", inputs(12, 37))


@pytest.mark.parametrize("formats, expected", [
    ("onnx,safetensors", ["model.onnx", "model.safetensors", "report.json"]),
    ("safetensors,onnx", ["model.onnx", "model.safetensors", "report.json"]),
    ("safetensors", ["model.safetensors", "report.json"]),
    ("onnx", ["model.onnx", "report.json"]),
])
def test_shrink_format_chooses_the_files(tmp_path, wide_model, formats, expected):
    out = tmp_path / "out"
    result = cli(["shrink", wide_model, "--out", out, "--format", formats, "--quiet"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == expected
    report = json.loads((out / "report.json").read_text())
    assert ("onnx" in report) == ("onnx" in formats)
    assert sorted(report["files"]) == sorted(formats.split(","))


def test_shrink_onnx_tol_too_tight_exits_1_and_leaves_nothing(tmp_path, wide_model):
    out = tmp_path / "out"
    result = cli(["shrink", wide_model, "--out", out, "--onnx-tol", "1e-300", "--quiet"])
    assert result.exit_code == 1
    line = one_error_line(result)
    assert "onnxruntime output differs from the torch forward" in line and "1e-300" in line
    assert not out.exists()


def test_failed_check_leaves_an_existing_folder_untouched(tmp_path, wide_model):
    # issue 13: a failed run publishes nothing and never removes files it did not write
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"an earlier export")
    result = cli(["shrink", wide_model, "--out", out, "--onnx-tol", "1e-300", "--format", "onnx", "--quiet"])
    assert result.exit_code == 1
    assert (out / "model.onnx").read_bytes() == b"an earlier export"
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx"]


def test_export_writes_the_unchanged_model(tmp_path, wide_model):
    out = tmp_path / "exp"
    result = cli(["export", wide_model, "--format", "onnx", "--out", out])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "report.json"]
    report = json.loads((out / "report.json").read_text())
    assert report["widths"] == [12, 64, 64, 64, 6]
    assert 0 <= report["onnx"]["max_rel_diff"] <= FLOAT32_RTOL
    assert "onnxruntime vs torch" in result.stdout
    proto = onnx.load(str(out / "model.onnx"))
    assert [node.op_type for node in proto.graph.node].count("Gemm") == 4  # unchanged: every layer dense
    check_batches(io.load(wide_model), out / "model.onnx", inputs(12, 37))


def test_export_with_calibration_and_json(tmp_path):
    out = tmp_path / "exp"
    result = cli(["export", MODELS / "digits.pt", "--out", out, "--calibration", MODELS / "digits.calib.npy",
                  "--format", "onnx,safetensors", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report == json.loads((out / "report.json").read_text())
    assert report["probe_inputs"] == "calibration data"
    assert report["onnx"]["n_probes"] == 256
    assert sorted(report["files"]) == ["onnx", "safetensors"]
    assert io.load(out / "model.safetensors").widths == (64, 256, 256, 256, 10)


def test_export_in_a_real_process(tmp_path, wide_model):
    script = Path(sys.executable).parent / "isocompress"
    command = [str(script)] if script.exists() else [sys.executable, "-c", "from isocompress.cli import main; main()"]
    proc = subprocess.run(command + ["export", str(wide_model), "--format", "onnx", "--out", str(tmp_path / "exp")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "exp" / "model.onnx").exists()
    assert "max |Δy|" in proc.stdout
    proc = subprocess.run(command + ["export", str(wide_model), "--format", "tflite", "--out", str(tmp_path / "bad")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "isocompress: error: --format 'tflite': unknown format 'tflite'; choose from onnx, safetensors"
        " (comma-separated)"
    ]
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("command", ["export", "shrink"])
@pytest.mark.parametrize("formats", ["xml", "onnx,xml", ","])
def test_bad_format_is_exit_2_with_one_line(tmp_path, wide_model, command, formats):
    out = tmp_path / "out"
    result = cli([command, wide_model, "--format", formats, "--out", out])
    assert result.exit_code == 2
    line = one_error_line(result)
    assert line.startswith("isocompress: error:")
    assert "format" in line and "onnx" in line and "safetensors" in line
    if formats != ",":
        assert "'xml'" in line
    assert not out.exists()


def test_export_bad_tolerance_is_exit_2(tmp_path, wide_model):
    result = cli(["export", wide_model, "--onnx-tol", "0", "--out", tmp_path / "out"])
    assert result.exit_code == 2
    assert "--onnx-tol" in one_error_line(result)
    assert not (tmp_path / "out").exists()


def test_export_failing_check_exits_1(tmp_path, wide_model):
    result = cli(["export", wide_model, "--onnx-tol", "1e-300", "--out", tmp_path / "out"])
    assert result.exit_code == 1
    assert "the file was removed" in one_error_line(result)
    assert not (tmp_path / "out").exists()
