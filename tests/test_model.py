"""The model itself: forward pass, activation near zero, parameter count, config round trip."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from isocompress.core.config import ModelConfig
from isocompress.core.errors import IsocompressError
from isocompress.core.model import IsoMLP, Layer, random_model
from isocompress.core.primitives import diag_matmul, diag_to_dense, isotropic_gain, isotropic_tanh
from isocompress.exact.shrink import alternate_diagonalise


def test_gain_matches_tanh_over_m_on_both_sides_of_the_series_switch():
    m2 = torch.logspace(-14, 4, 400, dtype=torch.float64)
    expected = torch.tensor([math.tanh(math.sqrt(v)) / math.sqrt(v) for v in m2.tolist()], dtype=torch.float64)
    assert torch.allclose(isotropic_gain(m2), expected, rtol=1e-14, atol=0)


def test_activation_is_finite_with_finite_gradients_at_zero():
    z = torch.zeros(2, 5, dtype=torch.float64, requires_grad=True)
    h, g = isotropic_tanh(z, 0.0)
    (h.sum() + g.sum()).backward()
    assert torch.equal(g, torch.ones(2, 1, dtype=torch.float64))
    assert torch.isfinite(z.grad).all()


@given(n=st.integers(1, 12), seed=st.integers(0, 1000), o=st.floats(0, 4))
def test_activation_commutes_with_rotations(n, seed, o):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(7, n, dtype=torch.float64, generator=gen) * 3
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))
    h_rot, _ = isotropic_tanh(z @ q.T, o)
    h, _ = isotropic_tanh(z, o)
    assert torch.allclose(h_rot, h @ q.T, atol=1e-13)


def test_hidden_outputs_stay_in_the_unit_ball():
    model = random_model([3, 8, 8, 2], psi=True, o=(0.0, 2.0), weight_scale=50.0)
    _, zs, gs = model.forward_with_hidden(torch.randn(100, 3, dtype=torch.float64) * 100)
    for z, g in zip(zs, gs):
        assert torch.linalg.vector_norm(g * z, dim=-1).max() < 1.0


def test_forward_matches_a_direct_loop():
    model = random_model([4, 6, 5, 3], psi=True, o=(0.1, 1.0), seed=3)
    x = torch.randn(10, 4, dtype=torch.float64)
    h, g = x, None
    for i, layer in enumerate(model.layers):
        z = h @ layer.weight.T + layer.bias + (0 if layer.psi is None else layer.psi * g)
        if layer.o is None:
            break
        m = torch.sqrt(layer.o + (z * z).sum(-1, keepdim=True))
        g = torch.tanh(m) / m
        h = g * z
    assert torch.allclose(model(x), z, rtol=1e-14, atol=1e-14)


def test_rectangular_diagonal_matches_dense():
    d = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    for n_out, n_in in [(3, 5), (5, 3), (3, 3)]:
        x = torch.randn(4, n_in, dtype=torch.float64)
        assert torch.allclose(diag_matmul(d, x, n_out), x @ diag_to_dense(d, n_out, n_in).T)


def test_parameter_count_counts_every_stored_number():
    model = random_model([4, 6, 5, 3], psi=True, o=0.5)
    # weights 24+30+15, biases 6+5+3, psi on layers 1 and 2: 5+3, o on two hidden layers
    assert model.num_params() == 69 + 14 + 8 + 2
    diag = alternate_diagonalise(model)
    assert diag.layers[1].kind == "diag"
    assert diag.num_params() == model.num_params() - 30 + 5


def test_config_round_trips_through_json():
    model = alternate_diagonalise(random_model([4, 6, 5, 3], psi=True))
    config = model.config
    assert ModelConfig.from_json(config.to_json()) == config
    assert config.kinds == ("dense", "diag", "dense")


@pytest.mark.parametrize("text,message", [
    ('{"widths": [3], "kinds": [], "has_psi": []}', "at least 2 entries"),
    ('{"widths": [3, 2], "kinds": ["sparse"], "has_psi": [false]}', "'sparse'"),
    ('{"widths": [3, 2], "kinds": ["dense"], "has_psi": [true]}', "layer 0"),
    ('{"widths": [3, 0], "kinds": ["dense"], "has_psi": [false]}', "positive integers"),
    ('{"widths": [3, 2], "kinds": ["dense"], "has_psi": [false], "extra": 1}', "unknown key 'extra'"),
    ('{"widths": [3, 2], "kinds": ["dense"]}', "missing key 'has_psi'"),
    ('{"widths": [3, 2], "kinds": ["dense"], "has_psi": [false], "version": 99}', "upgrade isocompress"),
    ("not json", "not valid JSON"),
])
def test_bad_configs_name_the_problem(text, message):
    with pytest.raises(IsocompressError, match=message):
        ModelConfig.from_json(text)


def test_negative_intrinsic_length_uses_the_absolute_value():
    """o < 0 is the reference's raw intrinsic length: m = sqrt(|o + |z|²|), so g = 1 on the sphere |z|² = −o."""
    layer = Layer(weight=torch.eye(2, dtype=torch.float64), bias=torch.zeros(2, dtype=torch.float64), n_in=2,
                  o=torch.tensor(-1.0, dtype=torch.float64))
    out = Layer(weight=torch.eye(2, dtype=torch.float64), bias=torch.zeros(2, dtype=torch.float64), n_in=2)
    model = IsoMLP([layer, out])
    x = torch.tensor([[1.0, 0.0], [3.0, 4.0], [0.0, 0.0]], dtype=torch.float64)
    m = torch.sqrt((x.pow(2).sum(-1, keepdim=True) - 1.0).abs())
    expected = torch.where(m > 0, torch.tanh(m) / m.clamp_min(1e-300), torch.ones_like(m)) * x
    assert torch.allclose(model(x), expected, rtol=1e-15, atol=0)
    assert torch.equal(model(x)[0], x[0])  # on the sphere: m = 0, g = 1
