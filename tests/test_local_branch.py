"""Branch and bound over the ball (docs/bounds.md §8.6): the box × ball domain's sup bounds, the cover of the ball by
pieces (Lemma 11), and soundness of the refined certificates and of every piece bound against float64 attacks —
inside each piece, and inside each whole ball — on hypothesis-generated random networks and on digits."""

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from isocompress.bounds import branch
from isocompress.bounds import local as lb
from isocompress.core.model import IsoMLP, random_model
from isocompress.exact.constants import remove_all_constant_directions
from isocompress.formats import io
from isocompress.prune import budget as prune

F64 = torch.float64
MODELS = Path(__file__).resolve().parents[1] / "models"


@pytest.mark.parametrize("k", [0, 1, 3])
def test_domain_bounds_hold_and_are_attained(k):
    """sup over |η_j| ≤ s (j < k), |η_{k:}| ≤ s of |a·η| is exactly Domain.vec(a) (attained at a corner), and |Aη| never
    exceeds Domain.mat(A) at random points, corners and the aligned points of the set."""
    gen = torch.Generator().manual_seed(k)
    dom = lb.Domain(0.7, k)
    a = torch.randn(40, 9, dtype=F64, generator=gen)
    best = torch.cat([torch.sign(a[:, :k]), a[:, k:] / a[:, k:].norm(dim=-1, keepdim=True)], -1) * 0.7
    assert torch.allclose((a * best).sum(-1), dom.vec(a), rtol=1e-12)
    m = torch.randn(40, 5, 9, dtype=F64, generator=gen)
    for _ in range(20):
        ball = torch.randn(40, 9 - k, dtype=F64, generator=gen)
        ball = ball / ball.norm(dim=-1, keepdim=True) * torch.rand(40, 1, dtype=F64, generator=gen) ** 0.1
        eta = torch.cat([torch.sign(torch.randn(40, k, dtype=F64, generator=gen)), ball], -1) * 0.7
        assert bool(((m @ eta[:, :, None])[:, :, 0].norm(dim=-1) <= dom.mat(m) * (1 + 1e-12)).all())
    _, _, vh = torch.linalg.svd(m[:, :, k:])  # the ball part along its top singular vector, the box at every corner
    for corner in range(2 ** k):
        signs = torch.tensor([1.0 if corner >> j & 1 else -1.0 for j in range(k)], dtype=F64).expand(40, k)
        eta = torch.cat([signs, vh[:, 0, :]], -1) * 0.7
        assert bool(((m @ eta[:, :, None])[:, :, 0].norm(dim=-1) <= dom.mat(m) * (1 + 1e-12)).all())


def _grid(eps: float, k: int, cells: int):
    """A partition of the box [−ε', ε']^k into cells^k boxes (lo, hi), ε' slightly above ε as refine starts."""
    width = eps * (1.0 + 1e-6)
    edges = torch.linspace(-width, width, cells + 1, dtype=F64)
    idx = torch.cartesian_prod(*[torch.arange(cells)] * k).reshape(-1, k)
    return edges[idx], edges[idx + 1]


@pytest.mark.parametrize("k,cells", [(1, 5), (2, 4), (3, 3)])
def test_pieces_cover_the_ball(k, cells):
    """Lemma 11: every δ of the ball lies in the piece of its cell, δ = Um + U diag(h)η_box + ρP̃η_ball + s with
    |η_box|_∞ ≤ 1, |η_ball| ≤ 1, |s| ≤ slip; cells reported empty hold no sampled point. Sampled on the sphere, inside,
    and along ±U (where ρ is smallest)."""
    gen = torch.Generator().manual_seed(10 * k + cells)
    n, eps = 7, 0.3
    dirs = torch.linalg.qr(torch.randn(n, k, dtype=F64, generator=gen))[0]
    lo, hi = _grid(eps, k, cells)
    q = len(lo)
    x0 = torch.randn(1, n, dtype=F64, generator=gen).expand(q, n)
    centres, e, nonempty, slip = branch.piece_sets(x0, eps, dirs.expand(q, n, k), lo, hi)
    d = torch.randn(4000, n, dtype=F64, generator=gen)
    d = d / d.norm(dim=-1, keepdim=True) * eps * torch.rand(4000, 1, dtype=F64, generator=gen).clamp_min(0.5) ** 0.2
    d[:200] = d[:200] / d[:200].norm(dim=-1, keepdim=True) * eps  # on the sphere
    d[200:200 + 2 * k] = eps * torch.cat([dirs.T, -dirs.T])  # the poles of the split directions
    t = d @ dirs
    inside = ((t[:, None, :] >= lo[None]) & (t[:, None, :] <= hi[None])).all(-1)  # (points, cells)
    assert bool(inside.any(1).all())  # the cells cover every t of the ball
    pts, cell = inside.nonzero(as_tuple=True)
    assert bool(nonempty[cell].all())
    mid, half = (lo + hi) / 2, (hi - lo) / 2
    eta_box = (t[pts] - mid[cell]) / half[cell]
    assert bool((eta_box.abs() <= 1 + 1e-12).all())
    xi = d[pts] - t[pts] @ dirs.T
    proj = torch.eye(n, dtype=F64) - dirs @ dirs.T
    rho = (e[cell][:, :, k:] * proj).sum((-1, -2)) / (proj * proj).sum()  # the ball block is ρ P̃
    assert bool((xi.norm(dim=-1) <= rho * (1 + 1e-12)).all())
    rebuilt = centres[cell] - x0[cell] + (e[cell, :, :k] @ eta_box[:, :, None])[:, :, 0] \
        + (e[cell, :, k:] @ (xi / rho[:, None])[:, :, None])[:, :, 0]
    assert bool(((rebuilt - d[pts]).norm(dim=-1) <= slip[cell] + 1e-15).all())


def _pruned(widths, psi, o, seed, share, scale=1.5):
    model = random_model(widths, psi=psi, o=o, seed=seed, weight_scale=scale)
    x = torch.randn(24, widths[0], dtype=F64, generator=torch.Generator().manual_seed(seed))
    state = prune.State.of(remove_all_constant_directions(model))
    smallest, exact = prune.smallest_params(state), prune.current_params(state)
    target = max(int(smallest + share * (exact - smallest)), smallest)
    return prune.prune_to_target(state, target, "data-aware", x, float(x.norm(dim=-1).max())), x


def _piece_attack(state, x0, eps, dirs, lo, hi, steps=60, starts=6, seed=0):
    """Projected Adam inside each piece, parametrised as δ = U t + ξ with t clamped to [lo, hi] and ξ ⊥ U scaled to
    |ξ|² ≤ ε² − |t|² (so every iterate is a point of the piece): the largest |Δy| and whether either network's top-1
    leaves `top` anywhere visited. Points outside the ball (an empty piece) are never produced."""
    ref, cand = IsoMLP(state.layers), prune.materialize(state)
    gen = torch.Generator().manual_seed(seed)
    q, n = x0.shape
    k = dirs.shape[-1]
    top = ref(x0 + (dirs @ ((lo + hi) / 2)[:, :, None])[:, :, 0]).argmax(-1).detach()
    t = (lo + (hi - lo) * torch.rand(starts, q, k, dtype=F64, generator=gen)).requires_grad_(True)
    xi = (eps * torch.randn(starts, q, n, dtype=F64, generator=gen)).requires_grad_(True)
    opt = torch.optim.Adam([t, xi], lr=0.1 * eps)
    best, flipped = torch.zeros(q, dtype=F64), torch.zeros(q, dtype=torch.bool)
    proj = torch.eye(n, dtype=F64) - dirs @ dirs.transpose(-1, -2)
    for step in range(steps + 1):
        with torch.no_grad():
            t.copy_(torch.maximum(torch.minimum(t, hi), lo))
            perp = (proj @ xi[..., None])[..., 0]
            room = (eps ** 2 - (t * t).sum(-1, keepdim=True)).clamp_min(0.0).sqrt() * (1 - 1e-9)
            xi.copy_(perp * torch.clamp(room / perp.norm(dim=-1, keepdim=True).clamp_min(1e-300), max=1.0))
        xs = (x0 + (dirs @ t[..., None])[..., 0] + xi).reshape(-1, n)
        y, y2 = ref(xs).reshape(starts, q, -1), cand(xs).reshape(starts, q, -1)
        diff = (y2 - y).norm(dim=-1)
        with torch.no_grad():
            best = torch.maximum(best, diff.max(0).values)
            flipped |= ((y.argmax(-1) != top) | (y2.argmax(-1) != top)).any(0)
        if step == steps:
            break
        margin = torch.minimum(lb.class_margin(y, top.expand(starts, q)), lb.class_margin(y2, top.expand(starts, q)))
        loss = -diff[: starts // 2].sum() + margin[starts // 2:].sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return best, flipped


@settings(max_examples=8, deadline=None)
@given(st.lists(st.integers(2, 9), min_size=3, max_size=5), st.booleans(), st.floats(0.0, 2.0),
       st.sampled_from([0.05, 0.3, 1.0]), st.integers(0, 10000), st.integers(1, 2), st.integers(2, 5))
def test_piece_bounds_hold_inside_every_piece(widths, psi, o, eps, seed, k, cells):
    """Every piece's β and certified top-1 margins hold against an attack inside that piece."""
    state, x = _pruned(widths, psi, o, seed, 0.3)
    centres = x[:3]
    out = prune.local_certificates(state, centres, eps)
    dirs, _ = branch.split_directions(out["linear"], k)
    k = dirs.shape[-1]
    lo, hi = _grid(eps, k, cells)
    p, q = len(centres), len(lo)
    x0, d = centres.repeat_interleave(q, 0), dirs.repeat_interleave(q, 0)
    lo, hi = lo.repeat(p, 1), hi.repeat(p, 1)
    got = branch.bound_pieces(state.layers, state.removed, state.consts, x0, eps, d, lo, hi,
                              prune.rounding_allowance(state) + state.constant_bound)
    found, flipped = _piece_attack(state, x0, eps, d, lo, hi, seed=seed)
    live = got["top"] >= 0
    assert bool((found[live] <= got["bound"][live]).all()), float((found - got["bound"]).max())
    assert not bool((live & (got["margin"] > 0) & flipped).any())


@settings(max_examples=8, deadline=None)
@given(st.lists(st.integers(2, 9), min_size=3, max_size=5), st.booleans(), st.floats(0.0, 2.0),
       st.sampled_from([0.1, 0.5, 1.5]), st.integers(0, 10000))
def test_refined_points_are_never_refuted_and_their_bounds_hold(widths, psi, o, eps, seed):
    """refine on every point the ball bound leaves uncertified (thorough effort, a generous piece budget): no point
    it certifies is flipped by the ball attack or refuted by a strong disagreement search, and the refined β is
    never exceeded inside the ball."""
    state, x = _pruned(widths, psi, o, seed, 0.3)
    centres = x[:8]
    out = prune.local_certificates(state, centres, eps)
    todo = (~out["top1"]).nonzero()[:, 0]
    if not len(todo):
        return
    margin = torch.minimum(out["margin_original"], out["margin_pruned"])
    got = branch.refine(state.layers, state.removed, state.consts, centres[todo], eps, out["top_class"][todo],
                        out["linear"][todo], out["bound"][todo], margin[todo], branch.EFFORTS["thorough"],
                        budget=64 * len(todo), allowance=prune.rounding_allowance(state) + state.constant_bound)
    assert bool((got["bound"] <= out["bound"][todo]).all())
    ref, cand = IsoMLP(state.layers), prune.materialize(state)
    found = lb.local_search(ref, cand, centres[todo], eps, starts=16, steps=80, seed=seed)
    assert bool((found["max_abs"] <= got["bound"]).all())
    assert not bool((got["certified"] & found["flipped"]).any())
    refuted = lb.disagreement_search(ref, cand, centres[todo], eps, starts=24, steps=120, seed=seed)["refuted"]
    assert not bool((got["certified"] & refuted).any())
    assert bool((got["gap"][got["certified"]] == 0).all())


def test_refinement_decides_digits_points_the_ball_bound_cannot():
    """On digits at a 5% budget and ε = 2% of the median norm the plain ball bound leaves points undecided; the
    refinement certifies some of them, and those survive the attack and a strong disagreement search (float64)."""
    model = io.load(MODELS / "digits.pt").cast(F64)
    x = torch.from_numpy(np.load(MODELS / "digits.calib.npy")).to(F64)
    state = prune.State.of(remove_all_constant_directions(model))
    state = prune.prune_to_target(state, int(0.05 * model.num_params()), "data-aware", x, float(x.norm(dim=-1).max()))
    eps = 0.02 * float(x.norm(dim=-1).median())
    out = prune.local_certificates(state, x, eps)
    todo = (~out["top1"]).nonzero()[:, 0][:24]
    margin = torch.minimum(out["margin_original"], out["margin_pruned"])
    got = branch.refine(state.layers, state.removed, state.consts, x[todo], eps, out["top_class"][todo],
                        out["linear"][todo], out["bound"][todo], margin[todo], branch.EFFORTS["normal"],
                        budget=16 * len(todo), allowance=prune.rounding_allowance(state) + state.constant_bound)
    won = got["certified"]
    assert int(won.sum()) > 0
    ref, cand = IsoMLP(state.layers), prune.materialize(state)
    found = lb.local_search(ref, cand, x[todo][won], eps, starts=16, steps=80)
    assert not bool(found["flipped"].any()) and bool((found["max_abs"] <= got["bound"][won]).all())
    refuted = lb.disagreement_search(ref, cand, x[todo][won], eps, starts=16, steps=120, verify=(model, cand))
    assert not bool(refuted["refuted"].any())
