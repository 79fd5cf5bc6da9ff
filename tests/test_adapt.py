"""isocompress.train.adapt (issue 14): live restructuring of an IsotropicMLP with its optimiser, and the schedule."""

import copy
import logging

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from isocompress.api.shrink import output_difference, probe_inputs
from isocompress.core.errors import IsocompressError
from isocompress.exact.shrink import shrink_exact
from isocompress.train import adapt
from isocompress.train.nn import IsotropicMLP

F64 = torch.float64
OPTIMISERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=1e-2, momentum=0.9),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-2),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-2),
}
TOLERANCE = {F64: 1e-10, torch.float32: 1e-6}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def trained(widths=(5, 9, 7, 3), psi=True, intrinsic_length="trainable", dtype=F64, optimiser="adam", steps=3,
            seed=0):
    """A randomised network (nonzero psi, o, biases) and an optimiser with state from a few steps."""
    net = IsotropicMLP(widths, psi=psi, intrinsic_length=intrinsic_length, o_init=0.4, seed=seed, dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=F64).to(dtype) * 0.3)
    opt = OPTIMISERS[optimiser](net.parameters())
    x, y = batch(widths, dtype, seed)
    for _ in range(steps):
        train_step(net, opt, x, y)
    return net, opt


def batch(widths, dtype, seed=0, n=32):
    gen = torch.Generator().manual_seed(100 + seed)
    return (torch.randn(n, widths[0], generator=gen, dtype=F64).to(dtype),
            torch.randn(n, widths[-1], generator=gen, dtype=F64).to(dtype))


def train_step(net, opt, x, y) -> float:
    loss = (net(x) - y).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.detach())


def assert_optimiser_consistent(net, opt):
    """The optimiser holds exactly the model's parameters, and every state tensor has its parameter's shape."""
    held = [p for group in opt.param_groups for p in group["params"]]
    assert sorted(map(id, held)) == sorted(id(p) for p in net.parameters())
    for p in net.parameters():
        for key, value in opt.state.get(p, {}).items():
            if torch.is_tensor(value) and value.dim() > 0:
                assert value.shape == p.shape, (key, value.shape, p.shape)


def probe(net):
    return probe_inputs(net.widths[0], per_scale=32).to(net.layers[0].weight.dtype)


def make_constant_direction(net, layer, row):
    """Zero row `row` of weight layer `layer` (weight and psi) but keep its bias: a zero-strength, nonzero-constant
    direction whose removal must be absorbed into o and the next psi."""
    with torch.no_grad():
        net.layers[layer].weight[row] = 0
        if net.layers[layer].psi is not None:
            net.layers[layer].psi[row] = 0
        net.layers[layer].bias[row] = 0.7


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("optimiser", list(OPTIMISERS))
def test_growth_keeps_the_function_and_the_optimiser_consistent(dtype, optimiser):
    net, opt = trained(dtype=dtype, optimiser=optimiser)
    x = probe(net)
    with torch.no_grad():
        before = net(x)
    change = net.grow(1, 4, opt, scale=0.1)
    assert (change.width_before, change.width_after) == (7, 11) and net.widths == (5, 9, 11, 3)
    with torch.no_grad():
        assert relative_error(net(x), before) <= TOLERANCE[dtype]
    assert_optimiser_consistent(net, opt)
    for p in (net.layers[1].weight, net.layers[1].bias):
        for value in opt.state[p].values():
            if torch.is_tensor(value) and value.dim() > 0:
                assert torch.all(value[7:] == 0)  # new rows have no history
    losses = [train_step(net, opt, *batch(net.widths, dtype)) for _ in range(5)]
    assert losses[-1] < losses[0]  # still trainable
    assert net.layers[1].weight[7:].abs().max() > 0  # the scaffold rows are trained


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("optimiser", list(OPTIMISERS))
@pytest.mark.parametrize("intrinsic_length", ["none", "trainable"])
def test_degenerating_a_zero_strength_direction_keeps_the_function(dtype, optimiser, intrinsic_length):
    psi = intrinsic_length == "trainable"
    net, opt = trained(dtype=dtype, optimiser=optimiser, psi=psi, intrinsic_length=intrinsic_length)
    make_constant_direction(net, 1, 3)  # layer 1 is 7×9: full rank, so e_3 is its only zero-strength direction
    x = probe(net)
    with torch.no_grad():
        before = net(x)
    o_before = float(net.layers[1].activation.o.detach())
    change = net.degenerate(1, 1, opt)
    assert change.strength < 1e-6 and net.widths == (5, 9, 6, 3)
    assert float(net.layers[1].activation.o.detach()) == pytest.approx(o_before + 0.49, rel=1e-5)  # o += c², c = 0.7
    assert net.layers[2].psi is not None  # psi_next absorbed W_next c (created when the network had none)
    with torch.no_grad():
        assert relative_error(net(x), before) <= TOLERANCE[dtype]
    assert_optimiser_consistent(net, opt)
    train_step(net, opt, *batch(net.widths, dtype))
    assert_optimiser_consistent(net, opt)


def test_degenerating_strong_directions_changes_the_function_as_reported():
    net, opt = trained()
    x = probe(net)
    with torch.no_grad():
        before = net(x)
    change = net.degenerate(1, 3, opt)
    assert change.strength > 0.01
    with torch.no_grad():
        assert relative_error(net(x), before) > 1e-4  # not exact: the test can tell


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_diagonalise_keeps_the_function_and_orthogonalises_rows(full, dtype):
    net, opt = trained(widths=(5, 9, 7, 6, 3), dtype=dtype)
    x = probe(net)
    with torch.no_grad():
        before = net(x)
    net.diagonalise(2, opt, full=full)
    with torch.no_grad():
        assert relative_error(net(x), before) <= {F64: 1e-10, torch.float32: 1e-5}[dtype]
    w = net.layers[2].weight.detach().to(F64)
    gram = w @ w.T
    off = gram - torch.diag(torch.diagonal(gram))
    assert float(off.abs().max()) <= 1e-4 * float(gram.abs().max())
    if full:
        off_diagonal = w.clone()
        k = min(w.shape)
        off_diagonal[range(k), range(k)] = 0
        assert float(off_diagonal.abs().max()) <= 1e-5 * float(w.abs().max())
    assert_optimiser_consistent(net, opt)


def test_sgd_momentum_after_a_rotation_continues_the_same_trajectory():
    """SGD with momentum is rotation-equivariant, so carrying the rotated momentum must give the same functions as
    never rotating; a reset momentum must not."""
    x, y = batch((5, 9, 7, 3), F64)
    runs = {}
    for variant in ("none", "carried", "reset"):
        net, opt = trained(optimiser="sgd", steps=5)
        if variant != "none":
            net.diagonalise(1, opt if variant == "carried" else None)
            if variant == "reset":
                opt = OPTIMISERS["sgd"](net.parameters())
        for _ in range(5):
            train_step(net, opt, x, y)
        with torch.no_grad():
            runs[variant] = net(probe(net))
    assert relative_error(runs["carried"], runs["none"]) <= 1e-10
    assert relative_error(runs["reset"], runs["none"]) > 1e-6


def test_adam_after_a_permutation_continues_the_same_trajectory():
    """Adam is permutation-equivariant and (P∘P)ᵀv is exact for a permutation: same functions as never permuting."""
    x, y = batch((5, 9, 7, 3), F64)
    outs = []
    for permute in (False, True):
        net, opt = trained(optimiser="adam", steps=5)
        if permute:
            perm = torch.eye(9, dtype=F64)[torch.randperm(9, generator=torch.Generator().manual_seed(3))]
            adapt.rotate_hidden(net, 0, perm, opt)
        for _ in range(5):
            train_step(net, opt, x, y)
        with torch.no_grad():
            outs.append(net(probe(net)))
    assert relative_error(outs[1], outs[0]) <= 1e-10


def test_adam_first_moment_rotates_exactly_second_moment_by_the_diagonal_rule():
    """exp_avg after a rotation equals the moving average of the rotated gradients (exact); exp_avg_sq equals
    (Q∘Q)ᵀ v (the documented diagonal rule), which differs from the rotated gradients' squares."""
    net = IsotropicMLP((4, 6, 3), seed=1, dtype=F64)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, betas=(0.9, 0.99))
    grads = []
    for step in range(6):
        x, y = batch((4, 6, 3), F64, seed=step)
        loss = (net(x) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        grads.append(net.layers[0].weight.grad.clone())
        opt.step()
    v_old = opt.state[net.layers[0].weight]["exp_avg_sq"].clone()
    q = torch.linalg.qr(torch.randn(6, 6, dtype=F64, generator=torch.Generator().manual_seed(0)))[0]
    adapt.rotate_hidden(net, 0, q, opt)
    state = opt.state[net.layers[0].weight]
    m_exact = sum(0.1 * 0.9 ** (5 - t) * (q.T @ g) for t, g in enumerate(grads))
    v_exact = sum(0.01 * 0.99 ** (5 - t) * (q.T @ g) ** 2 for t, g in enumerate(grads))
    assert relative_error(state["exp_avg"], m_exact) <= 1e-12
    assert relative_error(state["exp_avg_sq"], (q * q).T @ v_old) <= 1e-12
    assert relative_error(state["exp_avg_sq"], v_exact) > 1e-3


def test_trainable_o_moves_with_absorption_and_its_moments_scale():
    net, opt = trained(optimiser="adam")
    raw = net.layers[1].activation.raw_o
    m = opt.state[raw]["exp_avg"].clone()
    make_constant_direction(net, 1, 0)
    net.degenerate(1, 1, opt)
    new_raw = net.layers[1].activation.raw_o
    assert new_raw is not raw and raw not in opt.state
    ratio = torch.sigmoid(new_raw.detach()) / torch.sigmoid(raw.detach())
    assert float(opt.state[new_raw]["exp_avg"]) == pytest.approx(float(m * ratio), rel=1e-12)


@given(widths=st.lists(st.integers(1, 6), min_size=3, max_size=5), k=st.integers(1, 4), seed=st.integers(0, 99),
       psi=st.booleans())
def test_grow_then_degenerate_the_scaffold_keeps_the_function_over_shapes(widths, k, seed, psi):
    net, opt = trained(widths=tuple(widths), psi=psi, optimiser="adamw", steps=1, seed=seed)
    x = probe(net)
    with torch.no_grad():
        before = net(x)
    layer = seed % (len(widths) - 2)
    net.grow(layer, k, opt, scale=0.5)
    change = net.degenerate(layer, k, opt)  # the k scaffolds are the k zero-strength directions
    assert change.strength <= 1e-12 and net.widths == tuple(widths)
    with torch.no_grad():
        assert relative_error(net(x), before) <= 1e-10
    assert_optimiser_consistent(net, opt)


def test_neuroadapt_grows_to_the_target_and_prunes_the_excess():
    net, opt = trained(widths=(5, 9, 7, 3), optimiser="adam")
    x = probe(net)
    with torch.no_grad():
        before = net(x)
    # Hidden space 0 (9 wide, 5 inputs) has 4 zero-strength directions: 2 go; hidden space 1 (full rank) grows 2.
    changes = net.neuroadapt(threshold=1e-3, scaffold=2, optimiser=opt)
    assert [(c.kind, c.count) for c in changes] == [("degenerate", 2), ("grow", 2)] and net.widths == (5, 7, 9, 3)
    assert [adapt.strengths(net, i)[1].lt(1e-3).sum().item() for i in (0, 1)] == [2, 2]
    with torch.no_grad():
        assert relative_error(net(x), before) <= 1e-10
    changes = net.neuroadapt(threshold=1e9, scaffold=2, optimiser=opt, max_width=20)  # everything is "weak"
    assert [c.kind for c in changes] == ["degenerate", "degenerate"] and net.widths == (5, 2, 2, 3)
    changes = net.neuroadapt(threshold=0.0, scaffold=3, optimiser=opt, max_width=4)  # growth capped at 4 wide
    assert net.widths == (5, 4, 4, 3) and [c.count for c in changes] == [2, 2]
    assert_optimiser_consistent(net, opt)


def test_schedule_restructures_a_tiny_model_during_training_and_logs(caplog):
    net = IsotropicMLP((4, 3, 3, 2), psi=True, intrinsic_length="trainable", seed=0)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-2, weight_decay=0.1)
    schedule = adapt.Neuroadaptation(net, opt, every=10, threshold=0.05, scaffold=1, max_width=8, seed=0)
    x, y = batch((4, 3, 3, 2), torch.float32)
    widths = []
    with caplog.at_level(logging.INFO, logger="isocompress.train.adapt"):
        for _ in range(60):
            train_step(net, opt, x, y)
            before = net(x).detach()
            changes = schedule.step()
            if changes and all(c.kind == "grow" for c in changes):
                assert relative_error(net(x).detach(), before) <= 1e-6
            widths.append(net.widths)
    assert schedule.history and {c.step for c in schedule.history} <= {10, 20, 30, 40, 50, 60}
    assert any(c.kind == "grow" for c in schedule.history)
    assert len(set(widths)) > 1 and max(max(w[1:3]) for w in widths) <= 8
    assert [r.getMessage() for r in caplog.records] == [c.describe() for c in schedule.history]
    assert_optimiser_consistent(net, opt)
    shrunk = shrink_exact(net.to_isomlp())  # the restructured model goes through the rest of isocompress
    assert output_difference(net.to_isomlp(), shrunk, probe_inputs(4, per_scale=16))["max_rel"] <= 1e-10


def test_bad_arguments_raise_one_line_errors():
    net, opt = trained()
    with pytest.raises(IsocompressError, match="hidden space 2 does not exist"):
        net.grow(2, 1, opt)
    with pytest.raises(IsocompressError, match="integer ≥ 1"):
        net.grow(0, 0, opt)
    with pytest.raises(IsocompressError, match="cannot remove 9 of the 9 directions"):
        net.degenerate(0, 9, opt)
    with pytest.raises(IsocompressError, match="cannot be fully diagonalised"):
        net.diagonalise(0, opt, full=True)
    with pytest.raises(IsocompressError, match="rotation for hidden space 0 must be 9×9"):
        adapt.rotate_hidden(net, 0, torch.eye(3), opt)
    with pytest.raises(IsocompressError, match="every must be"):
        adapt.Neuroadaptation(net, opt, every=0)
    lbfgs_like = torch.optim.SGD(net.parameters(), lr=1e-2)
    lbfgs_like.state[net.layers[0].weight]["mystery"] = torch.ones(9, 5)
    with pytest.raises(IsocompressError, match="optimiser state 'mystery'"):
        net.grow(0, 1, lbfgs_like)


def test_restructuring_without_an_optimiser_and_an_optimiser_over_part_of_the_model():
    net, _ = trained()
    frozen = list(net.layers[0].parameters())
    opt = torch.optim.Adam([p for p in net.parameters() if all(p is not f for f in frozen)], lr=1e-2)
    train_step(net, opt, *batch(net.widths, F64))
    net.grow(0, 2, opt)
    held = {id(p) for group in opt.param_groups for p in group["params"]}
    assert not any(id(p) in held for p in net.layers[0].parameters())  # frozen parameters stay out
    assert id(net.layers[1].weight) in held
    net.grow(1, 2)  # no optimiser at all
    assert net.widths == (5, 11, 9, 3)


@pytest.mark.parametrize("optimiser", ["adam", "sgd"])
def test_degenerating_a_dead_neuron_is_a_slice_that_keeps_every_other_neuron_and_its_state(optimiser):
    """When the removed direction is one whole neuron, the kept basis is the other neurons themselves: their weights
    and (Adam's second moments included) optimiser state are unchanged, not rotated."""
    net, opt = trained(optimiser=optimiser)
    make_constant_direction(net, 1, 4)
    keep = [0, 1, 2, 3, 5, 6]
    before_w = net.layers[1].weight.detach()[keep].clone()
    before_state = {k: v[keep].clone() for k, v in opt.state[net.layers[1].weight].items()
                    if torch.is_tensor(v) and v.dim() > 0}
    net.degenerate(1, 1, opt)
    assert float((net.layers[1].weight.detach() - before_w).abs().max()) <= 1e-12
    for key, value in before_state.items():
        assert float((opt.state[net.layers[1].weight][key] - value).abs().max()) <= 1e-12 * float(value.abs().max())


def test_neuron_measure_counts_rows_and_grows_past_the_rank_chain():
    """Hidden space 0 of a 3→8 layer has rank ≤ 3: by directions 5 are scaffold (for scaffold=2 the excess 3 is
    degenerated); by neurons every trained row is strong, so it grows."""
    net, opt = trained(widths=(3, 8, 4, 2), optimiser="adam")
    u, s = adapt.strengths(net, 0, "neurons")
    rows = torch.linalg.vector_norm(net.layers[0].weight.detach(), dim=1)
    assert torch.allclose(s, torch.sort(rows, descending=True).values)
    assert torch.equal(u.abs().sum(0), torch.ones(8, dtype=F64))  # a permutation
    copied = copy.deepcopy(net)
    assert [(c.kind, c.count) for c in copied.neuroadapt(1e-6, 2, layers=[0])] == [("degenerate", 3)]
    changes = net.neuroadapt(1e-6, 2, opt, layers=[0], measure="neurons")
    assert [(c.kind, c.count) for c in changes] == [("grow", 2)] and net.widths[1] == 10
    make_constant_direction(net, 0, 5)
    x = probe(net)
    with torch.no_grad():
        before = net(x)
    change = net.degenerate(0, 1, opt, measure="neurons")  # a zero row: one of the fresh scaffolds or row 5
    assert change.strength == 0.0
    with torch.no_grad():
        assert relative_error(net(x), before) <= 1e-10
    assert_optimiser_consistent(net, opt)
    with pytest.raises(IsocompressError, match="measure 'rows'"):
        net.neuroadapt(0.1, 1, opt, measure="rows")


def test_lr_scheduler_and_state_dict_round_trip_survive_a_restructuring():
    net, opt = trained(optimiser="adamw")
    schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    net.grow(0, 3, opt)
    net.degenerate(1, 2, opt)
    train_step(net, opt, *batch(net.widths, F64))
    schedule.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-3)
    saved = opt.state_dict()  # indices follow param_groups, which now list the new parameters
    fresh = OPTIMISERS["adamw"](net.parameters())
    fresh.load_state_dict(saved)
    for p in net.parameters():
        for key, value in opt.state[p].items():
            assert torch.equal(fresh.state[p][key], value)


def test_schedule_start_and_stop_bound_the_restructurings():
    net = IsotropicMLP((4, 3, 3, 2), seed=0)
    opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.9)
    schedule = adapt.Neuroadaptation(net, opt, every=5, threshold=1e9, scaffold=0, start=7, stop=17, log=lambda m: None)
    x, y = batch((4, 3, 3, 2), torch.float32)
    for _ in range(30):
        train_step(net, opt, x, y)
        schedule.step()
    # threshold 1e9: every direction is "weak", so each due step degenerates all but one per hidden space
    assert sorted({c.step for c in schedule.history}) == [7]
    assert net.widths == (4, 1, 1, 2)
    net2 = IsotropicMLP((4, 3, 3, 2), seed=0)
    schedule2 = adapt.Neuroadaptation(net2, None, every=5, threshold=0.0, scaffold=1, start=7, stop=17,
                                      log=lambda m: None)
    for _ in range(30):
        schedule2.step()
    assert [c.step for c in schedule2.history if c.hidden == 1] == [7, 12, 17]  # grows 1 at each due step
