"""The lemmas behind the certified bound (docs/bounds.md), checked numerically, and the bound against searches."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from isocompress import bounds
from isocompress.model import random_model
from isocompress.primitives import isotropic_tanh

F64 = torch.float64


def test_gain_slope_peak_matches_the_constants():
    m = np.linspace(1e-6, 60.0, 3_000_001)
    slope = np.abs((m / np.cosh(m) ** 2 - np.tanh(m)) / m**2)
    assert slope.max() <= bounds.SLOPE_MAX
    assert bounds.SLOPE_MAX - slope.max() < 1e-5
    assert abs(m[slope.argmax()] - bounds.SLOPE_PEAK_M) < 1e-3
    # unimodal: rises before the peak, falls after it (Lemma 2 relies on it)
    peak = slope.argmax()
    assert np.all(np.diff(slope[:peak]) >= 0) and np.all(np.diff(slope[peak:]) <= 0)


@pytest.mark.parametrize("m", [0.0, 0.5, 0.9199, 2.0, 10.0, 400.0])
def test_slope_sup_is_an_upper_bound_beyond_m(m):
    grid = np.linspace(m, m + 50, 20001)
    values = [bounds.gain_slope(v) for v in grid[::50]]
    assert max(values) <= bounds.slope_sup(m) + 1e-12


@given(st.integers(1, 6), st.floats(0.0, 4.0), st.floats(0.01, 5.0), st.integers(0, 10_000))
def test_f_is_locally_g_of_m_min_lipschitz(n, o, scale, seed):
    """Lemma 1: |f(z) − f(z')| ≤ g(m_min)|z − z'| with m_min the smallest m on the segment's ball."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(64, n, dtype=F64, generator=gen) * scale
    z2 = z + torch.randn(64, n, dtype=F64, generator=gen) * scale * 0.3
    h, g = isotropic_tanh(z, o)
    h2, g2 = isotropic_tanh(z2, o)
    dz = torch.linalg.vector_norm(z2 - z, dim=-1)
    # the segment lies in the ball around z of radius |Δz|
    lows = (torch.linalg.vector_norm(z, dim=-1) - dz).clamp_min(0)
    lip = torch.tensor([bounds.gain(math.sqrt(o + float(r) ** 2)) for r in lows], dtype=F64)
    assert bool((torch.linalg.vector_norm(h2 - h, dim=-1) <= lip * dz * (1 + 1e-12) + 1e-15).all())
    slope = torch.tensor([bounds.slope_sup(math.sqrt(o + float(r) ** 2)) for r in lows], dtype=F64)
    assert bool(((g2 - g).abs().flatten() <= slope * dz * (1 + 1e-12) + 1e-15).all())


@given(st.lists(st.integers(2, 12), min_size=3, max_size=5), st.booleans(), st.floats(0.0, 2.0),
       st.floats(0.1, 20.0), st.integers(0, 1000))
def test_reachable_balls_contain_the_network(widths, psi, o, radius, seed):
    model = random_model(widths, psi=psi, o=o, seed=seed, weight_scale=2.0)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(200, widths[0], dtype=F64, generator=gen)
    x = x / x.norm(dim=-1, keepdim=True) * radius * torch.rand(200, 1, dtype=F64, generator=gen)
    balls = bounds.reachable_balls(list(model.layers), radius)
    _, zs, gs = model.forward_with_hidden(x)
    for ball, z, g in zip(balls, zs, gs):
        assert bool(((z - ball.z_center).norm(dim=-1) <= ball.z_radius * (1 + 1e-12) + 1e-12).all())
        h = g * z
        assert bool(((h - ball.h_center).norm(dim=-1) <= ball.h_radius * (1 + 1e-12) + 1e-12).all())
        assert bool(((g - ball.g_mid).abs() <= ball.g_half * (1 + 1e-12) + 1e-12).all())


def test_empirical_errors_measure_what_they_say():
    y = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=F64)
    y2 = torch.tensor([[2.0, 1.0], [0.0, 1.0]], dtype=F64)
    out = bounds.empirical_errors(y, y2, torch.tensor([0, 0]))
    assert out["max_abs"] == pytest.approx(1.0)
    assert out["mean_abs"] == pytest.approx(0.5)
    assert out["mean_rel_percent"] == pytest.approx(25.0)
    assert out["top1_agreement"] == pytest.approx(1.0)
    assert out["accuracy_before"] == pytest.approx(0.5)
    assert out["kl_mean"] > 0


def test_adversarial_search_finds_a_known_maximum():
    """Two networks differing by a linear output offset a·h: the search should approach sup |a·h| on the domain."""
    a = random_model([3, 4, 2], seed=3)
    layers = list(a.layers)
    b = a.with_layers({1: type(layers[1])(weight=layers[1].weight + 0.5, bias=layers[1].bias, n_in=4)})
    found = bounds.adversarial_search(a, b, radius=50.0, restarts=8, steps=40)["max_abs"]
    x = torch.randn(20000, 3, dtype=F64) * 50
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(50.0) * 50
    sampled = float((b(x) - a(x)).norm(dim=-1).max())
    assert found >= sampled * 0.999


def _grid_disc(n_in: int, radius: float, per_axis: int) -> torch.Tensor:
    """A dense grid over the disc |x| ≤ radius (n_in = 1 or 2), plus the boundary circle."""
    if n_in == 1:
        return torch.linspace(-radius, radius, per_axis * per_axis, dtype=F64)[:, None]
    t = torch.linspace(-radius, radius, per_axis, dtype=F64)
    x = torch.cartesian_prod(t, t)
    x = x[x.norm(dim=-1) <= radius]
    angle = torch.linspace(0, 2 * math.pi, 4 * per_axis, dtype=F64)
    return torch.cat([x, radius * torch.stack([angle.cos(), angle.sin()], dim=-1)])


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 2), st.lists(st.integers(2, 5), min_size=1, max_size=3), st.booleans(), st.floats(0.0, 2.0),
       st.floats(0.5, 8.0), st.floats(0.2, 0.8), st.sampled_from(["bias", "mean", "random"]), st.integers(0, 10_000))
def test_certified_bound_is_above_a_dense_grid_maximum(n_in, hidden, psi, o, radius, share, const_kind, seed):
    """Brute force: on tiny networks with 1-D or 2-D inputs, a dense grid over the disc |x| ≤ R gives the
    near-true max of |y' − y|; the certified bound (chain and case-split symbolic) must be above it."""
    from isocompress import prune

    model = random_model([n_in, *hidden, 3], psi=psi, o=o, seed=seed, weight_scale=2.0)
    state = prune.State.of(model)
    gen = torch.Generator().manual_seed(seed)
    x = _grid_disc(n_in, radius, 120)
    with torch.no_grad():
        _, zs, _ = model.forward_with_hidden(x)
    for i, m in enumerate(state.removed):
        m[:] = torch.rand(m.numel(), generator=gen) < share
        if const_kind == "bias":
            state.consts[i][:] = state.layers[i].bias
        elif const_kind == "mean":
            state.consts[i][:] = zs[i].mean(0)
        else:
            state.consts[i][:] = torch.randn(m.numel(), dtype=F64, generator=gen)
    with torch.no_grad():
        grid_max = float((prune.materialize(state)(x) - model(x)).norm(dim=-1).max())
    cert = bounds.certified_bound(state.layers, state.removed, state.consts, radius)
    assert cert["bound"] * (1 + 1e-9) + 1e-12 >= grid_max, cert
    assert cert["chain_bound"] * (1 + 1e-9) + 1e-12 >= grid_max
    if "symbolic_bound" in cert:
        assert cert["symbolic_bound"] * (1 + 1e-9) + 1e-12 >= grid_max, cert
    if "split_bound" in cert:
        assert cert["split_bound"] * (1 + 1e-9) + 1e-12 >= grid_max, cert
    alone = bounds.split_chain_bound(state.layers, state.removed, state.consts, radius)  # without symbolic help
    assert alone["bound"] * (1 + 1e-9) + 1e-12 >= grid_max, alone


def test_gain_is_completely_monotone_in_m_squared():
    """Lemma 7: |dg/d(m²)| = |g'(m)|/(2m) decreases from 1/3; gain_sq_slope(m) bounds it beyond m."""
    m = np.linspace(1e-3, 60.0, 2_000_001)
    d = (np.tanh(m) - m / np.cosh(m) ** 2) / m**2 / (2 * m)
    assert d.max() <= 1 / 3 and np.all(np.diff(d) <= 1e-15)
    for m0 in [0.0, 0.01, 0.05, 0.3, 1.0, 5.0, 50.0, 400.0]:
        grid = np.linspace(max(m0, 1e-3), m0 + 60, 30001)
        exact = (np.tanh(grid) - grid / np.cosh(np.minimum(grid, 300.0)) ** 2) / grid**3 / 2
        assert exact.max() <= bounds.gain_sq_slope(m0) * (1 + 1e-9) + 1e-300


@given(st.floats(0.0, 3.0), st.floats(0.0, 6.0), st.floats(0.0, 6.0))
def test_gain_difference_is_bounded_by_the_change_of_m_squared(o, t1, t2):
    m1, m2 = math.sqrt(o + t1 * t1), math.sqrt(o + t2 * t2)
    lhs = abs(bounds.gain(m1) - bounds.gain(m2))
    assert lhs <= bounds.gain_sq_slope(min(m1, m2)) * abs(m1 * m1 - m2 * m2) * (1 + 1e-9) + 1e-15


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(2, 8), min_size=2, max_size=4), st.booleans(), st.floats(0.0, 2.0),
       st.floats(0.5, 8.0), st.integers(0, 10_000))
def test_split_chain_layer_bounds_contain_sampled_errors(hidden, psi, o, radius, seed):
    """Every per-layer number of the split chain (e_l, |Δz_l|) is above its value at sampled inputs of the ball."""
    from isocompress import prune

    model = random_model([3, *hidden, 2], psi=psi, o=o, seed=seed, weight_scale=2.0)
    state = prune.State.of(model)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3000, 3, dtype=F64, generator=gen)
    x = x / x.norm(dim=-1, keepdim=True) * radius * torch.rand(3000, 1, dtype=F64, generator=gen) ** 0.2
    for i, m in enumerate(state.removed):
        m[:] = torch.rand(m.numel(), generator=gen) < 0.5
        state.consts[i][:] = torch.randn(m.numel(), dtype=F64, generator=gen) * 0.3
    out = bounds.split_chain_bound(state.layers, state.removed, state.consts, radius)
    with torch.no_grad():
        _, zs, _ = model.forward_with_hidden(x)
        y2 = prune.materialize(state)(x)
    for i, (z, m) in enumerate(zip(zs, state.removed)):
        e = (z[:, m] - state.consts[i][m]).norm(dim=-1).max() if bool(m.any()) else torch.tensor(0.0)
        assert float(e) <= out["introduced"][i] * (1 + 1e-9) + 1e-12
    assert float((y2 - model(x)).norm(dim=-1).max()) <= out["bound"] * (1 + 1e-9) + 1e-12
