"""The constant-direction rule's norms on reachable subspaces (docs/bounds.md §6, "Reachable subspaces"): never above
the whole-space norms, a valid Lipschitz bound on every trajectory the proof uses, and the exact shrink still computes
the same function."""

import itertools
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from isocompress.api import shrink as api
from isocompress.core.model import IsoMLP, random_model
from isocompress.core.primitives import isotropic_tanh
from isocompress.exact.constants import layer_norms, lipschitz_after, reachable_norms, reachable_step
from isocompress.exact.shrink import shrink_exact, shrink_exact_accounted
from isocompress.formats import io

F64 = torch.float64
ROUNDING = 1e-9  # the float64 allowances of the two norms differ; a restricted norm may exceed a whole one by this


def _low_rank(model: IsoMLP, seed: int, rank: int) -> IsoMLP:
    """Every hidden-to-hidden weight of rank ≤ `rank` (a rank-deficient model)."""
    gen = torch.Generator().manual_seed(seed)
    layers = list(model.layers)
    for k in range(1, len(layers)):
        w = layers[k].weight
        a = torch.randn(w.shape[0], rank, dtype=F64, generator=gen)
        b = torch.randn(rank, w.shape[1], dtype=F64, generator=gen)
        layers[k] = replace(layers[k], weight=a @ b / w.shape[1])
    return IsoMLP(layers)


def _model(widths, psi, o, seed, rank):
    model = random_model(widths, psi=psi, o=o, seed=seed)
    return model if rank is None else _low_rank(model, seed, rank)


MODELS = st.tuples(st.lists(st.integers(1, 24), min_size=2, max_size=7), st.booleans(), st.floats(0.0, 2.0),
                   st.integers(0, 10_000), st.one_of(st.none(), st.integers(1, 3)))


@settings(max_examples=40, deadline=None)
@given(MODELS)
def test_reachable_norms_are_never_above_the_whole_space_norms(case):
    widths, psi, o, seed, rank = case
    model = _model(widths, psi, o, seed, rank)
    new, old = reachable_norms(model.layers), [layer_norms(layer) for layer in model.layers]
    for (w_new, p_new), (w_old, p_old) in zip(new, old):
        assert w_new <= w_old * (1 + ROUNDING) + 1e-300 and p_new == p_old
    o_list = [None if layer.o is None else float(layer.o) for layer in model.layers]
    for a, b in zip(lipschitz_after(new, o_list), lipschitz_after(old, o_list)):
        assert a <= b * (1 + len(widths) * ROUNDING)


def test_a_narrow_input_gives_much_smaller_norms():
    """3 inputs into 40-wide layers: V_k has dimension ≤ 4 + 2k < 40, and ‖W_k‖₂ on it is well below ‖W_k‖₂."""
    model = random_model([3] + [40] * 5 + [2], psi=True, o=(0.0, 1.0), seed=5)
    new, old = reachable_norms(model.layers), [layer_norms(layer) for layer in model.layers]
    assert new[0] == old[0]  # the input space is all of R^3
    assert all(new[k][0] < 0.9 * old[k][0] for k in range(1, 5))


def _trajectory(model: IsoMLP, x: torch.Tensor, i: int, replace_z=None) -> list[torch.Tensor]:
    """The hidden activations h_k (k ≥ i) with z_i optionally replaced by replace_z(z_i)."""
    h, g, out = x, None, []
    for k, layer in enumerate(model.layers[:-1]):
        z = layer.apply_weight(h) + layer.bias + (0 if layer.psi is None else layer.psi * g)
        if k == i and replace_z is not None:
            z = replace_z(z)
        h, g = isotropic_tanh(z, layer.o)
        out.append(h)
    return out


@settings(max_examples=25, deadline=None)
@given(MODELS, st.integers(0, 5))
def test_the_restricted_norm_bounds_every_trajectory_difference(case, which):
    """|W_k (h − h')| ≤ ‖W_k‖_{V_{k−1}} |h − h'| for h, h' the values of hidden space k−1 on two inputs, and on one
    input with z_i replaced by a projection that keeps z_i − b_i in range(W_i) (what a removal does, §6)."""
    widths, psi, o, seed, rank = case
    model = _model(widths, psi, o, seed, rank)
    norms = reachable_norms(model.layers)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, widths[0], dtype=F64, generator=gen) * 3
    i = which % (len(widths) - 1)
    if i == len(widths) - 2:
        return
    layer_i = model.layers[i]
    u = torch.linalg.svd(torch.cat([layer_i.weight] + ([] if layer_i.psi is None else [layer_i.psi[:, None]]), 1),
                         full_matrices=False)[0]
    q = u[:, : max(1, u.shape[1] // 2)]

    def project(z):
        return (z - layer_i.bias) @ q @ q.T + layer_i.bias
    a, b = _trajectory(model, x, i), _trajectory(model, x.flip(0), i)
    c = _trajectory(model, x, i, project)
    for k in range(i + 1, len(widths) - 1):
        w = model.layers[k].weight
        for h, h2 in ((a[k - 1], b[k - 1]), (a[k - 1], c[k - 1])):
            d = h - h2
            lhs = (d @ w.T).norm(dim=-1)
            assert bool((lhs <= norms[k][0] * d.norm(dim=-1) * (1 + 1e-9) + 1e-12).all())


@settings(max_examples=25, deadline=None)
@given(MODELS)
def test_the_exact_shrink_still_computes_the_same_function(case):
    widths, psi, o, seed, rank = case
    model = _model(widths, psi, o, seed, rank)
    shrunk, record = shrink_exact_accounted(model)
    x = torch.cat([torch.randn(128, widths[0], dtype=F64, generator=torch.Generator().manual_seed(seed)) * s
                   for s in (0.1, 1.0, 10.0)])
    with torch.no_grad():
        y, y2 = model(x), shrunk(x)
    scale = max(float(y.norm(dim=-1).max()), 1e-300)
    assert float((y2 - y).norm(dim=-1).max()) <= 1e-10 * scale
    assert record["bound"] <= 1e-10 * record["output_scale"] * len(widths)


def test_a_constant_hidden_space_falls_back_to_whole_space_norms(tmp_path):
    """A zero weight makes hidden space 1 constant (the removal keeps one direction outside the reachable subspace):
    the chain after it uses whole-space norms, the streamed and in-memory shrinks agree and the function is kept."""
    model = random_model([3, 12, 12, 12, 12, 2], psi=True, o=(0.0, 1.0), seed=8)
    layers = list(model.layers)
    layers[1] = replace(layers[1], weight=torch.zeros_like(layers[1].weight), psi=torch.zeros_like(layers[1].psi))
    model = IsoMLP(layers)
    path = tmp_path / "m.safetensors"
    io.save(model, path, dtype=F64)
    report = api.shrink_file(path, tmp_path / "out", api.ShrinkOptions(formats=("safetensors",)), progress=False)
    assert report.get("streamed") is True
    got, expected = io.load(tmp_path / "out" / "model.safetensors"), shrink_exact(model)
    assert got.widths == expected.widths
    x = torch.randn(50, 3, dtype=F64) * 4
    with torch.no_grad():
        torch.testing.assert_close(got(x), model(x), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(expected(x), model(x), rtol=1e-10, atol=1e-10)


def test_reachable_step_dimension_grows_by_at_most_two():
    model = random_model([5] + [30] * 6 + [2], psi=True, o=0.5, seed=1)
    basis, dims = None, []
    for layer in model.layers[:-1]:
        _, basis = reachable_step(layer, basis)
        dims.append(None if basis is None else basis.shape[1])
    assert dims == [6, 8, 10, 12, 14, 16]
    for a, b in itertools.pairwise(dims):
        if a is not None and b is not None:
            assert b <= a + 2


@pytest.mark.parametrize("seed", [0, 1])
def test_streamed_rule_uses_the_reachable_chain(tmp_path, seed):
    from isocompress.exact import stream

    model = random_model([4, 20, 20, 20, 3], psi=True, o=(0.0, 1.0), seed=seed)
    io.save(model, tmp_path / "m.safetensors", dtype=F64)
    rule = stream.constant_rule(stream.open_source(tmp_path / "m.safetensors"), torch.randn(5, 4, dtype=F64))
    assert rule.norms == reachable_norms(model.layers)
