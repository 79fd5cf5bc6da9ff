"""Branch and bound over the ball for local certificates (docs/bounds.md §8.6): the ball |δ| ≤ ε around a point is
covered by pieces {δ : Uᵀδ ∈ box} (U: a few orthonormal directions per point, those along which the two networks'
outputs move most at the centre); each piece is bounded by `local.local_bounds` as the set
{x_i + U m + U diag(h) η_box + ρ P_⊥ η_ball : |η_box|_∞ ≤ 1, |η_ball| ≤ 1} and split further while it is not
certified. A point is certified when every piece of its current partition is; its β is the largest piece bound.

Pure tensor maths (floor 2): the pieces are batched, chunked, and the partition kept as tensors.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from isocompress.bounds.certified import SLOPE_MAX, spectral_norm, vec_norm
from isocompress.bounds.local import F64, local_bounds

CHUNK = 256  # pieces bounded per batch (memory: CHUNK × width × (n0 + k) float64 matrices)
ORTHO_MARGIN = 1e-9  # relative inflation of ρ and h: covers float64 rounding of U's orthonormality (§8.6, §5)


@dataclass(frozen=True)
class Effort:
    """How hard `refine` works on the points the plain ball bound leaves undecided."""

    name: str
    directions: int  # k: split directions per point
    pieces_per_point: float  # the budget of piece evaluations, as a multiple of the number of points given
    search_starts: int  # the disagreement search (bounds.local.disagreement_search) per ball
    search_steps: int
    time_share: float  # all local certificate work within this multiple of the run's time before it (inf: none)


EFFORTS = {
    "fast": Effort("fast", 0, 0.0, 8, 40, math.inf),
    "normal": Effort("normal", 1, 4.0, 8, 40, 1.5),  # ≤ 3× the run without certificates (docs/bounds.md §8.6)
    "thorough": Effort("thorough", 2, 48.0, 16, 120, math.inf),
}
DEFAULT_EFFORT = "normal"


def split_directions(linear: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per point the top-k right singular vectors (P, n0, k) of the stacked output Jacobians at the centre
    (`linear`: (P, m, n0), the original's and the pruned network's linear parts) and their singular values (P, k)."""
    _, s, vh = torch.linalg.svd(linear.to(F64), full_matrices=False)
    k = min(k, vh.shape[-2])
    return vh[:, :k, :].transpose(-1, -2).contiguous(), s[:, :k]


def piece_sets(x0: torch.Tensor, eps: float, dirs: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
    """The pieces {δ : |δ| ≤ ε, t(δ) ∈ [lo, hi]} as (centres, E, nonempty, slip) for local_bounds with box = k and
    scale 1 (docs/bounds.md, Lemma 11): with t = U⁺δ and ξ = δ − Ut ⊥ range(U), δ = Um + U diag(h) η_box +
    ρ P̃ η_ball + s, m, h the box's centre and half-widths, |η_box|_∞ ≤ 1, |η_ball| ≤ 1, ρ² = ε² − (1 − d)·dist(0,
    box)², P̃ = I − UUᵀ as computed, d = ‖UᵀU − I‖_F, and |s| ≤ `slip` (the float64 defect of U's orthonormality and
    of the centre). A box farther than ε/√(1 − d) from 0 holds no point of the ball."""
    mid, half = (lo + hi) / 2.0, (hi - lo) / 2.0
    dist2 = (torch.clamp(torch.maximum(lo, -hi), min=0.0) ** 2).sum(-1)
    k = dirs.shape[-1]
    defect = torch.linalg.matrix_norm(dirs.transpose(-1, -2) @ dirs - torch.eye(k, dtype=F64))
    rho2 = eps * eps - (1.0 - defect) * dist2
    nonempty = rho2 >= 0.0
    rho = torch.sqrt(rho2.clamp_min(0.0))
    n0 = x0.shape[1]
    proj = torch.eye(n0, dtype=F64) - dirs @ dirs.transpose(-1, -2)
    e = torch.cat([dirs * half[:, None, :], rho[:, None, None] * proj], dim=-1)
    centres = x0 + (dirs @ mid[:, :, None])[:, :, 0]
    slip = 4.0 * defect * eps + 1e-15 * (torch.linalg.vector_norm(centres, dim=-1) + eps)
    return centres, e, nonempty, slip


def lipschitz(layers) -> float:
    """An upper bound on the Lipschitz constant of the original and of the embedded pruned network (removing rows
    or fixing coordinates to constants does not raise it): Π_l (‖W_l‖ + |psi_l| · sup|g'|) (Lemmas 1, 2)."""
    total = 1.0
    for layer in layers:
        total *= spectral_norm(layer.dense_weight()) + (0.0 if layer.psi is None else vec_norm(layer.psi) * SLOPE_MAX)
    return total


def bound_pieces(layers, removed, consts, x0, eps, dirs, lo, hi, allowance: float) -> dict:
    """local_bounds on every piece, in chunks: bound, margins and top class per piece (empty pieces: certified)."""
    out = {"bound": [], "margin": [], "top": []}
    lip = lipschitz(layers)
    for s in range(0, len(lo), CHUNK):
        sl = slice(s, s + CHUNK)
        centres, e, nonempty, slip = piece_sets(x0[sl], eps, dirs[sl], lo[sl], hi[sl])
        # the slip s moves each network's output by at most L|s|: β by 2L|s|, each margin by 2L|s| (≤ 2·allowance)
        extra = 2.0 * lip * float(slip.max())
        got = local_bounds(layers, removed, consts, centres, 1.0, allowance=allowance + extra, inputs=e,
                           box=dirs.shape[-1])
        margin = torch.minimum(got["margin_original"], got["margin_pruned"])
        out["bound"].append(torch.where(nonempty, got["bound"], torch.zeros_like(got["bound"])))
        out["margin"].append(torch.where(nonempty, margin, torch.full_like(margin, math.inf)))
        out["top"].append(torch.where(nonempty, got["top_class"], torch.full_like(got["top_class"], -1)))
    return {key: torch.cat(v) for key, v in out.items()}


def refine(layers, removed, consts, x0: torch.Tensor, eps: float, top: torch.Tensor, linear: torch.Tensor,
           ball_bound: torch.Tensor, ball_margin: torch.Tensor, effort: Effort, budget: int, allowance: float = 0.0,
           deadline: float = math.inf) -> dict:
    """Branch and bound on the balls |x − x0_i| ≤ ε that the plain bound left undecided (docs/bounds.md §8.6). Each
    round bisects every live piece along its widest direction (weighted by the Jacobian's singular value) and bounds
    the halves; a piece is done when certified (top-1 = `top` on it for both networks, or empty), and a point is
    certified when all its pieces are. A piece whose centre has another top-1 class ends the point's refinement (its
    top-1 is not constant on the ball). Stops after `budget` piece bounds or at `deadline` (time.perf_counter).
    Returns certified (P,), bound (P,) (≤ ball_bound: the largest piece bound of the final partition), gap (P,)
    (−the worst margin lower bound among the live pieces; 0 when certified), pieces (P,) (bounded per point)."""
    p = len(x0)
    dirs, weight = split_directions(linear, effort.directions)
    k = dirs.shape[-1]
    width = eps * (1.0 + 1e-6)  # |t_j| ≤ ε/√(1 − d) for the float U (d ~ 1e-15)
    owner = torch.arange(p)
    lo, hi = torch.full((p, k), -width, dtype=F64), torch.full((p, k), width, dtype=F64)
    piece_bound, piece_margin = ball_bound.clone(), ball_margin.clone()
    done_bound = torch.zeros(p, dtype=F64)
    failed, counted = torch.zeros(p, dtype=torch.bool), torch.zeros(p, dtype=torch.long)
    used, per_piece = 0, 0.0
    while len(owner) and used < budget and time.perf_counter() < deadline and k > 0:
        left = budget - used
        if per_piece > 0 and deadline < math.inf:  # what the time left allows at the last round's pace
            left = min(left, int((deadline - time.perf_counter()) / per_piece))
        if left < 2:
            break
        take = _affordable(owner, left)
        round_started = time.perf_counter()
        j = ((hi[take] - lo[take]) * weight[owner[take]]).argmax(-1)
        c_owner, c_lo, c_hi = _bisect(owner[take], lo[take], hi[take], j)
        got = bound_pieces(layers, removed, consts, x0[c_owner], eps, dirs[c_owner], c_lo, c_hi, allowance)
        used += len(c_owner)
        per_piece = (time.perf_counter() - round_started) / len(c_owner)
        # a piece lies in its parent: the parent's bounds hold on it too (the better of the two is kept)
        parent_bound, parent_margin = piece_bound[take].repeat(2), piece_margin[take].repeat(2)
        got["bound"] = torch.minimum(got["bound"], parent_bound)
        got["margin"] = torch.maximum(got["margin"], parent_margin)
        counted.index_add_(0, c_owner, torch.ones_like(c_owner))
        other = (got["top"] >= 0) & (got["top"] != top[c_owner])
        failed[c_owner[other]] = True
        ok = (got["margin"] > 0) & ~other
        done_bound.scatter_reduce_(0, c_owner[ok], got["bound"][ok], "amax")
        rest = ~take
        owner = torch.cat([owner[rest], c_owner[~ok]])
        lo, hi = torch.cat([lo[rest], c_lo[~ok]]), torch.cat([hi[rest], c_hi[~ok]])
        piece_bound = torch.cat([piece_bound[rest], got["bound"][~ok]])
        piece_margin = torch.cat([piece_margin[rest], got["margin"][~ok]])
        keep = ~failed[owner]
        owner, lo, hi, piece_bound, piece_margin = owner[keep], lo[keep], hi[keep], piece_bound[keep], piece_margin[keep]
    return _refined(p, owner, piece_bound, piece_margin, done_bound, failed, counted, ball_bound, k)


def _affordable(owner: torch.Tensor, left: int) -> torch.Tensor:
    """Which live pieces to split this round (2 bounds each): all if the budget allows, else those of the points
    with the fewest live pieces (the nearest to certified) first."""
    if 2 * len(owner) <= left:
        return torch.ones(len(owner), dtype=torch.bool)
    live = torch.bincount(owner)[owner]
    order = torch.argsort(live * (owner.max() + 1) + owner)
    take = torch.zeros(len(owner), dtype=torch.bool)
    take[order[: max(left // 2, 0)]] = True
    return take


def _bisect(owner, lo, hi, j):
    """Each box halved along its coordinate j: two children per box (the halves' union is the box)."""
    idx = torch.arange(len(owner))
    mid = (lo[idx, j] + hi[idx, j]) / 2.0
    lo2, hi1 = lo.clone(), hi.clone()
    hi1[idx, j], lo2[idx, j] = mid, mid
    return torch.cat([owner, owner]), torch.cat([lo, lo2]), torch.cat([hi1, hi])


def _refined(p, owner, piece_bound, piece_margin, done_bound, failed, counted, ball_bound, k) -> dict:
    live = torch.zeros(p, dtype=torch.bool)
    live[owner] = True
    bound = done_bound.clone()
    bound.scatter_reduce_(0, owner, piece_bound, "amax")
    bound = torch.where(failed, ball_bound, torch.minimum(bound, ball_bound))
    gap = torch.zeros(p, dtype=F64)
    gap.scatter_reduce_(0, owner, (-piece_margin).clamp_min(0.0), "amax")
    certified = ~live & ~failed & (k > 0)
    return {"certified": certified, "bound": bound, "gap": torch.where(failed, math.inf, gap), "pieces": counted}
