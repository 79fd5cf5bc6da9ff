"""Local certificates (issue 10): the lemmas' scalar bounds, the batched norm bound, and soundness of β_i and of the
top-1 certificates against a projected-gradient attack inside every ball (float64), on random and shipped networks."""

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from isocompress.bounds import local as lb
from isocompress.core.model import IsoMLP, random_model
from isocompress.core.primitives import isotropic_gain
from isocompress.exact.constants import remove_all_constant_directions
from isocompress.formats import io
from isocompress.prune import budget as prune

F64 = torch.float64
MODELS = Path(__file__).resolve().parents[1] / "models"


def test_gain_derivatives_against_autograd_and_their_sup_bounds():
    mu = torch.cat([torch.linspace(0.0, 0.01, 50), torch.logspace(-2, 4, 400)]).to(F64).requires_grad_(True)
    g = isotropic_gain(mu)
    (d1,) = torch.autograd.grad(g.sum(), mu, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), mu)
    mu = mu.detach()
    assert torch.allclose(lb.gain_sq_slope_exact(mu), d1.detach(), rtol=1e-7, atol=1e-10)
    # sup over μ' ≥ μ: at least the value at every larger μ on the grid (decreasing), and close at μ
    sup1, sup2 = lb.gain_sq_slope_sup(mu), lb.gain_sq_curv_sup(mu)
    later1 = torch.flip(torch.cummax(torch.flip(d1.detach().abs(), [0]), 0).values, [0])
    later2 = torch.flip(torch.cummax(torch.flip(d2.abs(), [0]), 0).values, [0])
    assert bool((sup1 >= later1 * (1 - 1e-9)).all()) and bool((sup2 >= later2 * (1 - 1e-6) - 1e-12).all())
    assert float((sup2 - d2.abs()).abs().max()) < 1e-6


def test_second_derivative_bound_holds_at_random_points():
    gen = torch.Generator().manual_seed(1)
    for o in (0.0, 0.5, 3.0):
        z = torch.randn(300, 5, dtype=F64, generator=gen) * torch.rand(300, 1, dtype=F64, generator=gen) * 4
        u = torch.randn(300, 5, dtype=F64, generator=gen)
        u = u / u.norm(dim=-1, keepdim=True)

        def f(v):
            return isotropic_gain(o + (v * v).sum(-1, keepdim=True)) * v

        # second directional derivative f''(z)[u, u] by central differences
        h = 1e-4
        second = (f(z + h * u) - 2 * f(z) + f(z - h * u)) / h ** 2
        t = z.norm(dim=-1)
        bound_f, _ = lb.second_derivative_sup(o, t, t)
        assert bool((second.norm(dim=-1) <= bound_f * (1 + 1e-4) + 1e-6).all())


@pytest.mark.parametrize("o", [0.0, 0.01, 0.5, 3.0])
@pytest.mark.parametrize("scale", [0.05, 1.0, 4.0])
def test_lemma_9_structured_taylor_remainder_holds(o, scale):
    """Lemma 9: f(c+u) − f(c) − J_f(c)u = a c + b u + e (c+u) with |a| ≤ alpha, |b| ≤ beta, |e| ≤ gamma, so for any M
    |M R| ≤ alpha|Mc| + beta|Mu| + gamma|M(c+u)|, and the gain's remainder is ≤ alpha + gamma. Checked at random
    centres and steps of every size relative to |c| (including steps through the origin), with the tightest inputs
    the lemma allows (σ = |c·u|, rad = |u|, t_lo = min(|c|, |c+u|)) and with M = I and a random M."""
    gen = torch.Generator().manual_seed(int(10 * o + scale))
    n = 6
    c = torch.randn(2000, n, dtype=F64, generator=gen) * scale
    u = torch.randn(2000, n, dtype=F64, generator=gen) * scale * torch.logspace(-3, 0.5, 2000, dtype=F64)[:, None]
    m = torch.randn(3, n, dtype=F64, generator=gen)
    z = c + u

    def f_and_g(v):
        g = isotropic_gain(o + (v * v).sum(-1, keepdim=True))
        return g * v, g[:, 0]

    (fz, gz), (fc, gc) = f_and_g(z), f_and_g(c)
    mu_c = o + (c * c).sum(-1)
    slope = lb.gain_sq_slope_exact(mu_c)
    jac_u = gc[:, None] * u + 2.0 * slope[:, None] * (c * u).sum(-1, keepdim=True) * c
    rem_f, rem_g = fz - fc - jac_u, gz - gc - 2.0 * slope * (c * u).sum(-1)
    cn, rad = c.norm(dim=-1), u.norm(dim=-1)
    alpha, beta, gamma = lb.taylor_coefficients(slope, (c * u).sum(-1).abs(), rad, o, torch.minimum(cn, z.norm(dim=-1)))
    slack = 1e-12 * (1.0 + fz.norm(dim=-1))  # the float64 rounding of forming the remainders above
    assert bool((rem_f.norm(dim=-1) <= alpha * cn + beta * rad + gamma * z.norm(dim=-1) + slack).all())
    assert bool((rem_g.abs() <= alpha + gamma + slack).all())
    moved = alpha[:, None] * (c @ m.T).abs() + beta[:, None] * (u @ m.T).abs() + gamma[:, None] * (z @ m.T).abs()
    assert bool(((rem_f @ m.T).abs() <= moved + 10 * slack[:, None]).all())
    # not vacuous: the bound is within a small factor of the remainder for the largest steps
    big = rad > cn
    assert float((rem_f.norm(dim=-1)[big] / (alpha * cn + beta * rad + gamma * z.norm(dim=-1))[big]).max()) > 0.2


@pytest.mark.parametrize("scale", [1e-200, 1e-81, 1e100, 1e200])
def test_op_norm_upper_at_extreme_scales(scale):
    """Entries far from 1 must neither underflow (a zero Frobenius norm, then inf after rescaling: NaN in a bound that
    multiplies it by 0) nor overflow: the bound stays finite, ≥ ‖A‖₂ and close to it; a zero matrix gives 0."""
    a = torch.randn(20, 5, 3, dtype=F64, generator=torch.Generator().manual_seed(4)) * scale
    upper, true = lb.op_norm_upper(a), torch.linalg.matrix_norm(a / scale, 2) * scale
    assert bool(torch.isfinite(upper).all())
    assert bool((upper >= true * (1 - 1e-12)).all()) and bool((upper <= 1.2 * true).all())
    assert bool((lb.op_norm_upper(torch.zeros(3, 4, 2, dtype=F64)) == 0).all())


def test_op_norm_upper_is_an_upper_bound_and_close():
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(50, 30, 20, dtype=F64, generator=gen) * torch.logspace(0, -3, 20, dtype=F64)
    true = torch.linalg.matrix_norm(a, 2)
    est = lb.op_norm_upper(a)
    assert bool((est >= true).all())
    assert float((est / true).max()) < 1.2


def pruned_state(model, x, share, basis="data-aware"):
    state = prune.State.of(remove_all_constant_directions(model))
    smallest, exact = prune.smallest_params(state), prune.current_params(state)
    target = max(int(smallest + share * (exact - smallest)), smallest)
    radius = float(x.norm(dim=-1).max())
    return prune.prune_to_target(state, target, basis, x, radius)


def assert_sound(state, centres, eps, starts=12, steps=60):
    out = prune.local_certificates(state, centres, eps)
    found = lb.local_search(IsoMLP(state.layers), prune.materialize(state), centres, eps, starts=starts, steps=steps)
    assert bool((found["max_abs"] <= out["bound"]).all()), float((found["max_abs"] - out["bound"]).max())
    assert not bool((out["top1"] & found["flipped"]).any())
    return out, found


@settings(max_examples=10, deadline=None)
@given(st.lists(st.integers(2, 10), min_size=3, max_size=4), st.booleans(), st.floats(0.0, 2.0),
       st.sampled_from([0.2, 0.6]), st.sampled_from([0.01, 0.1, 0.5, 2.0]), st.integers(0, 50),
       st.sampled_from(["data-free", "data-aware"]))
def test_local_bounds_are_sound_on_random_networks(widths, psi, o, share, eps, seed, basis):
    model = random_model(widths, psi=psi, o=o, seed=seed, weight_scale=1.5)
    x = torch.randn(24, widths[0], dtype=F64, generator=torch.Generator().manual_seed(seed))
    state = pruned_state(model, x, share, basis)
    assert_sound(state, x[:8], eps)


@settings(max_examples=6, deadline=None)
@given(st.lists(st.integers(2, 8), min_size=6, max_size=8), st.booleans(), st.floats(0.0, 2.0),
       st.sampled_from([0.003, 0.05, 0.5]), st.integers(0, 10000), st.sampled_from([0.5, 3.0]))
def test_local_bounds_are_sound_on_deep_networks(widths, psi, o, eps, seed, weight_scale):
    """Depth 5–7: residues fold their oldest matrix terms (MAX_MATRIX_TERMS) and carry terms through many layers."""
    model = random_model(widths, psi=psi, o=o, seed=seed, weight_scale=weight_scale)
    x = torch.randn(24, widths[0], dtype=F64, generator=torch.Generator().manual_seed(seed))
    assert_sound(pruned_state(model, x, 0.2, "data-aware"), x[:8], eps, starts=16, steps=80)


def test_near_linear_networks_are_certified_nearly_exactly():
    """Small weights: both networks are nearly affine, so β must be close to the searched maximum (this catches a
    dropped or halved linear term, which a loose-only test would not)."""
    model = random_model([4, 12, 10, 3], psi=True, o=0.3, seed=3, weight_scale=0.3)
    x = torch.randn(64, 4, dtype=F64, generator=torch.Generator().manual_seed(3))
    state = pruned_state(model, x, 0.3)
    out, found = assert_sound(state, x[:16], 0.05, starts=16, steps=80)
    ratio = out["bound"] / found["max_abs"]
    assert float(ratio.max()) < 1.2, ratio


def digits_state(share_of_params: float = 0.05):
    model = io.load(MODELS / "digits.pt").cast(F64)
    x = torch.from_numpy(np.load(MODELS / "digits.calib.npy")).to(F64)
    state = prune.State.of(remove_all_constant_directions(model))
    target = int(share_of_params * model.num_params())
    return prune.prune_to_target(state, target, "data-aware", x, float(x.norm(dim=-1).max())), x


@pytest.mark.slow
def test_digits_certified_points_survive_the_attack():
    state, x = digits_state(0.05)
    eps = 0.01 * float(x.norm(dim=-1).median())
    out, found = assert_sound(state, x[:48], eps, starts=16, steps=60)
    assert int(out["top1"].sum()) > 0  # something is certified, so the flip check has teeth


@pytest.mark.parametrize("o", [0.0, 0.01, 0.6, 3.0])
@pytest.mark.parametrize("scale", [0.2, 1.0, 4.0])
def test_lemma_12_exact_coefficients_hold(o, scale):
    """Lemma 12: f(c+u) − f(c) − J_f(c)u = A c + B u = K c + B u_⊥ and the gain's remainder is A, with |K| ≤ K̄,
    |A| ≤ Ā, |B| ≤ B̄ for every u with |u| ≤ rad and |c·u| ≤ σ. Attacked with the tightest σ and rad a point allows,
    with steps along ±c (the radial direction, where K's two parts cancel), perpendicular to c, random, and on the
    boundary of the region; and the bound is not vacuous: within 3× of the remainder found along the worst step."""
    gen = torch.Generator().manual_seed(int(10 * o + 3 * scale))
    n, m = 6, 3000
    c = torch.randn(m, n, dtype=F64, generator=gen) * scale
    cn = c.norm(dim=-1)
    rad = cn * torch.logspace(-3, -0.4, m, dtype=F64)  # σ ≤ |c| rad < |c|²/2: Lemma 12 applies
    u = torch.randn(m, n, dtype=F64, generator=gen)
    kind = torch.arange(m) % 4
    u = torch.where((kind == 0)[:, None], c, u)  # radial
    u = torch.where((kind == 1)[:, None], -c, u)
    perp = u - (u * c).sum(-1, keepdim=True) / (cn * cn)[:, None] * c
    u = torch.where((kind == 2)[:, None], perp, u)  # tangential
    u = u / u.norm(dim=-1, keepdim=True) * rad[:, None] * torch.rand(m, 1, dtype=F64, generator=gen).sqrt()
    sigma = (c * u).sum(-1).abs()
    k_bar, a_bar, b_bar = lb.exact_coefficients(o, cn, sigma, u.norm(dim=-1))
    assert bool(torch.isfinite(k_bar).all())

    def f_and_g(v):
        g = isotropic_gain(o + (v * v).sum(-1, keepdim=True))
        return g * v, g[:, 0]

    (fz, gz), (fc, gc) = f_and_g(c + u), f_and_g(c)
    slope = lb.gain_sq_slope_exact(o + cn * cn)
    p = (c * u).sum(-1)
    rem_f = fz - fc - gc[:, None] * u - 2.0 * (slope * p)[:, None] * c
    rem_g = gz - gc - 2.0 * slope * p
    big_b = (f_and_g(c + u)[1] - gc)
    big_k = (rem_g + big_b * p / (cn * cn))
    u_perp = u - (p / (cn * cn))[:, None] * c
    slack = 1e-12 * (1.0 + fz.norm(dim=-1))
    assert bool((rem_g.abs() <= a_bar + slack).all())
    assert bool((big_b.abs() <= b_bar + slack).all())
    assert bool((big_k.abs() <= k_bar + slack).all())
    assert torch.allclose(rem_f, big_k[:, None] * c + big_b[:, None] * u_perp, atol=1e-12, rtol=1e-9)
    bound = torch.hypot(k_bar * cn, b_bar * u.norm(dim=-1))
    assert bool((rem_f.norm(dim=-1) <= bound + slack).all())
    big = rad > 0.1 * cn
    assert float((rem_f.norm(dim=-1)[big] / bound[big]).max()) > 1 / 3
    # inside the region (p between grid points, q below rad²): looser σ and rad hold as well
    loose = lb.exact_coefficients(o, cn, sigma * 1.37 + 1e-3 * cn * rad, u.norm(dim=-1) * 1.2)
    assert bool((rem_g.abs() <= loose[1] + slack).all() and (big_k.abs() <= loose[0] + slack).all())
    assert bool((big_b.abs() <= loose[2] + slack).all())
