"""Pure functions for error bounds and error metrics of a pruned isotropic network (derivation: docs/bounds.md).

A pruned network is described in the *embedded* form: the full-width float64 layers of the unpruned network in the
final bases, a mask of the removed coordinates of every hidden space and the constants that replace them. The pruned
network computes exactly z'_l = P_K(W_l h'_{l-1} + b_l + psi_l g'_{l-1}) + P_S c_l (docs/bounds.md, eq. 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from isocompress.model import Layer
from isocompress.primitives import isotropic_tanh

F64 = torch.float64
# Where |g'(m)| peaks for g(m) = tanh(m)/m, and an upper bound of that peak (0.343419…; docs/bounds.md, Lemma 2).
SLOPE_PEAK_M = 0.9199
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
    """sup over m ≥ m_min of |g'(m)|: |g'| rises up to its peak and falls after it (Lemma 2)."""
    return SLOPE_MAX if m_min <= SLOPE_PEAK_M else gain_slope(m_min)


def spectral_norm(matrix: torch.Tensor) -> float:
    if matrix.numel() == 0:
        return 0.0
    return float(torch.linalg.matrix_norm(matrix.to(F64), ord=2))


def vec_norm(v: torch.Tensor | None) -> float:
    return 0.0 if v is None or v.numel() == 0 else float(torch.linalg.vector_norm(v))


@dataclass(frozen=True)
class Ball:
    """The reachable set of one hidden space of the *original* network: z ∈ B(z_center, z_radius), and what
    follows for h = f(z) ∈ B(h_center, h_radius) and g ∈ [g_mid − g_half, g_mid + g_half]."""

    z_center: torch.Tensor
    z_radius: float
    h_center: torch.Tensor
    h_radius: float
    g_mid: float
    g_half: float
    o: float


def m_range(center_norm: float, radius: float, o: float) -> tuple[float, float]:
    low = max(0.0, center_norm - radius)
    high = center_norm + radius
    return math.sqrt(o + low * low), math.sqrt(o + high * high)


def reachable_balls(layers: list[Layer], radius: float) -> list[Ball]:
    """Balls containing every hidden pre-activation, gain and output of the network for |x| ≤ radius
    (docs/bounds.md, Lemma 3)."""
    balls: list[Ball] = []
    h_center = torch.zeros(layers[0].n_in, dtype=F64)
    h_radius, g_mid, g_half = float(radius), None, 0.0
    for layer in layers[:-1]:
        w = layer.dense_weight()
        z_center = w @ h_center + layer.bias
        z_radius = spectral_norm(w) * h_radius
        if layer.psi is not None:
            z_center = z_center + layer.psi * g_mid
            z_radius += vec_norm(layer.psi) * g_half
        o = float(layer.o)
        m_lo, m_hi = m_range(vec_norm(z_center), z_radius, o)
        h_center, _ = isotropic_tanh(z_center, o)
        h_radius = gain(m_lo) * z_radius  # f is g(m_lo)-Lipschitz on the ball (Lemma 1)
        if vec_norm(h_center) + h_radius > 1.0:  # every hidden output lies in the unit ball
            h_center, h_radius = torch.zeros_like(h_center), 1.0
        g_lo, g_hi = gain(m_hi), gain(m_lo)
        g_mid, g_half = (g_lo + g_hi) / 2.0, (g_hi - g_lo) / 2.0
        balls.append(Ball(z_center, z_radius, h_center, h_radius, g_mid, g_half, o))
    return balls


def _input_ball(balls: list[Ball], i: int, radius: float, n_in: int) -> tuple[torch.Tensor, float, float, float]:
    """(h center, h radius, g mid, g half) of the input of weight layer i."""
    if i == 0:
        return torch.zeros(n_in, dtype=F64), float(radius), 0.0, 0.0
    b = balls[i - 1]
    return b.h_center, b.h_radius, b.g_mid, b.g_half


def introduced_error(layer: Layer, removed: torch.Tensor, consts: torch.Tensor, h_center, h_radius, g_mid, g_half):
    """sup over the reachable inputs of |P_S z − c_S|: the error of replacing the removed coordinates by constants
    (docs/bounds.md, eq. 3)."""
    if not bool(removed.any()):
        return 0.0
    w = layer.dense_weight()[removed]
    offset = w @ h_center + layer.bias[removed] - consts[removed]
    spread_sq = (spectral_norm(w) * h_radius) ** 2
    if layer.psi is not None:
        psi = layer.psi[removed]
        offset = offset + psi * g_mid
        joint = spectral_norm(torch.cat([w, psi[:, None]], dim=1)) * math.hypot(h_radius, g_half)
        return vec_norm(offset) + min(math.sqrt(spread_sq) + vec_norm(psi) * g_half, joint)
    return vec_norm(offset) + math.sqrt(spread_sq)


def propagated_error(layer: Layer, kept: torch.Tensor, dh: float, dg: float) -> float:
    """Bound on |P_K(W Δh + psi Δg)| (docs/bounds.md, eq. 4)."""
    w = layer.dense_weight()[kept]
    if layer.psi is None or dg == 0.0:
        return spectral_norm(w) * dh
    psi = layer.psi[kept]
    separate = spectral_norm(w) * dh + vec_norm(psi) * dg
    joint = spectral_norm(torch.cat([w, psi[:, None]], dim=1)) * math.hypot(dh, dg)
    return min(separate, joint)


def activation_error(ball: Ball, dz: float) -> tuple[float, float]:
    """(|Δh|, |Δg|) bounds from |Δz| ≤ dz: z and z' lie in the ball B(z_center, z_radius + dz), where f is
    g(m_lo)-Lipschitz and z ↦ g is sup|g'|-Lipschitz (Lemmas 1, 2)."""
    m_lo, m_hi = m_range(vec_norm(ball.z_center), ball.z_radius + dz, ball.o)
    dh = min(gain(m_lo) * dz, 2.0)
    dg = min(slope_sup(m_lo) * dz, gain(m_lo) - gain(m_hi))  # g is decreasing in m
    return dh, dg


def certified_bound(layers: list[Layer], removed: list[torch.Tensor], consts: list[torch.Tensor], radius: float) -> dict:
    """A proven upper bound on |y' − y| for every |x| ≤ radius (docs/bounds.md, Theorem). `layers`: the full-width
    network in the final bases; `removed[i]`/`consts[i]`: mask and constants of hidden space i."""
    balls = reachable_balls(layers, radius)
    dh = dg = 0.0
    introduced, after = [], []
    for i, layer in enumerate(layers):
        last = i == len(layers) - 1
        mask = torch.zeros(layer.n_out, dtype=torch.bool) if last else removed[i]
        c_h, r_h, g_mid, g_half = _input_ball(balls, i, radius, layer.n_in)
        e = 0.0 if last else introduced_error(layer, mask, consts[i], c_h, r_h, g_mid, g_half)
        a = propagated_error(layer, ~mask, dh, dg) if i > 0 else 0.0
        dz = math.hypot(a, e)  # kept and removed coordinates are orthogonal
        introduced.append(e)
        after.append(dz)
        if last:
            return {"bound": dz, "radius": float(radius), "introduced": introduced[:-1], "after_layer": after}
        dh, dg = activation_error(balls[i], dz)
    raise AssertionError("unreachable")


# --- empirical measures (MATH.md, "Measures the paper reports") --------------------------------------------------
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


def adversarial_search(reference, candidate, radius: float, starts: torch.Tensor | None = None, restarts: int = 32,
                       steps: int = 60, seed: int = 0) -> dict:
    """The largest |y' − y| found inside |x| ≤ radius: projected normalised gradient ascent (float64) from the given
    starts plus random points on and inside the sphere. A lower bound on the true maximum."""
    gen = torch.Generator().manual_seed(seed)
    n_in = reference.layers[0].n_in
    rand = torch.randn(restarts, n_in, dtype=F64, generator=gen)
    rand = rand / torch.linalg.vector_norm(rand, dim=-1, keepdim=True)
    rand = rand * radius * torch.rand(restarts, 1, dtype=F64, generator=gen).sqrt().clamp_min(0.5)
    x = rand if starts is None else torch.cat([_project(starts.to(F64), radius), rand])
    best, best_x = _difference(reference, candidate, x), x.clone()
    step = 0.1 * radius
    for k in range(steps):
        x = x.detach().requires_grad_(True)
        d = torch.linalg.vector_norm(candidate(x) - reference(x), dim=-1)
        (grad,) = torch.autograd.grad(d.sum(), x)
        with torch.no_grad():
            grad = grad / torch.linalg.vector_norm(grad, dim=-1, keepdim=True).clamp_min(1e-300)
            x = _project(x + step * (1.0 - k / steps) * grad, radius)
            d_new = _difference(reference, candidate, x)
            better = d_new > best
            best = torch.where(better, d_new, best)
            best_x[better] = x[better]
    i = int(best.argmax())
    return {"max_abs": float(best[i]), "x_norm": float(best_x[i].norm()), "starts": int(x.shape[0]), "steps": steps}


def _project(x: torch.Tensor, radius: float) -> torch.Tensor:
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x * torch.clamp(radius / norm.clamp_min(1e-300), max=1.0)


@torch.no_grad()
def _difference(reference, candidate, x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(candidate(x) - reference(x), dim=-1)
