"""Every exact transform against the untransformed network, in float64 and float32, on analytic cases and
property tests over shapes."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from isocompress.core.layers import diagonalise_full, diagonalise_left, remove_constant_directions, rotate_hidden
from isocompress.core.model import IsoMLP, Layer, random_model
from isocompress.core.primitives import random_orthogonal, svd64
from isocompress.exact.constants import remove_all_constant_directions
from isocompress.exact.shrink import alternate_diagonalise, choose_alternating_layers, shrink_exact

F64_RTOL = 1e-10
F32_RTOL = 1e-5


def rel_error(a: IsoMLP, b: IsoMLP, x: torch.Tensor) -> float:
    ya, yb = a(x), b(x)
    return float((ya - yb).abs().max() / ya.abs().max().clamp_min(1e-300))


def assert_same_function(a: IsoMLP, b: IsoMLP, x: torch.Tensor) -> None:
    assert rel_error(a, b, x) <= F64_RTOL
    x32 = x.to(torch.float32)
    y_ref = a(x).to(torch.float32)
    y32 = b.cast(torch.float32)(x32)
    assert float((y32 - y_ref).abs().max() / y_ref.abs().max()) <= F32_RTOL


TRANSFORMS = {
    "rotate": lambda m: rotate_hidden(m, 1, random_orthogonal(m.widths[2], torch.Generator().manual_seed(3))),
    "left": lambda m: diagonalise_left(m, 0),
    "full": lambda m: diagonalise_full(m, 1),
    "alternate": alternate_diagonalise,
    "remove": remove_all_constant_directions,
    "shrink": shrink_exact,
}


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
@pytest.mark.parametrize("psi,o", [(False, 0.0), (True, (0.0, 2.0))])
def test_transform_keeps_function(name, psi, o, f64_inputs):
    model = random_model([6, 9, 8, 7, 3], psi=psi, o=o, seed=11)
    out = TRANSFORMS[name](model)
    assert_same_function(model, out, f64_inputs(6, n=200))


def test_transforms_do_not_modify_their_input(f64_inputs):
    model = random_model([5, 7, 7, 2], psi=True, o=0.3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    shrink_exact(model)
    rotate_hidden(model, 0, random_orthogonal(7))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_non_orthogonal_rotation_would_change_the_function(f64_inputs):
    """The tests above can fail: a general invertible map is not a symmetry of the isotropic activation."""
    model = random_model([4, 6, 3], seed=2)
    scale = torch.diag(torch.linspace(0.5, 2.0, 6, dtype=torch.float64))
    layers = model.layers
    skewed = model.with_layers({
        0: Layer(weight=scale @ layers[0].weight, bias=scale @ layers[0].bias, n_in=4, o=layers[0].o),
        1: Layer(weight=layers[1].weight @ torch.linalg.inv(scale), bias=layers[1].bias, n_in=6),
    })
    assert rel_error(model, skewed, f64_inputs(4)) > 1e-3


def test_rank_chain_of_a_wide_network():
    model = random_model([12, 256, 256, 256, 6], psi=False, o=0.0, seed=0)
    shrunk = shrink_exact(model)
    assert shrunk.widths == (12, 12, 13, 14, 6)


def test_rank_chain_with_psi_everywhere():
    model = random_model([5, 40, 40, 40, 40, 3], psi=True, o=(0.0, 1.0), seed=4)
    assert shrink_exact(model).widths == (5, 5, 6, 7, 8, 3)


def test_full_diagonalisation_gives_the_singular_values():
    model = random_model([5, 7, 6, 4], seed=5)
    out = diagonalise_full(model, 1)
    assert out.layers[1].kind == "diag"
    _, s, _ = svd64(model.layers[1].weight)
    assert torch.allclose(out.layers[1].weight, s, rtol=0, atol=1e-14)


def test_left_diagonalisation_orders_rows_by_singular_value():
    model = random_model([5, 5, 8, 4], seed=6)  # layer 1 is 8×5: three rows must vanish
    out = diagonalise_left(model, 1)
    row_norms = torch.linalg.vector_norm(out.layers[1].weight, dim=1)
    _, s, _ = svd64(model.layers[1].weight)
    assert torch.allclose(row_norms[: s.numel()], s, atol=1e-12)
    assert row_norms[s.numel():].abs().max() < 1e-12


def test_alternating_form_stores_every_other_layer_diagonal():
    model = random_model([16] * 8, seed=7)
    out = alternate_diagonalise(model)
    assert [layer.kind for layer in out.layers] == ["dense", "diag"] * 3 + ["dense"]
    # 4 dense 16×16 weights, 3 diagonals of 16, 7 biases of 16, 6 intrinsic lengths
    assert out.num_params() == 4 * 256 + 3 * 16 + 7 * 16 + 6


def test_alternating_choice_prefers_the_larger_layers():
    model = random_model([3, 4, 50, 50, 4, 2], seed=8)
    assert choose_alternating_layers(model) == [2]


# --- analytic cases ----------------------------------------------------------------------------------------------
def diagonal_model(d1, d2, b1, b2, o=0.0):
    t = lambda v: torch.tensor(v, dtype=torch.float64)
    return IsoMLP([
        Layer(weight=torch.diag(t(d1)), bias=t(b1), n_in=len(d1), o=t(o)),
        Layer(weight=torch.diag(t(d2)), bias=t(b2), n_in=len(d1)),
    ])


def test_diagonal_weight_with_zero_bias_has_nothing_to_remove(f64_inputs):
    model = diagonal_model([1.0, 2.0, 3.0], [1.0, -1.0, 0.5], [0.0, 0.0, 0.0], [0.1, 0.2, 0.3])
    out = remove_all_constant_directions(model)
    assert out.widths == model.widths
    assert_same_function(model, out, f64_inputs(3))


def test_zero_column_direction_is_absorbed_into_o_and_psi(f64_inputs):
    # hidden unit 2 gets no input: z_2 = b_2 = 3 always, so o += 9 and psi_next += W_next[:, 2]·3
    model = diagonal_model([1.0, 2.0, 0.0], [1.0, -1.0, 0.5], [0.0, 0.0, 3.0], [0.0, 0.0, 0.0], o=0.25)
    out = remove_constant_directions(model, 0)
    assert out.widths == (3, 2, 3)
    assert float(out.layers[0].o) == pytest.approx(0.25 + 9.0, abs=1e-12)
    assert torch.allclose(out.layers[1].psi, torch.tensor([0.0, 0.0, 1.5], dtype=torch.float64), atol=1e-12)
    assert_same_function(model, out, f64_inputs(3))


def test_constant_direction_with_zero_bias_adds_no_psi(f64_inputs):
    model = diagonal_model([1.0, 2.0, 0.0], [1.0, -1.0, 0.5], [0.5, 0.0, 0.0], [0.0, 0.0, 0.0])
    out = remove_constant_directions(model, 0)
    assert out.widths == (3, 2, 3)
    assert out.layers[1].psi is None
    assert_same_function(model, out, f64_inputs(3))


def test_rank_deficient_weight_shrinks_to_its_rank(f64_inputs):
    gen = torch.Generator().manual_seed(9)
    low_rank = torch.randn(20, 3, dtype=torch.float64, generator=gen) @ torch.randn(3, 8, dtype=torch.float64, generator=gen)
    model = IsoMLP([
        Layer(weight=low_rank, bias=torch.randn(20, dtype=torch.float64, generator=gen), n_in=8,
              o=torch.tensor(0.0, dtype=torch.float64)),
        Layer(weight=torch.randn(4, 20, dtype=torch.float64, generator=gen), bias=torch.zeros(4, dtype=torch.float64), n_in=20),
    ])
    out = shrink_exact(model)
    assert out.widths == (8, 3, 4)
    assert_same_function(model, out, f64_inputs(8))


def test_all_zero_layer_keeps_one_direction(f64_inputs):
    model = IsoMLP([
        Layer(weight=torch.zeros(5, 3, dtype=torch.float64), bias=torch.ones(5, dtype=torch.float64), n_in=3,
              o=torch.tensor(0.0, dtype=torch.float64)),
        Layer(weight=torch.ones(2, 5, dtype=torch.float64), bias=torch.zeros(2, dtype=torch.float64), n_in=5),
    ])
    out = shrink_exact(model)
    assert out.widths == (3, 1, 2)
    assert_same_function(model, out, f64_inputs(3))


def test_exactness_at_the_origin_of_the_activation():
    """Inputs that make z exactly 0 with o = 0 hit the series branch of g; shrinking must still be exact there."""
    model = random_model([4, 9, 9, 2], bias_scale=0.0, seed=10)
    x = torch.zeros(3, 4, dtype=torch.float64)
    out = shrink_exact(model)
    assert torch.isfinite(out(x)).all()
    assert (out(x) - model(x)).abs().max() <= 1e-14


def test_shrinking_twice_changes_nothing_more(f64_inputs):
    model = random_model([6, 30, 30, 30, 4], psi=True, o=(0.0, 1.0), seed=12)
    once = shrink_exact(model)
    twice = shrink_exact(once)
    assert twice.widths == once.widths
    assert twice.num_params() == once.num_params()
    assert_same_function(model, twice, f64_inputs(6))


# --- property tests ------------------------------------------------------------------------------------------------
widths_strategy = st.lists(st.integers(1, 24), min_size=2, max_size=6)


@given(widths=widths_strategy, psi=st.booleans(), o_high=st.floats(0.0, 3.0), seed=st.integers(0, 2**16))
def test_shrink_exact_property(widths, psi, o_high, seed):
    model = random_model(widths, psi=psi, o=(0.0, o_high), seed=seed)
    out = shrink_exact(model)
    x = torch.randn(40, widths[0], dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * 5
    assert rel_error(model, out, x) <= F64_RTOL
    assert out.num_params() <= model.num_params()
    # rank chain: r_1 ≤ n_0 and r_{l+1} ≤ r_l + 1
    hidden = out.widths[1:-1]
    if hidden:
        assert hidden[0] <= widths[0]
        assert all(b <= a + 1 for a, b in zip(hidden, hidden[1:]))


@given(widths=widths_strategy.filter(lambda w: len(w) >= 3), seed=st.integers(0, 2**16), layer=st.integers(0, 10))
def test_rotation_property(widths, seed, layer):
    model = random_model(widths, psi=True, o=(0.0, 1.0), seed=seed)
    i = layer % (len(widths) - 2)
    rotation = random_orthogonal(widths[i + 1], torch.Generator().manual_seed(seed))
    x = torch.randn(30, widths[0], dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    assert rel_error(model, rotate_hidden(model, i, rotation), x) <= F64_RTOL


@given(widths=st.lists(st.integers(1, 30), min_size=3, max_size=9))
def test_alternating_choice_is_the_best_non_adjacent_set(widths):
    """Brute force over every non-adjacent subset of the diagonalisable layers."""
    from itertools import combinations

    from isocompress.core.layers import diagonal_savings, diagonalisable_layers

    model = random_model(widths)
    candidates = diagonalisable_layers(model)
    saving = lambda chosen: sum(diagonal_savings(model.layers[i]) for i in chosen)
    best = max(
        (saving(c) for k in range(len(candidates) + 1) for c in combinations(candidates, k)
         if all(b - a > 1 for a, b in zip(c, c[1:]))),
        default=0,
    )
    chosen = choose_alternating_layers(model)
    assert all(b - a > 1 for a, b in zip(chosen, chosen[1:]))
    assert saving(chosen) == best
