"""Pure functions for error bounds and error metrics of a pruned isotropic network (derivation: docs/bounds.md).

A pruned network is described in the *embedded* form: the full-width float64 layers of the unpruned network in the
final bases, a mask of the removed coordinates of every hidden space and the constants that replace them. The pruned
network computes exactly z'_l = P_K(W_l h'_{l-1} + b_l + psi_l g'_{l-1}) + P_S c_l (docs/bounds.md, eq. 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from isocompress.core import threads
from isocompress.core.model import Layer
from isocompress.core.primitives import isotropic_tanh

F64 = torch.float64
# For g(m) = tanh(m)/m, |g'(m)| peaks at m* = 0.91993767: SLOPE_PEAK_M ≥ m* (so |g'| decreases beyond it) and
# SLOPE_MAX ≥ the peak value 0.34341955… (docs/bounds.md, Lemma 2). SLOPE_PEAK_M must not be below m*: with 0.9199,
# slope_sup(m) for m ∈ (0.9199, m*) returned |g'(m)| < the peak that lies beyond m.
SLOPE_PEAK_M = 0.92
SLOPE_MAX = 0.34342


def gain(m: float) -> float:
    """g(m) = tanh(m)/m (1 at m = 0)."""
    return 1.0 if m < 1e-8 else math.tanh(m) / m


def gain_slope(m: float) -> float:
    """|g'(m)| = (tanh m − m sech² m)/m²."""
    if m < 1e-4:
        return 2.0 * m / 3.0
    return (math.tanh(m) - m / math.cosh(m) ** 2) / (m * m) if m < 300 else 1.0 / (m * m)


def slope_sup(m_min: float) -> float:
    """sup over m ≥ m_min of |g'(m)|: |g'| rises up to its peak and falls after it (Lemma 2). The margin covers the
    rounding of gain_slope (a few ulp, checked against 40-digit arithmetic)."""
    return SLOPE_MAX if m_min <= SLOPE_PEAK_M else gain_slope(m_min) * (1.0 + 1e-12)


def spectral_norm(matrix: torch.Tensor) -> float:
    if matrix.numel() == 0:
        return 0.0
    m = matrix.to(F64)
    if m.dim() == 1:
        return float(torch.linalg.vector_norm(m))
    if min(m.shape) == 1:
        return float(torch.linalg.vector_norm(m))
    with threads.for_matrix(*m.shape):
        gram = m.T @ m if m.shape[0] >= m.shape[1] else m @ m.T
        # largest eigenvalue of the Gram matrix (half the cost of an SVD), with a margin for its rounding
        top = float(torch.linalg.eigvalsh(gram)[-1])
    return math.sqrt(max(top, 0.0)) * (1.0 + 1e-12)


def vec_norm(v: torch.Tensor | None) -> float:
    return 0.0 if v is None or v.numel() == 0 else float(torch.linalg.vector_norm(v))


def op_norm(layer: Layer, rows: torch.Tensor | None = None) -> float:
    """An upper bound on the operator norm of (rows of) a layer's weight map on its whole input map: ‖M_rows‖₂ times
    the pooling's norm and sqrt(overlap) (docs/bounds.md, "Convolutional layers"); ‖W_rows‖₂ for a dense layer."""
    m = layer.matrix() if rows is None else layer.matrix()[rows]
    return spectral_norm(m) * layer.geometry.input_op_norm()


def psi_op_norm(layer: Layer, rows: torch.Tensor | None = None) -> float:
    """The same for the psi map (|psi_rows| for a dense layer's vector)."""
    if layer.psi is None:
        return 0.0
    m = layer.psi_matrix() if rows is None else layer.psi_matrix()[rows]
    return spectral_norm(m) * layer.geometry.input_op_norm()


def joint_op_norm(layer: Layer, rows: torch.Tensor) -> float:
    """The operator norm bound of the stacked map [W, Ψ] (rows) on the stacked input [h; g]."""
    m = torch.cat([layer.matrix()[rows], layer.psi_matrix()[rows]], dim=1)
    return spectral_norm(m) * layer.geometry.input_op_norm()


@dataclass(frozen=True)
class Ball:
    """The reachable set of one hidden space of the *original* network: z ∈ B(z_center, z_radius), and what
    follows for h = f(z) ∈ B(h_center, h_radius) and g ∈ [g_mid − g_half, g_mid + g_half]. On a map, the balls are of
    the whole map and g_mid, g_half are maps (one value per position); on a vector, numbers."""

    z_center: torch.Tensor
    z_radius: float
    h_center: torch.Tensor
    h_radius: float
    g_mid: float | torch.Tensor
    g_half: float | torch.Tensor
    o: float
    m_lo: float = 0.0  # the smallest m over the ball (over every position of a map)
    positions: int = 1


def m_range(center_norm: float, radius: float, o: float) -> tuple[float, float]:
    low = max(0.0, center_norm - radius)
    high = center_norm + radius
    return math.sqrt(o + low * low), math.sqrt(o + high * high)


def reachable_balls(layers: list[Layer], radius: float) -> list[Ball]:
    """Balls containing every hidden pre-activation, gain and output of the network for |x| ≤ radius
    (docs/bounds.md, Lemma 3; on maps, "Convolutional layers": the ball is the whole map's, and each position's
    channel vector lies within z_radius of its centre)."""
    balls: list[Ball] = []
    first = layers[0]
    h_center = torch.zeros(first.n_in, *first.geometry.in_spatial, dtype=F64)
    h_radius, g_mid, g_half = float(radius), None, 0.0
    for layer in layers[:-1]:
        z_center = ball_centre(layer, h_center, g_mid)
        z_radius = op_norm(layer) * h_radius + (psi_op_norm(layer) * _gain_norm(g_half) if layer.psi is not None else 0.0)
        ball = (_map_ball if layer.geometry.out_spatial else _vector_ball)(z_center, z_radius, float(layer.o))
        balls.append(ball)
        h_center, h_radius, g_mid, g_half = ball.h_center, ball.h_radius, ball.g_mid, ball.g_half
    return balls


def ball_centre(layer: Layer, h_center: torch.Tensor, g_mid) -> torch.Tensor:
    """The layer's pre-activation at the centre of its input ball (W h + b + psi g for a dense layer)."""
    if h_center.dim() == 1 and layer.kind == "dense" and layer.weight.dim() == 2:
        z = layer.weight @ h_center + layer.bias
        return z if layer.psi is None else z + layer.psi * g_mid
    return layer.pre_activation(h_center[None], None if g_mid is None else g_mid[None])[0]


def _vector_ball(z_center: torch.Tensor, z_radius: float, o: float) -> Ball:
    m_lo, m_hi = m_range(vec_norm(z_center), z_radius, o)
    h_center, _ = isotropic_tanh(z_center, o)
    h_radius = gain(m_lo) * z_radius  # f is g(m_lo)-Lipschitz on the ball (Lemma 1)
    if vec_norm(h_center) + h_radius > 1.0:  # every hidden output lies in the unit ball
        h_center, h_radius = torch.zeros_like(h_center), 1.0
    g_lo, g_hi = gain(m_hi), gain(m_lo)
    return Ball(z_center, z_radius, h_center, h_radius, (g_lo + g_hi) / 2.0, (g_hi - g_lo) / 2.0, o, m_lo, 1)


def _map_ball(z_center: torch.Tensor, z_radius: float, o: float) -> Ball:
    """A hidden space that is a map (C × spatial): every position's channel vector is within z_radius of its centre,
    so m has a range per position; f is g(min m_lo)-Lipschitz on the whole map; |h_p| < 1 gives |h| ≤ sqrt(P)."""
    norms = torch.linalg.vector_norm(z_center, dim=0)  # |z_center| at every position
    low = (norms - z_radius).clamp_min(0.0)
    m_lo_map, m_hi_map = torch.sqrt(o + low * low), torch.sqrt(o + (norms + z_radius) ** 2)
    h_center = isotropic_tanh(z_center.movedim(0, -1), o)[0].movedim(-1, 0)
    m_lo = float(m_lo_map.min())
    h_radius = gain(m_lo) * z_radius
    positions = int(norms.numel())
    if vec_norm(h_center) + h_radius > math.sqrt(positions):
        h_center, h_radius = torch.zeros_like(h_center), math.sqrt(positions)
    g_hi, g_lo = gain_map(m_lo_map), gain_map(m_hi_map)
    return Ball(z_center, z_radius, h_center, h_radius, ((g_lo + g_hi) / 2.0)[None], ((g_hi - g_lo) / 2.0)[None], o,
                m_lo, positions)


def gain_map(m: torch.Tensor) -> torch.Tensor:
    """g(m) = tanh(m)/m at every position (1 at m = 0)."""
    return torch.where(m < 1e-8, torch.ones_like(m), torch.tanh(m) / m.clamp_min(1e-300))


def _gain_norm(g_half) -> float:
    """|g_half| over the map (the number itself on a vector)."""
    return float(torch.linalg.vector_norm(g_half)) if isinstance(g_half, torch.Tensor) else float(g_half)


def _input_ball(balls: list[Ball], i: int, radius: float, layer: Layer) -> tuple[torch.Tensor, float, object, object]:
    """(h center, h radius, g mid, g half) of the input of weight layer i."""
    if i == 0:
        return torch.zeros(layer.n_in, *layer.geometry.in_spatial, dtype=F64), float(radius), None, 0.0
    b = balls[i - 1]
    return b.h_center, b.h_radius, b.g_mid, b.g_half


def introduced_error(layer: Layer, removed: torch.Tensor, consts: torch.Tensor, h_center, h_radius, g_mid, g_half):
    """sup over the reachable inputs of |P_S z − c_S|: the error of replacing the removed coordinates by constants
    (docs/bounds.md, eq. 3; on a map, over every position: the removed channels' offset map at the centre plus the
    spread of the removed rows' maps over the input ball)."""
    if not bool(removed.any()):
        return 0.0
    centre = ball_centre(layer, h_center, g_mid)[removed]
    offset = centre - consts[removed].reshape(-1, *([1] * (centre.dim() - 1)))
    spread = op_norm(layer, removed) * h_radius
    if layer.psi is not None:
        g_spread = _gain_norm(g_half)
        separate = spread + psi_op_norm(layer, removed) * g_spread
        joint = joint_op_norm(layer, removed) * math.hypot(h_radius, g_spread)
        return vec_norm(offset) + min(separate, joint)
    return vec_norm(offset) + spread


def propagated_error(layer: Layer, kept: torch.Tensor, dh: float, dg: float) -> float:
    """Bound on |P_K(W Δh + psi Δg)| (docs/bounds.md, eq. 4)."""
    if layer.psi is None or dg == 0.0:
        return op_norm(layer, kept) * dh
    separate = op_norm(layer, kept) * dh + psi_op_norm(layer, kept) * dg
    joint = joint_op_norm(layer, kept) * math.hypot(dh, dg)
    return min(separate, joint)


def activation_error(ball: Ball, dz: float) -> tuple[float, float]:
    """(|Δh|, |Δg|) bounds from |Δz| ≤ dz: z and z' lie in the ball B(z_center, z_radius + dz), where f is
    g(m_lo)-Lipschitz and z ↦ g is sup|g'|-Lipschitz (Lemmas 1, 2); on a map, m_lo is the smallest over the positions,
    both networks' h lie in the ball |h_p| < 1 at each position, and g's change is bounded position by position."""
    if ball.positions == 1:
        m_lo, m_hi = m_range(vec_norm(ball.z_center), ball.z_radius + dz, ball.o)
        dh = min(gain(m_lo) * dz, 2.0)
        dg = min(slope_sup(m_lo) * dz, gain(m_lo) - gain(m_hi))  # g is decreasing in m
        return dh, dg
    norms = torch.linalg.vector_norm(ball.z_center, dim=0)
    low = (norms - (ball.z_radius + dz)).clamp_min(0.0)
    m_lo_map = torch.sqrt(ball.o + low * low)
    m_hi_map = torch.sqrt(ball.o + (norms + ball.z_radius + dz) ** 2)
    m_lo = float(m_lo_map.min())
    dh = min(gain(m_lo) * dz, 2.0 * math.sqrt(ball.positions))
    dg = min(slope_sup(m_lo) * dz, vec_norm(gain_map(m_lo_map) - gain_map(m_hi_map)))
    return dh, dg


def is_vector_network(layers: list[Layer]) -> bool:
    """Every space a vector (an MLP): where the case-split and split-chain refinements apply."""
    return all(not layer.geometry.in_spatial and not layer.geometry.out_spatial for layer in layers)


def certified_bound(layers: list[Layer], removed: list[torch.Tensor], consts: list[torch.Tensor], radius: float,
                    symbolic: bool = True) -> dict:
    """A proven upper bound on |y' − y| for every |x| ≤ radius (docs/bounds.md, Theorem). `layers`: the full-width
    network in the final bases; `removed[i]`/`consts[i]`: mask and constants of hidden space i. The smallest of the
    layer-by-layer chain (§3; on maps, "Convolutional layers"), and for MLPs the case-split symbolic bound (§4) and the
    split chain (§4c); all are proven, so their minimum is too."""
    chain = chain_bound(layers, removed, consts, radius)
    if not any(bool(m.any()) for m in removed) or not is_vector_network(layers):
        return chain
    out = chain
    sym = symbolic_bound(layers, removed, consts, radius) if symbolic else None
    if sym is not None:
        out = _tighter(out, sym, "case-split symbolic")
        out.update(symbolic_bound=sym["bound"], cases=sym["cases"])
    split = split_chain_bound(layers, removed, consts, radius, intro=None if sym is None else sym["introduced"])
    out = _tighter(out, split, "split chain")
    out["split_bound"] = split["bound"]
    return out


def chain_bound(layers: list[Layer], removed: list[torch.Tensor], consts: list[torch.Tensor], radius: float) -> dict:
    """The layer-by-layer chain (§3): the introduced error of each hidden space and its propagation."""
    balls = reachable_balls(layers, radius)
    dh = dg = 0.0
    introduced, after = [], []
    for i, layer in enumerate(layers):
        last = i == len(layers) - 1
        mask = torch.zeros(layer.n_out, dtype=torch.bool) if last else removed[i]
        c_h, r_h, g_mid, g_half = _input_ball(balls, i, radius, layer)
        e = 0.0 if last else introduced_error(layer, mask, consts[i], c_h, r_h, g_mid, g_half)
        a = propagated_error(layer, ~mask, dh, dg) if i > 0 else 0.0
        dz = math.hypot(a, e)  # kept and removed coordinates are orthogonal
        introduced.append(e)
        after.append(dz)
        if last:
            break
        dh, dg = activation_error(balls[i], dz)
    return {"bound": after[-1], "radius": float(radius), "introduced": introduced[:-1], "after_layer": after,
            "chain_bound": after[-1], "method": "chain"}


def _tighter(out: dict, other: dict, method: str) -> dict:
    """Per-layer and output minimum of two proven bounds."""
    out = dict(out)
    out["introduced"] = [min(p, q) for p, q in zip(out["introduced"], other["introduced"])]
    out["after_layer"] = [min(p, q) for p, q in zip(out["after_layer"], other["after_layer"])]
    if other["bound"] < out["bound"]:
        out.update(bound=other["bound"], method=method)
    return out


# --- empirical measures (docs/math.md, "Measures the paper reports") --------------------------------------------------
def empirical_errors(y: torch.Tensor, y_pruned: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
    y, y_pruned = y.to(F64), y_pruned.to(F64)
    diff = torch.linalg.vector_norm(y_pruned - y, dim=-1)
    scale = torch.linalg.vector_norm(y, dim=-1).clamp_min(torch.finfo(F64).tiny)
    out = {
        "n_inputs": int(y.shape[0]),
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "mean_rel_percent": float(100.0 * (diff / scale).mean()),
    }
    if y.shape[-1] >= 2:
        logp, logq = torch.log_softmax(y, -1), torch.log_softmax(y_pruned, -1)
        out["kl_mean"] = float((logp.exp() * (logp - logq)).sum(-1).mean())
        out["top1_agreement"] = float((y.argmax(-1) == y_pruned.argmax(-1)).double().mean())
        if labels is not None:
            labels = labels.reshape(-1).to(torch.long)
            out["accuracy_before"] = float((y.argmax(-1) == labels).double().mean())
            out["accuracy_after"] = float((y_pruned.argmax(-1) == labels).double().mean())
    return out


SCREEN_PER_RESTART = 32  # random points evaluated (forward only) per restart to pick the screened starts
# The search's effort is capped in flops (issue 12): one Adam step costs ≈ 6 flops per parameter of both networks per
# point (forward and backward), so on a big network the asked-for restarts × steps are cut, steps first (down to
# SEARCH_MIN_STEPS), then restarts (down to SEARCH_MIN_RESTARTS). The cap keeps every shipped model's default effort.
SEARCH_WORK = 4e10
SEARCH_MIN_STEPS, SEARCH_MIN_RESTARTS = 50, 8


def network_params(net) -> int:
    return sum(l.num_params() for l in net.layers) if hasattr(net, "layers") else 0


def search_effort(params: int, restarts: int, steps: int, extra_starts: int, max_work: float = SEARCH_WORK):
    """(restarts, steps) with cost(restarts, steps) ≤ max_work where possible, cutting steps first, then restarts;
    cost = params·(6·steps·(2·restarts + extra_starts) + 2·SCREEN_PER_RESTART·restarts)."""
    def cost(r: int, s: int) -> float:
        return params * (6.0 * s * (2 * r + extra_starts) + 2.0 * SCREEN_PER_RESTART * r)

    if cost(restarts, steps) <= max_work:
        return restarts, steps
    min_steps = min(steps, SEARCH_MIN_STEPS)
    per_step = cost(restarts, 1) - cost(restarts, 0)
    steps_fit = int((max_work - cost(restarts, 0)) // per_step) if per_step > 0 else steps
    if steps_fit >= min_steps:
        return restarts, steps_fit
    per_restart = params * (12.0 * min_steps + 2.0 * SCREEN_PER_RESTART)
    fit = int((max_work - params * 6.0 * min_steps * extra_starts) // per_restart) if per_restart > 0 else restarts
    return max(min(restarts, fit), min(restarts, SEARCH_MIN_RESTARTS)), min_steps


def adversarial_search(reference, candidate, radius: float, starts: torch.Tensor | None = None, restarts: int = 64,
                       steps: int = 200, seed: int = 0, lr: float = 0.05, verify=None,
                       max_work: float = SEARCH_WORK) -> dict:
    """The largest |y' − y| found inside |x| ≤ radius: Adam ascent (float64, step lr·R with cosine decay, projected
    onto the ball after every step) from the given starts, the point where the first layer's pre-activation is
    smallest (both networks nearly linear there, where gains are largest), ± R times the first layer's top right
    singular vectors, and random points on and inside the sphere. Every value reported was evaluated by the torch
    forward at a point of the domain; it is a lower bound on the true maximum. `verify`: the network the reported
    value is measured against at the winning point (when `reference` is a cheaper exact equivalent of it). The effort
    is cut to about max_work flops on big networks (search_effort; the result says "effort_cut")."""
    extra = 9 + (0 if starts is None else len(starts))
    asked = (restarts, steps)
    restarts, steps = search_effort(network_params(reference) + network_params(candidate), restarts, steps, extra,
                                    max_work)
    gen = torch.Generator().manual_seed(seed)
    shape = input_shape(reference)
    reference, candidate, verify = (None if net is None else on_flat_inputs(net, shape)
                                    for net in (reference, candidate, verify))
    width = math.prod(shape)
    rand = _random_in_ball(gen, restarts, width, radius)
    # screening, all norms from 0 to R: the best of many cheap forward evaluations are better starts than blind ones
    # (the landscape is flat where the networks saturate, and the maximum may lie deep inside the ball)
    screen = _random_in_ball(gen, SCREEN_PER_RESTART * restarts, width, radius, min_fraction=0.0)
    screened = screen[_difference(reference, candidate, screen).topk(min(restarts, len(screen))).indices]
    pieces = [first_layer_starts(reference.layers[0], radius), screened, rand]
    if starts is not None:
        pieces.insert(0, starts.to(F64).reshape(len(starts), -1))
    x0 = _project(torch.cat(pieces), radius)
    best, best_x = _difference(reference, candidate, x0), x0.clone()
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr * radius)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    for _ in range(steps):
        d = torch.linalg.vector_norm(candidate(x) - reference(x), dim=-1)
        with torch.no_grad():
            better = d > best
            best = torch.where(better, d, best)
            best_x[better] = x[better]
        opt.zero_grad()
        (-d.sum()).backward()
        opt.step()
        schedule.step()
        with torch.no_grad():
            x.copy_(_project(x, radius))
    d = _difference(reference, candidate, x.detach())
    better = d > best
    best = torch.where(better, d, best)
    best_x[better] = x.detach()[better]
    i = int(best.argmax())
    # re-evaluate the winner on its own, so the number reported is exactly the forward at that point
    value = float(_difference(verify if verify is not None else reference, candidate, best_x[i:i + 1])[0])
    return {"max_abs": value, "x_norm": float(best_x[i].norm()), "starts": int(x0.shape[0]), "steps": steps,
            "effort_cut": (restarts, steps) != asked}


def input_shape(net) -> tuple[int, ...]:
    return tuple(net.input_shape) if hasattr(net, "input_shape") else (net.layers[0].n_in,)


class on_flat_inputs:
    """A network called on flattened inputs (N × prod(shape)): the search works in the flat input space, a CNN
    reads its maps."""

    def __init__(self, net, shape: tuple[int, ...]):
        self.net, self.shape, self.layers = net, shape, net.layers

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x.reshape(x.shape[0], *self.shape) if len(self.shape) > 1 else x)
        return y.reshape(y.shape[0], -1)


def first_layer_starts(first: Layer, radius: float) -> torch.Tensor:
    """The point where a dense first layer's pre-activation is smallest (both networks nearly linear there, where gains
    are largest) and ± R times its top right singular vectors; none for a convolution (its operator is not its matrix)."""
    if first.geometry.in_spatial:
        return torch.zeros(0, first.n_in * first.geometry.in_positions, dtype=F64)
    w = first.dense_weight().to(F64)
    _, _, vh = torch.linalg.svd(w, full_matrices=False)
    centre = -(torch.linalg.pinv(w) @ first.bias.to(F64))
    return torch.cat([centre[None], radius * vh[:4], -radius * vh[:4]])


def _random_in_ball(gen: torch.Generator, n: int, n_in: int, radius: float, min_fraction: float = 0.5) -> torch.Tensor:
    """n random points: uniformly random directions, norms R·max(sqrt(u), min_fraction) with u uniform in [0, 1]."""
    x = torch.randn(n, n_in, dtype=F64, generator=gen)
    x = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x * radius * torch.rand(n, 1, dtype=F64, generator=gen).sqrt().clamp_min(min_fraction)


def _project(x: torch.Tensor, radius: float) -> torch.Tensor:
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x * torch.clamp(radius / norm.clamp_min(1e-300), max=1.0)


@torch.no_grad()
def _difference(reference, candidate, x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(candidate(x) - reference(x), dim=-1)


# --- case-split symbolic propagation (docs/bounds.md, §4) ---------------------------------------------------------
# A set of vectors is kept as a `Form`: base + Σ_G λ_G · group_G, where base and every group are affine "zonotopes
# with ball generators" {A x + a + Σ_k N_k η_k : |x| ≤ R, |η_k| ≤ 1}, and each λ_G ∈ [−1, 1] is an unknown scalar
# (a product of the scalar multipliers of the activations it passed, see `times`). Generator keys k and group keys G
# name functions of x; they are shared between the original network's forward form and the error form, so equal keys'
# coefficients add before any norm is taken (an identity, not an estimate).
@dataclass
class Affine:
    A: torch.Tensor  # n × n_0
    a: torch.Tensor  # n
    N: dict  # generator key → n × d

    def map(self, m: torch.Tensor) -> "Affine":
        return Affine(m @ self.A, m @ self.a, {k: m @ v for k, v in self.N.items()})

    def rows(self, idx: torch.Tensor) -> "Affine":
        return Affine(self.A[idx], self.a[idx], {k: v[idx] for k, v in self.N.items()})

    def scale(self, s: float) -> "Affine":
        return Affine(s * self.A, s * self.a, {k: s * v for k, v in self.N.items()})

    def plus(self, other: "Affine", sign: float = 1.0) -> "Affine":
        n = dict(self.N)
        for k, v in other.N.items():
            n[k] = n[k] + sign * v if k in n else sign * v
        return Affine(self.A + sign * other.A, self.a + sign * other.a, n)

    def bound(self, dom: "Domain") -> float:
        """sup |A u + a + Σ N_k η_k| over u = z_1 = W_1 x + b_1 with |x| ≤ R and |u| ≤ dom.u_max (Lemma 6)."""
        noise = sum(_norm(v) for v in self.N.values())
        via_x = spectral_norm(self.A @ dom.w) * dom.radius + vec_norm(self.A @ dom.b + self.a)
        if dom.u_max < math.inf:
            via_x = min(via_x, spectral_norm(self.A) * dom.u_max + vec_norm(self.a))
        return via_x + noise

    def off_centre(self, dom: "Domain") -> tuple[torch.Tensor, float]:
        """(centre, r) with |v − centre| ≤ r for every v of the set: centre = A b_1 + a."""
        noise = sum(_norm(v) for v in self.N.values())
        return self.A @ dom.b + self.a, spectral_norm(self.A @ dom.w) * dom.radius + noise


@dataclass(frozen=True)
class Domain:
    """The first layer's pre-activation u = w x + b over |x| ≤ radius, with the case's |u| ≤ u_max."""

    w: torch.Tensor
    b: torch.Tensor
    radius: float
    u_max: float = math.inf


def _norm(v: torch.Tensor) -> float:
    return vec_norm(v) if v.shape[-1] == 1 else spectral_norm(v)


@dataclass
class Form:
    base: Affine
    groups: dict  # tuple of scalar-multiplier keys → Affine

    @staticmethod
    def zero(n: int, n0: int) -> "Form":
        return Form(Affine(torch.zeros(n, n0, dtype=F64), torch.zeros(n, dtype=F64), {}), {})

    def _each(self, fn) -> "Form":
        return Form(fn(self.base), {k: fn(v) for k, v in self.groups.items()})

    def map(self, m):
        return self._each(lambda f: f.map(m))

    def rows(self, idx):
        return self._each(lambda f: f.rows(idx))

    def scale(self, s: float):
        return self._each(lambda f: f.scale(s))

    def plus(self, other: "Form", sign: float = 1.0) -> "Form":
        groups = dict(self.groups)
        for k, v in other.groups.items():
            groups[k] = groups[k].plus(v, sign) if k in groups else v.scale(sign)
        return Form(self.base.plus(other.base, sign), groups)

    def times(self, mid: float, half: float, key) -> "Form":
        """The set s·v for s ∈ [mid − half, mid + half] and v in this form: s·v = mid·v + λ·half·v with λ ∈ [−1, 1]."""
        out = self.scale(mid)
        if half > 0:
            out.groups[(key,)] = self.base.scale(half)
            for k, v in self.groups.items():
                out.groups[k + (key,)] = v.scale(half)
        return out

    def bound(self, dom: Domain) -> float:
        """sup |v| over the set."""
        return self.base.bound(dom) + sum(v.bound(dom) for v in self.groups.values())

    def norm_range(self, dom: Domain) -> tuple[float, float]:
        """An interval containing |v| for every v of the set."""
        centre, r = self.base.off_centre(dom)
        r += sum(v.bound(dom) for v in self.groups.values())
        return max(0.0, vec_norm(centre) - r), self.bound(dom)


def _m(o: float, t: float) -> float:
    return math.sqrt(o + t * t)


def radial_deficit(o: float, t_lo: float, t_hi: float) -> float:
    """sup of g(m) − ρ over t_lo ≤ |z| ≤ t_hi, where ρ = g + g'(m)|z|²/m is the radial eigenvalue of J_f (Lemma 4):
    g − ρ = |g'(m)| t²/m ≤ sup|g'|(m ≥ m_lo) · t_hi²/m_hi, and g − ρ ≤ g(m_lo) − sech²(m_hi)."""
    m_lo, m_hi = _m(o, t_lo), _m(o, t_hi)
    first = slope_sup(m_lo) * t_hi * t_hi / m_hi if m_hi > 0 else 0.0
    second = gain(m_lo) - 1.0 / math.cosh(min(m_hi, 300.0)) ** 2
    return max(0.0, min(first, second))


def bin_edges(t_lo: float, t_hi: float, first: float, ratio: float) -> list[float]:
    """Cover [t_lo, t_hi] by intervals with edges first·ratio^k: narrow where g varies, wide where it is flat."""
    edges = [t_lo]
    e = first
    while e < t_hi:
        if e > t_lo:
            edges.append(e)
        e *= ratio
    edges.append(t_hi)
    return edges


# Work control (issue 12): the case split multiplies cases by the shells of every hidden space and doubles a form's
# groups at every activation, so its cost grows exponentially with depth and as width³. Every operation is charged
# (in flops, from the operands' shapes) *before* it runs; when the total would pass the limit the symbolic bound is
# abandoned and certified_bound keeps the chain and split chain (proven on their own: skipping a bound is sound).
SYMBOLIC_WORK_FACTOR = 4.0  # × exact_work(layers): about the flops of the exact shrink's SVDs
SYMBOLIC_WORK_FLOOR = 6e9  # flops always allowed (the shipped models use ≤ 2.9e9 in their recipes)


class WorkLimitExceeded(Exception):
    """Raised by Work.charge when an operation would pass the limit."""


@dataclass
class Work:
    """A flop counter with a limit."""

    limit: float
    used: float = 0.0

    def charge(self, flops: float) -> None:
        if self.used + flops > self.limit:
            raise WorkLimitExceeded
        self.used += flops


def exact_work(layers: list[Layer]) -> float:
    """Σ n_out·n_in·min(n_out, n_in) over the weight layers: the scale of one SVD of every weight (what an exact
    shrink costs), the unit of the work limits of the symbolic bound and the adversarial search."""
    return float(sum(l.n_out * l.n_in * min(l.n_out, l.n_in) for l in layers))


def _spec_cost(rows: int, cols: int) -> float:
    k = min(rows, cols)
    return float(rows * cols * k + k ** 3)


def _affines(form: Form) -> list[Affine]:
    return [form.base, *form.groups.values()]


def _map_cost(form: Form, out_rows: int) -> float:
    rows = form.base.A.shape[0]
    return float(out_rows * rows * sum(f.A.shape[1] + 1 + sum(v.shape[1] for v in f.N.values()) for f in _affines(form)))


def _bound_cost(form: Form, dom: Domain) -> float:
    rows, (n0, n_in) = form.base.A.shape[0], dom.w.shape
    per = rows * n0 * n_in + _spec_cost(rows, n_in) + _spec_cost(rows, n0)
    return float(sum(per + sum(_spec_cost(rows, v.shape[1]) for v in f.N.values()) for f in _affines(form)))


def _mask_rows(form: Form, mask: torch.Tensor) -> Form:
    """diag(mask)·v for every v of the form (rows outside the mask set to zero; the same numbers as the product)."""
    keep = mask.to(F64)
    return form._each(lambda f: Affine(keep[:, None] * f.A, keep * f.a, {k: keep[:, None] * v for k, v in f.N.items()}))


def symbolic_bound(layers: list[Layer], removed: list[torch.Tensor], consts: list[torch.Tensor], radius: float,
                   first: float = 0.5, ratio: float = 2.0, max_cases: int = 1500,
                   work_limit: float | None = None) -> dict | None:
    """Case-split symbolic bound on |y' − y| for |x| ≤ radius (docs/bounds.md, §4). Returns {"bound",
    "introduced", "after_layer", "cases", "work"} (maxima over the cases) or None when there would be more than
    max_cases cases or more than work_limit flops [default: max(SYMBOLIC_WORK_FLOOR, SYMBOLIC_WORK_FACTOR ×
    exact_work(layers))]."""
    if len(layers) < 2:
        return None
    if work_limit is None:
        work_limit = max(SYMBOLIC_WORK_FLOOR, SYMBOLIC_WORK_FACTOR * exact_work(layers))
    try:
        return _CaseSplit(layers, removed, consts, radius, first, ratio, max_cases, Work(work_limit)).run()
    except WorkLimitExceeded:
        return None


class _CaseSplit:
    """The recursion of symbolic_bound: one hidden space per level, one shell of |z_l| per branch."""

    def __init__(self, layers, removed, consts, radius, first, ratio, max_cases, work: Work):
        self.layers, self.removed, self.consts = layers, removed, consts
        self.first, self.ratio, self.max_cases, self.work = first, ratio, max_cases, work
        self.n0 = layers[0].n_out  # forms are affine in u = z_1 (Domain)
        self.n_hidden = len(layers) - 1
        self.best = {"bound": 0.0, "introduced": [0.0] * self.n_hidden, "after_layer": [0.0] * (self.n_hidden + 1),
                     "cases": 0}
        self.counter = 0
        self.cases = 0
        masks = [removed[i] if i < self.n_hidden else torch.zeros(l.n_out, dtype=torch.bool)
                 for i, l in enumerate(layers)]
        for l, m in zip(layers, masks):
            work.charge(2 * _spec_cost(l.n_out, l.n_in))
        self.masks = masks
        self.norms = [spectral_norm(l.dense_weight()) for l in layers]
        self.kept_norms = [spectral_norm(l.dense_weight()[~m]) for l, m in zip(layers, masks)]
        self.kept_psi = [0.0 if l.psi is None else vec_norm(l.psi[~m]) for l, m in zip(layers, masks)]
        self.full = Domain(layers[0].dense_weight(), layers[0].bias, float(radius))

    def key(self) -> int:
        self.counter += 1
        return self.counter

    def bound(self, form: Form, dom: Domain) -> float:
        self.work.charge(_bound_cost(form, dom))
        return form.bound(dom)

    def iso(self, n: int, size: float) -> Form:
        f = Form.zero(n, self.n0)
        if size > 0:
            f.base.N[self.key()] = size * torch.eye(n, dtype=F64)
        return f

    def forward(self, i: int, h: Form, g_mid: float, g_half: float) -> Form:
        """z_i = W h + b + psi g, with g ∈ [g_mid ± g_half]."""
        layer = self.layers[i]
        self.work.charge(_map_cost(h, layer.n_out))
        z = h.map(layer.dense_weight())
        z.base.a = z.base.a + layer.bias
        if layer.psi is not None:
            z.base.a = z.base.a + layer.psi * g_mid
            if g_half > 0:
                z.base.N[self.key()] = (layer.psi * g_half)[:, None]
        return z

    def introduced(self, i: int, z: Form) -> Form | None:
        """P_S z_i − c (rows S only), or None when nothing is removed there."""
        if i == self.n_hidden or not bool(self.removed[i].any()):
            return None
        idx = self.removed[i].nonzero().flatten()
        e = z.rows(idx)
        e.base.a = e.base.a - self.consts[i][idx]
        return e

    def error(self, i: int, z: Form, dh: Form | None, dg: float) -> Form:
        """Δz_i = P_K(W Δh + psi Δg) − P_S(z_i − c) (docs/bounds.md, eq. 2)."""
        layer, mask = self.layers[i], self.masks[i]
        keep = (~mask).to(F64)
        if dh is None:
            d = Form.zero(layer.n_out, self.n0)
        else:
            self.work.charge(_map_cost(dh, layer.n_out))
            d = dh.map(keep[:, None] * layer.dense_weight())
        if dh is not None and layer.psi is not None and dg > 0:
            d.base.N[self.key()] = (keep * layer.psi * dg)[:, None]
        if bool(mask.any()):
            e = _mask_rows(z, mask)
            e.base.a = e.base.a - mask.to(F64) * self.consts[i]
            d = d.plus(e, -1.0)
        return d

    def run(self) -> dict | None:
        z0 = Form(Affine(torch.eye(self.n0, dtype=F64), torch.zeros(self.n0, dtype=F64), {}), {})  # z_1 = u
        e0 = self.introduced(0, z0)
        e0b = 0.0 if e0 is None else self.bound(e0, self.full)
        if not self.walk(0, z0, self.error(0, z0, None, 0.0), [e0b], [], self.full, math.inf, e0b):
            return None
        self.best["cases"] = self.cases
        self.best["work"] = self.work.used
        return self.best

    def walk(self, i: int, z: Form, dz: Form, intro: list[float], after: list[float], dom: Domain, z_cap: float,
             err_cap: float) -> bool:
        """z_cap, err_cap: case-wise ball bounds on |z_i| and |Δz_i| (the chain of §3 restricted to the case).
        False when the cases ran out."""
        self.work.charge(2 * _bound_cost(z, dom))
        t_lo, t_hi = z.norm_range(dom)
        edges = bin_edges(t_lo, min(t_hi, z_cap), self.first, self.ratio)
        for lo, hi in zip(edges[:-1], edges[1:]):
            if not self.case(i, lo, hi, z, dz, intro, after, dom, err_cap):
                return False
        return True

    def case(self, i: int, lo: float, hi: float, z: Form, dz: Form, intro, after, dom: Domain, err_cap: float) -> bool:
        """One shell lo ≤ |z_i| ≤ hi. In the first hidden space that bounds u = z_1 itself."""
        o, n = float(self.layers[i].o), self.layers[i].n_out
        cdom = replace(dom, u_max=hi) if i == 0 else dom
        b_err = min(self.bound(dz, cdom), err_cap)
        # forward: h = s z with s = g(m) ∈ [g(m_hi), g(m_lo)] (Lemma 5)
        g_a, g_b = gain(_m(o, lo)), gain(_m(o, hi))
        self.work.charge(2 * _map_cost(z, 1) + 2 * _map_cost(dz, 1))
        h = z.times((g_a + g_b) / 2.0, (g_a - g_b) / 2.0, self.key())
        # error: Δh = J̄ Δz with J̄ = γ I − Q, γ ∈ [g(m_hi'), g(m_lo')], Q ⪰ 0, ‖Q‖ ≤ q on the widened shell
        lo_w, hi_w = max(0.0, lo - b_err), hi + b_err
        ga_w, gb_w = gain(_m(o, lo_w)), gain(_m(o, hi_w))
        if ga_w * b_err >= 2.0:
            dh = self.iso(n, 2.0)
        else:
            dh = dz.times((ga_w + gb_w) / 2.0, (ga_w - gb_w) / 2.0, self.key())
            dh = dh.plus(self.iso(n, radial_deficit(o, lo_w, hi_w) * b_err))
        dg = min(slope_sup(_m(o, lo_w)) * b_err, ga_w - gb_w)
        z_next = self.forward(i + 1, h, (g_a + g_b) / 2.0, (g_a - g_b) / 2.0)
        e = self.introduced(i + 1, z_next)
        e_bound = 0.0 if e is None else self.bound(e, cdom)
        last = i + 1 == self.n_hidden
        intro_next = intro + ([] if last else [e_bound])
        dz_next = self.error(i + 1, z_next, dh, dg)
        nxt = self.layers[i + 1]
        h_max = min(gain(_m(o, hi)) * hi, 1.0)  # |h| = φ(|z|) is increasing in |z| (Lemma 5)
        const = nxt.bias if nxt.psi is None else nxt.bias + nxt.psi * (g_a + g_b) / 2.0
        z_cap_next = self.norms[i + 1] * h_max + vec_norm(const) + vec_norm(nxt.psi) * (g_a - g_b) / 2.0
        a_cap = self.kept_norms[i + 1] * min(ga_w * b_err, 2.0) + self.kept_psi[i + 1] * dg
        err_cap_next = math.hypot(a_cap, e_bound)
        if last:
            return self.leaf(cdom, dz_next, err_cap_next, intro_next, after + [b_err])
        return self.walk(i + 1, z_next, dz_next, intro_next, after + [b_err], cdom, z_cap_next, err_cap_next)

    def leaf(self, cdom: Domain, dz_out: Form, err_cap: float, intro: list[float], after: list[float]) -> bool:
        self.cases += 1
        if self.cases > self.max_cases:
            return False
        bound = min(self.bound(dz_out, cdom), err_cap)
        best = self.best
        best["bound"] = max(best["bound"], bound)
        best["introduced"] = [max(p, q) for p, q in zip(best["introduced"], intro)]
        best["after_layer"] = [max(p, q) for p, q in zip(best["after_layer"], after + [bound])]
        return True


# --- split chain (docs/bounds.md, §4c) ----------------------------------------------------------------------------
# Per hidden space the error is split into its kept part (|Δz_K| ≤ a) and its removed part (Δz_S = c − P_S z,
# |Δz_S| ≤ e); the activation is crossed through the intermediate point z̃ = (z_K, c), case-split on |z| into fine
# shells. Every step needs only global (sup over the domain) numbers of the previous hidden space, so shells do not
# nest and cost a few scalar operations each.
SPLIT_FIRST, SPLIT_RATIO = 0.05, 1.05  # shell edges 0.05·1.05^k


def gain_sq_slope(m: float) -> float:
    """sup over m' ≥ m of |dg/d(m'²)| = |g'(m')|/(2m'): decreasing in m, 1/3 at m = 0 (docs/bounds.md, Lemma 7)."""
    if m < 0.05:
        return 1.0 / 3.0
    return gain_slope(m) / (2.0 * m) * (1.0 + 1e-9)


@dataclass(frozen=True)
class PreAct:
    """A superset of the pre-activations of one hidden space of the original network: z = M x + centre over
    |x| ≤ rho (M = None: the identity), and that space's o."""

    M: torch.Tensor | None
    centre: torch.Tensor
    rho: float
    o: float

    def spread(self, a: torch.Tensor) -> float:
        """sup |a (z − centre)| over the set."""
        return spectral_norm(a if self.M is None else a @ self.M) * self.rho

    def shells(self, first: float, ratio: float) -> list[tuple[float, float]]:
        """Intervals [lo, hi] covering the range of |z| over the set."""
        r = self.rho if self.M is None else spectral_norm(self.M) * self.rho
        c = vec_norm(self.centre)
        edges = bin_edges(max(0.0, c - r), c + r, first, ratio)
        return list(zip(edges[:-1], edges[1:]))


def pre_activations(layers: list[Layer], balls: list[Ball], radius: float) -> list[PreAct]:
    """Hidden space 0 exactly as the affine image of the input ball; later ones as the balls of Lemma 3."""
    first = PreAct(layers[0].dense_weight(), layers[0].bias, float(radius), float(layers[0].o))
    return [first] + [PreAct(None, b.z_center, b.z_radius, b.o) for b in balls[1:]]


def shell_introduced(layer: Layer, mask: torch.Tensor, consts: torch.Tensor, src: PreAct,
                     first: float = SPLIT_FIRST, ratio: float = SPLIT_RATIO) -> float:
    """sup |P_S z − c| for z = g_prev·(W z_prev + psi) + b, case-split on |z_prev| (docs/bounds.md, eq. 8)."""
    if not bool(mask.any()):
        return 0.0
    a = layer.dense_weight()[mask]
    psi = torch.zeros(a.shape[0], dtype=F64) if layer.psi is None else layer.psi[mask]
    v0, d = a @ src.centre + psi, layer.bias[mask] - consts[mask]
    spread, near = src.spread(a), spectral_norm(a)
    v_far, n_psi, n_d = spread + vec_norm(v0), vec_norm(psi), vec_norm(d)
    worst = 0.0
    for lo, hi in src.shells(first, ratio):
        s_hi, s_lo = gain(_m(src.o, lo)), gain(_m(src.o, hi))
        mid, half = (s_hi + s_lo) / 2.0, (s_hi - s_lo) / 2.0
        v_max = min(v_far, near * hi + n_psi)
        value = min(mid * spread + vec_norm(mid * v0 + d) + half * v_max, s_hi * v_max + n_d)
        worst = max(worst, value)
    return worst


def split_step(layer: Layer, rows: torch.Tensor, c_norm: float, src: PreAct, a: float, e: float, zeta: float,
               through: float, first: float = SPLIT_FIRST, ratio: float = SPLIT_RATIO) -> float:
    """Bound on |P_rows Δz| of this layer from the previous hidden space's |Δz_K| ≤ a, |Δz_S| ≤ e, |P_S z| ≤ zeta and
    through ≥ sup |P_rows W Δz_S| (docs/bounds.md, eq. 9)."""
    w = layer.dense_weight()[rows]
    psi = torch.zeros(w.shape[0], dtype=F64) if layer.psi is None else layer.psi[rows]
    n_w, n_psi = spectral_norm(w), vec_norm(psi)
    wz_far = src.spread(w) + vec_norm(w @ src.centre + psi)  # sup |P(W z + psi)| over the whole set
    sq = min(e * (2.0 * c_norm + e), max(zeta * zeta - c_norm * c_norm, c_norm * c_norm))  # ≥ ||c|² − |P_S z|²|
    widen, both = a + e, math.hypot(a, e)
    worst = 0.0
    for lo, hi in src.shells(first, ratio):
        m_lo, m_hi = _m(src.o, max(0.0, lo - widen)), _m(src.o, hi + widen)
        g_lo, g_hi = gain(m_lo), gain(m_hi)
        kept = n_w * g_lo * a + n_psi * min(slope_sup(m_lo) * a, g_lo - g_hi)
        delta = min(gain_sq_slope(m_lo) * sq, g_lo - g_hi)
        gone = g_lo * through + delta * min(n_w * hi + n_psi, wz_far)
        whole = n_w * g_lo * both + n_psi * min(slope_sup(m_lo) * both, g_lo - g_hi)  # eqs. 4–5 in the shell
        worst = max(worst, min(kept + gone, whole))
    return worst


def split_chain_bound(layers: list[Layer], removed: list[torch.Tensor], consts: list[torch.Tensor], radius: float,
                      intro: list[float] | None = None) -> dict:
    """Proven bound on |y' − y| for |x| ≤ radius by the split chain (docs/bounds.md, §4c). `intro`: other proven
    bounds on the introduced errors e_l (e.g. the symbolic bound's), used where smaller."""
    balls = reachable_balls(layers, radius)
    srcs = pre_activations(layers, balls, radius)
    n_hidden = len(removed)
    a = e = zeta = 0.0
    introduced, after = [], []
    for i, layer in enumerate(layers):
        last = i == n_hidden
        rows = torch.ones(layer.n_out, dtype=torch.bool) if last else ~removed[i]
        if i > 0:
            gone = removed[i - 1]
            t = layer.dense_weight()[rows][:, gone]
            through = min(spectral_norm(t) * e, _sup_removed(layers, balls, srcs, radius, i - 1, gone, consts[i - 1], t))
            a = split_step(layer, rows, vec_norm(consts[i - 1][gone]), srcs[i - 1], a, e, zeta, through)
        if last:
            return {"bound": a, "introduced": introduced, "after_layer": after + [a]}
        e, zeta = _split_introduced(layers, balls, srcs, removed, consts, radius, i)
        if intro is not None:
            e = min(e, intro[i])
        zeta = min(zeta, e + vec_norm(consts[i][removed[i]]))
        introduced.append(e)
        after.append(math.hypot(a, e))
    raise AssertionError("the loop returns at the output layer")


def _split_introduced(layers, balls, srcs, removed, consts, radius, i: int) -> tuple[float, float]:
    """(sup |P_S z_i − c|, sup |P_S z_i|) over the domain."""
    zero = torch.zeros_like(consts[i])
    return (_sup_removed(layers, balls, srcs, radius, i, removed[i], consts[i]),
            _sup_removed(layers, balls, srcs, radius, i, removed[i], zero))


def _sup_removed(layers, balls, srcs, radius, i: int, mask, consts, t: torch.Tensor | None = None) -> float:
    """sup |T (P_S z_i − c_S)| over the domain (T = the identity when None): the smaller of eq. 3 and eq. 8 applied to
    the layer whose rows are T P_S W_i, T P_S b_i, T P_S psi_i, and the constants T c_S."""
    if not bool(mask.any()):
        return 0.0
    layer = layers[i]
    if t is not None:
        psi = None if layer.psi is None else t @ layer.psi[mask]
        layer = replace(layer.as_dense(), weight=t @ layer.dense_weight()[mask], bias=t @ layer.bias[mask], psi=psi)
        consts, mask = t @ consts[mask], torch.ones(t.shape[0], dtype=torch.bool)
    c_h, r_h, g_mid, g_half = _input_ball(balls, i, radius, layer)
    value = introduced_error(layer, mask, consts, c_h, r_h, g_mid, g_half)
    return value if i == 0 else min(value, shell_introduced(layer, mask, consts, srcs[i - 1]))
