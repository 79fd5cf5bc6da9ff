"""Lean ONNX graphs (issue 12, item 5): guards only where o needs them, o and psi folded into the weights, nodes per
layer as few as the maths allows, parity unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from isocompress.api.shrink import probe_inputs
from isocompress.core.model import IsoMLP, random_model
from isocompress.exact.shrink import shrink_exact
from isocompress.export.onnx_export import build_onnx, node_counts
from isocompress.formats import io

MODELS = Path(__file__).resolve().parent.parent / "models"


def ops_of(proto) -> list[str]:
    return [node.op_type for node in proto.graph.node]


def run(proto, x: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    return torch.from_numpy(session.run(["y"], {"x": x.numpy().astype(np_dtype)})[0].astype(np.float64))


def rel(reference, candidate) -> float:
    diff = torch.linalg.vector_norm(candidate - reference, dim=-1).max()
    return float(diff / torch.linalg.vector_norm(reference, dim=-1).max())


def with_o(model: IsoMLP, values) -> IsoMLP:
    from dataclasses import replace

    layers = list(model.layers)
    for i, value in enumerate(values):
        layers[i] = replace(layers[i], o=torch.tensor(float(value), dtype=torch.float64))
    return IsoMLP(layers)


@pytest.mark.parametrize("o,expected", [
    (0.5, ["ReduceL2", "Tanh", "Div"]),                          # folded: m = |(sqrt(o), z)|, no guard
    (0.0, ["ReduceSumSquare", "Max", "Sqrt", "Tanh", "Div"]),    # m reaches 0 at z = 0
    (1e-20, ["ReduceSumSquare", "Add", "Sqrt", "Tanh", "Div"]),  # too small to fold, large enough to keep m > 0
    (1e-40, ["ReduceSumSquare", "Add", "Max", "Sqrt", "Tanh", "Div"]),  # m² = 1e-40 is subnormal in float32
    (-0.3, ["ReduceSumSquare", "Add", "Abs", "Max", "Sqrt", "Tanh", "Div"]),  # m = 0 on the sphere |z|² = 0.3
])
def test_activation_nodes_are_what_o_needs(o, expected):
    model = with_o(random_model([3, 6, 2], seed=1), [o])
    ops = ops_of(build_onnx(model))
    assert ops[1:1 + len(expected)] == expected
    for guard in {"Abs", "Max", "Add", "Where", "Less"} - set(expected):
        assert guard not in ops


@pytest.mark.parametrize("o", [0.0, 1e-20, -0.3, 0.5])
def test_guarded_points_match_torch(o):
    """Rows that put m² = |o + |z|²| at 0 (or nearly) in the first hidden layer, float32 and float64."""
    model = with_o(random_model([3, 6, 6, 2], psi=True, seed=2), [o, o])
    b = model.layers[0].bias
    w = model.layers[0].weight
    targets = [torch.zeros(6, dtype=torch.float64)]
    if o < 0:
        targets.append(b / b.norm() * (-o) ** 0.5)  # a point with |z|² = −o
    rows = [torch.linalg.lstsq(w, (t - b)[:, None]).solution[:, 0] for t in targets]
    x = torch.cat([torch.stack(rows), probe_inputs(3, per_scale=8)])
    reference = model(x)
    assert rel(reference, run(build_onnx(model), x)) <= 1e-5
    assert rel(reference, run(build_onnx(model, dtype=torch.float64), x, torch.float64)) <= 1e-12


def test_digits_exact_shrunk_graph_is_lean():
    """The issue's case: 52 nodes before this change; now the activation is 3 nodes (o folded), psi costs nothing
    in dense layers, and the small diagonal layer (65 × 66) is written as a Gemm (DIAG_AS_GEMM_MAX). Nodes per layer:
    [Gemm + act, h + Gemm + act, h + Gemm + act, h + Gemm]; with the diagonal as a Mul it was [4, 5, 7, 2]."""
    original = io.load(MODELS / "digits.pt")
    shrunk = shrink_exact(original)
    assert [layer.kind for layer in shrunk.layers].count("diag") == 1
    counts = node_counts(build_onnx(shrunk))
    assert counts == [4, 5, 5, 2]
    assert node_counts(build_onnx(original)) == [4, 5, 5, 2]
    x = torch.from_numpy(np.load(MODELS / "digits.calib.npy")).double()
    assert rel(original(x), run(build_onnx(shrunk), x)) <= 1e-5


@settings(max_examples=25, deadline=None)
@given(widths=st.lists(st.integers(1, 8), min_size=3, max_size=6), psi=st.booleans(),
       o_low=st.sampled_from([-1.0, 0.0, 1e-14, 0.1]), seed=st.integers(0, 2**16))
def test_property_lean_graph_matches_torch(widths, psi, o_low, seed):
    """Any shapes, psi or not, o of either sign, dense or exact-shrunk (diagonal layers, widening and narrowing)."""
    model = shrink_exact(random_model(widths, psi=psi, o=(o_low, o_low + 1.0), seed=seed))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(40, widths[0], dtype=torch.float64, generator=gen) * torch.logspace(-3, 3, 40)[:, None].double()
    reference = model(x)
    proto = build_onnx(model)
    assert ops_of(proto).count("Tanh") == len(widths) - 2
    assert "Where" not in ops_of(proto) and "Identity" not in ops_of(proto)
    assert rel(reference, run(proto, x)) <= 1e-5
    assert rel(reference, run(build_onnx(model, dtype=torch.float64), x, torch.float64)) <= 1e-12


def test_small_diagonals_are_gemms_and_large_ones_vectors():
    """DIAG_AS_GEMM_MAX: a diagonal layer of at most that many dense entries is written as one Gemm (fewer nodes),
    a larger one as a 1-D vector (no 2-D initializer of its size); both match torch in float32 and float64."""
    from isocompress.export.onnx_export import DIAG_AS_GEMM_MAX

    for width, expect_gemm in ((int(DIAG_AS_GEMM_MAX ** 0.5), True), (int(DIAG_AS_GEMM_MAX ** 0.5) + 1, False)):
        model = shrink_exact(random_model([width, width, width, 3], psi=True, o=(0.1, 1.0), seed=1))
        diag = [i for i, layer in enumerate(model.layers) if layer.kind == "diag"]
        assert diag, "the exact shrink should diagonalise a layer"
        proto = build_onnx(model)
        sizes = sorted(int(np.prod(t.dims)) for t in proto.graph.initializer if len(t.dims) == 2)
        n_gemm = sum(node.op_type == "Gemm" for node in proto.graph.node)
        assert n_gemm == (len(model.layers) if expect_gemm else len(model.layers) - len(diag))
        assert len(sizes) == n_gemm
        x = probe_inputs(width, per_scale=8)
        assert rel(model(x), run(proto, x)) <= 1e-5
        assert rel(model(x), run(build_onnx(model, dtype=torch.float64), x, torch.float64)) <= 1e-12
