"""Isotropic CNNs: the geometry, the exact transforms against the untransformed network (float64 and float32, input
scales 0.01–1000, hypothesis over geometries), the file format, ONNX, and the operator-norm bounds."""


import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import isocompress
from isocompress.core import layers as L
from isocompress.core.errors import IsocompressError
from isocompress.core.geometry import Geometry, Pool
from isocompress.core.measure import probe_inputs, sample_norms
from isocompress.core.model import Layer, random_cnn
from isocompress.core.primitives import random_orthogonal
from isocompress.exact.shrink import shrink_exact, shrink_exact_accounted
from isocompress.formats import io

F64 = torch.float64
SCALES = (0.01, 1.0, 10.0, 1000.0)

TWO_D = ((2, 9, 8), [dict(channels=6, kernel=3, padding=1), dict(channels=7, kernel=(2, 3), stride=2, padding=(1, 0)),
                     dict(channels=9, kernel=1), dict(channels=5, pool=2, kernel=1), dict(channels=4, flatten=True),
                     dict(channels=3)])
ONE_D = ((1, 40), [dict(channels=16, kernel=5, padding=2), dict(channels=16, kernel=3, stride=2, padding=1, dilation=2),
                   dict(channels=16, pool=2, kernel=3), dict(channels=10, pool="global")])


def rel(y: torch.Tensor, y2: torch.Tensor) -> float:
    return float((sample_norms(y2 - y) / sample_norms(y).clamp_min(1e-300)).max())


def inputs(model, n: int = 12, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, *model.input_shape, dtype=F64, generator=gen) * s for s in SCALES]


def assert_same_function(a, b, tol64: float = 1e-10, tol32: float = 1e-5) -> None:
    for x in inputs(a):
        with torch.no_grad():
            assert rel(a(x), b(x)) <= tol64
            assert rel(a(x), b.cast(torch.float32)(x.float()).double()) <= tol32


# --- geometry ---------------------------------------------------------------------------------------------------
def test_conv_output_shapes_follow_torch():
    for spatial, kernel, stride, padding, dilation in [((9, 8), (3, 3), (1, 1), (1, 1), (1, 1)),
                                                       ((9, 8), (2, 3), (2, 2), (1, 0), (1, 1)),
                                                       ((40,), (3,), (2,), (1,), (2,)), ((7,), (7,), (1,), (0,), (1,))]:
        g = Geometry(in_spatial=spatial, kernel=kernel, stride=stride, padding=padding, dilation=dilation)
        conv = torch.nn.functional.conv1d if len(spatial) == 1 else torch.nn.functional.conv2d
        out = conv(torch.zeros(1, 1, *spatial), torch.zeros(1, 1, *kernel), stride=stride, padding=padding,
                   dilation=dilation)
        assert g.out_spatial == tuple(out.shape[2:])


def test_geometry_refusals_name_the_problem():
    with pytest.raises(IsocompressError, match="does not fit"):
        Geometry(in_spatial=(3,), kernel=(5,))
    with pytest.raises(IsocompressError, match="must cover the whole map"):
        Geometry(in_spatial=(6,), kernel=(3,), flatten=True)
    with pytest.raises(IsocompressError, match="needs a kernel"):
        Geometry(in_spatial=(6,))
    with pytest.raises(IsocompressError, match="at most half the pool kernel"):
        Pool(kernel=(2,), padding=(2,))


def dense_operator(layer: Layer, psi: bool = False) -> torch.Tensor:
    """The layer's weight (or psi) map as an explicit matrix on the flattened input map, by applying it to the basis."""
    geometry = layer.geometry
    channels = 1 if psi else layer.n_in
    n = channels * geometry.in_positions
    basis = torch.eye(n, dtype=F64).reshape(n, channels, *geometry.in_spatial)
    if geometry.pool is not None:
        from isocompress.core.model import pool_map

        basis = pool_map(basis, geometry)
    out = layer._psi_term(basis) if psi else layer.apply_weight(basis)
    return out.reshape(n, -1).T


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(length=st.integers(3, 12), k=st.integers(1, 5), stride=st.integers(1, 3), dilation=st.integers(1, 3),
       padding=st.integers(0, 2), pool=st.sampled_from([None, 2, 3]), seed=st.integers(0, 10_000))
def test_property_the_conv_operator_norm_bound_holds(length, k, stride, dilation, padding, pool, seed):
    """‖W ⋆ pool(h)‖ ≤ input_op_norm · ‖M‖₂ against the explicit operator (docs/bounds.md, "Convolutional layers")."""
    spec = dict(channels=3, kernel=k, stride=stride, dilation=dilation, padding=padding)
    if pool is not None:
        spec.update(pool=pool)
    try:
        model = random_cnn((2, length), [spec, dict(channels=2, pool="global")], psi=True, seed=seed)
    except IsocompressError:
        return  # the kernel does not fit this map
    layer = model.layers[0]
    true = float(torch.linalg.matrix_norm(dense_operator(layer), ord=2))
    bound = layer.geometry.input_op_norm() * float(torch.linalg.matrix_norm(layer.matrix(), ord=2))
    assert true <= bound * (1 + 1e-12)


def test_the_overlap_bound_is_reached_without_padding_effects():
    """For stride 1, a long map and an all-equal kernel the bound sqrt(k)·‖M‖₂ is nearly tight (a constant input map
    attains it): the bound is not loose by construction."""
    from dataclasses import replace

    model = random_cnn((1, 200), [dict(channels=1, kernel=4), dict(channels=1, pool="global")], seed=0)
    layer = replace(model.layers[0], weight=torch.ones(1, 1, 4, dtype=F64))
    true = float(torch.linalg.matrix_norm(dense_operator(layer), ord=2))
    bound = layer.geometry.input_op_norm() * float(torch.linalg.matrix_norm(layer.matrix(), ord=2))
    assert true <= bound * (1 + 1e-12) and true >= 0.99 * bound


# --- exact transforms --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", [TWO_D, ONE_D], ids=["2d", "1d"])
@pytest.mark.parametrize("sigma", ["tanh", "log1p"])
def test_rotations_and_diagonalisations_keep_the_function(case, sigma):
    model = random_cnn(*case, psi=True, o=(0.0, 0.5), sigma=sigma, seed=1)
    gen = torch.Generator().manual_seed(5)
    for i in range(len(model.layers) - 1):
        rotated = L.rotate_hidden(model, i, random_orthogonal(model.layers[i].n_out, gen))
        assert_same_function(model, rotated)
        assert_same_function(model, L.diagonalise_left(model, i))
    for i in L.diagonalisable_layers(model):
        full = L.diagonalise_full(model, i)
        assert full.layers[i].kind == "diag"
        assert_same_function(model, full)


def test_only_pointwise_layers_are_diagonalisable():
    model = random_cnn(*TWO_D, seed=0)
    kinds = [layer.geometry.pointwise for layer in model.layers]
    assert L.diagonalisable_layers(model) == [i for i in range(1, len(kinds) - 1) if kinds[i]]
    with pytest.raises(IsocompressError, match="must be pointwise"):
        L.diagonalise_full(model, 1)


@pytest.mark.parametrize("case", [TWO_D, ONE_D], ids=["2d", "1d"])
@pytest.mark.parametrize("psi", [False, True])
def test_exact_shrink_is_the_same_function_at_every_scale(case, psi):
    model = random_cnn(*case, psi=psi, o=(0.0, 0.5), seed=2)
    shrunk = shrink_exact(model)
    assert shrunk.num_params() <= model.num_params()
    assert_same_function(model, shrunk)


def test_the_first_conv_reaches_its_rank_floor():
    """A first conv with more output channels than C_in·k keeps C_in·k of them; the next hidden space keeps at most
    the rank of [M, Ψ] (its input channels times taps, plus the psi kernel's taps)."""
    model = random_cnn((2, 20), [dict(channels=30, kernel=3, padding=1), dict(channels=40, kernel=2),
                                 dict(channels=4, pool="global")], psi=True, o=0.2, seed=3)
    shrunk = shrink_exact(model)
    assert shrunk.widths[1] == 2 * 3
    assert shrunk.widths[2] <= 6 * 2 + 2
    assert_same_function(model, shrunk)


def test_constant_channels_go_into_o_and_the_psi_kernel():
    """A conv whose kernel has a zero row: that channel is its bias at every position, padded borders included; it is
    removed exactly, o grows by bias², and the next conv gets a psi kernel."""
    model = random_cnn((1, 10), [dict(channels=3, kernel=3, padding=1), dict(channels=2, kernel=3, padding=1),
                                 dict(channels=2, pool="global")], o=0.1, seed=4)
    first = model.layers[0]
    weight = first.weight.clone()
    weight[2] = 0.0
    model = model.with_layers({0: Layer(weight=weight, bias=first.bias, n_in=1, o=first.o, geometry=first.geometry)})
    shrunk = L.remove_constant_directions(model, 0, rtol=1e-12)
    assert shrunk.widths[1] == 2
    assert float(shrunk.layers[0].o) == pytest.approx(0.1 + float(first.bias[2]) ** 2)
    assert shrunk.layers[1].psi is not None and tuple(shrunk.layers[1].psi.shape) == (2, 3)
    assert_same_function(model, shrunk)


def test_zero_bias_constant_directions_need_no_psi():
    model = random_cnn((1, 12), [dict(channels=8, kernel=3), dict(channels=3, flatten=True)], bias_scale=0.0, seed=6)
    shrunk = shrink_exact(model)
    assert shrunk.widths[1] == 3 and shrunk.layers[1].psi is None
    assert_same_function(model, shrunk)


def test_the_proven_bound_of_the_exact_shrink_covers_what_it_drops():
    """Amplified tiny directions: the output-relative rule drops those whose proven effect is ≤ 1e-10 × |y|, and the
    measured change stays below the recorded bound D."""
    model = random_cnn((1, 16), [dict(channels=10, kernel=2), dict(channels=10, kernel=3), dict(channels=3, pool=2,
                                                                                                  flatten=True)],
                       psi=True, o=0.3, seed=7)
    first = model.layers[0]
    weight = first.weight.clone()
    weight[5:] = weight[5:] * 1e-14
    model = model.with_layers({0: Layer(weight=weight, bias=first.bias, n_in=1, o=first.o, geometry=first.geometry)})
    shrunk, record = shrink_exact_accounted(model)
    assert record["dropped"][0] >= 5 - 2  # the C_in·k = 2 rank floor, and the tiny directions
    x = probe_inputs(model.input_shape, per_scale=32)
    with torch.no_grad():
        assert float(sample_norms(model(x) - shrunk(x)).max()) <= record["bound"] + 1e-13


GEOMETRIES = st.fixed_dictionaries({
    "kernel": st.integers(1, 4), "stride": st.integers(1, 3), "dilation": st.integers(1, 2),
    "padding": st.integers(0, 2), "pool": st.sampled_from([None, 2]), "channels": st.integers(1, 7)})


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(convs=st.lists(GEOMETRIES, min_size=1, max_size=3), head=st.sampled_from(["flatten", "global", "pool1x1"]),
       length=st.integers(9, 17), two_d=st.booleans(), psi=st.booleans(), sigma=st.sampled_from(["tanh", "log1p"]),
       o=st.floats(0.0, 1.0), seed=st.integers(0, 10_000))
def test_property_exact_shrink_over_geometries(convs, head, length, two_d, psi, sigma, o, seed):
    shape = (2, length, length - 2) if two_d else (2, length)
    specs = [dict(c) for c in convs]
    for spec in specs:
        if spec["pool"] is None:
            del spec["pool"]
    specs += [dict(channels=3, flatten=True)] if head == "flatten" else \
        [dict(channels=3, pool="global")] if head == "global" else [dict(channels=3, kernel=1), dict(channels=2,
                                                                                                     pool="global")]
    try:
        model = random_cnn(shape, specs, psi=psi, o=o, sigma=sigma, seed=seed)
    except IsocompressError:
        return  # a geometry that does not fit the map
    shrunk = shrink_exact(model)
    for x in inputs(model, n=6, seed=seed):
        with torch.no_grad():
            assert rel(model(x), shrunk(x)) <= 1e-10
            assert rel(model(x), shrunk.cast(torch.float32)(x.float()).double()) <= 1e-5


# --- files ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_cnn_round_trips_through_its_file(tmp_path, suffix):
    model = shrink_exact(random_cnn(*TWO_D, psi=True, o=(0.1, 0.5), sigma="log1p", seed=8))
    path = io.save(model, tmp_path / f"m{suffix}", dtype=F64)
    loaded = io.load(path)
    assert loaded.config == model.config and loaded.config.version == 2
    assert [layer.geometry for layer in loaded.layers] == [layer.geometry for layer in model.layers]
    x = inputs(model)[1]
    with torch.no_grad():
        assert rel(model(x), loaded(x)) <= 1e-14  # the same tensors (conv kernels may round differently)


def test_an_mlp_is_still_written_as_version_1(tmp_path):
    model = isocompress.random_model([4, 6, 3], psi=True, o=0.1)
    assert model.config.version == 1
    assert set(__import__("json").loads(model.config.to_json())) == {"widths", "kinds", "has_psi", "format", "version"}


def test_a_conv_kernel_without_its_config_is_refused(tmp_path):
    from safetensors.torch import save_file

    model = random_cnn((1, 8), [dict(channels=2, kernel=3), dict(channels=2, flatten=True)], o=0.1)
    tensors = {k: v.float().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(tmp_path / "bare.safetensors"))
    with pytest.raises(IsocompressError, match="convolution kernel but the file has no 'isocompress_config'"):
        io.load(tmp_path / "bare.safetensors")


def test_the_reference_layout_refuses_a_cnn():
    with pytest.raises(IsocompressError, match="holds tanh MLPs only"):
        io.reference_state_dict(random_cnn(*ONE_D))


# --- ONNX ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", [TWO_D, ONE_D], ids=["2d", "1d"])
@pytest.mark.parametrize("sigma", ["tanh", "log1p"])
def test_onnx_has_conv_nodes_and_the_modules_input_shape(tmp_path, case, sigma):
    import onnx

    from isocompress.export.onnx_export import export_onnx

    model = shrink_exact(random_cnn(*case, psi=True, o=(0.05, 0.5), sigma=sigma, seed=9))
    record = export_onnx(model, tmp_path / "m.onnx")
    assert record["max_rel_diff"] <= 1e-5
    proto = onnx.load(str(tmp_path / "m.onnx"))
    ops = {node.op_type for node in proto.graph.node}
    assert "Conv" in ops and ("Log" in ops) == (sigma == "log1p")
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == list(model.input_shape)


def test_onnx_refuses_float64_convolutions(tmp_path):
    from isocompress.export.onnx_export import export_onnx

    with pytest.raises(IsocompressError, match="no float64 Conv"):
        export_onnx(random_cnn(*ONE_D), tmp_path / "m.onnx", dtype=F64)


def test_log1p_gain_slope_constant():
    """sup_m |g'(m)| for g = log1p(m)/m is its limit 1/2 at m = 0 (docs/bounds.md, "6b"): evaluated in 40-digit
    arithmetic (the float64 formula cancels at small m), |g'| decreases along a sweep from 1e-12 to 1e4."""
    import mpmath

    from isocompress.exact.constants import LOG1P_GAIN_LIPSCHITZ

    mpmath.mp.dps = 40
    ms = [mpmath.mpf(10) ** (mpmath.mpf(e) / 100) for e in range(-1200, 401)]
    slopes = [(mpmath.log1p(m) - m / (1 + m)) / (m * m) for m in ms]
    assert all(0 < s < LOG1P_GAIN_LIPSCHITZ for s in slopes)
    assert all(b < a for a, b in zip(slopes, slopes[1:]))
    assert slopes[0] > LOG1P_GAIN_LIPSCHITZ - 1e-11
