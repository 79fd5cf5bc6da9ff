"""Local certificates (issue 10): for each centre x_i, a proven bound β_i ≥ max |y'(x) − y(x)| over |x − x_i| ≤ ε and
whether the top-1 class of both networks is proven constant (hence equal) on that ball. Derivation: docs/bounds.md, §8.

Pure tensor maths, batched over the centres (no Python loop over points or neurons). The pruned network is read in
its embedded form (docs/bounds.md, §1): the full-width float64 layers in the final bases, the removed-coordinate masks
and their constants.

Every quantity is kept, per centre, as a *form* v(x) = c + A δ + w(x) with δ = x − x_i, |δ| ≤ ε and an unknown
remainder |w(x)| ≤ r: the original's pre-activations and gains, and — separately — the *difference* of the two
networks' pre-activations and gains (they share the input, so the difference is small and its linear part cancels
exactly where the networks agree).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from isocompress.bounds import SLOPE_MAX, SLOPE_PEAK_M, spectral_norm, vec_norm
from isocompress.model import Layer
from isocompress.primitives import isotropic_gain

F64 = torch.float64
SQRT2 = math.sqrt(2.0)
NORM_POWER_STEPS = 3  # ‖A‖₂ ≤ ‖(AᵀA)^(2^k)‖_F^(1/2^(k+1)): at most rank^(1/2^(k+2)) above ‖A‖₂ (1.14× for rank 64; ~1.0x for decaying spectra)
NORM_MARGIN = 1.0 + 1e-9  # rounding of the squarings (relative ~1e-13), generously
SERIES_TERMS = 64  # partial fractions of G''
ROUNDING = 1e-9  # relative allowance for float64 rounding of the forms (centres are exact forwards to ~1e-15)
DEFAULT_RADIUS_FRACTION = 0.01  # --certify-radius default: this share of the median norm of the certified points


# --- scalar functions of μ = m² = o + |z|² (vectorised) -------------------------------------------------------------
def gain_of_sq(mu: torch.Tensor) -> torch.Tensor:
    """G(μ) = g(√μ) = tanh(√μ)/√μ."""
    return isotropic_gain(mu)


def gain_sq_slope_exact(mu: torch.Tensor) -> torch.Tensor:
    """G'(μ) (negative): (m sech² m − tanh m)/(2m³), m = √μ; its series −1/3 + 4μ/15 − 17μ²/105 below μ = 10⁻³."""
    m = mu.clamp_min(1e-3).sqrt()
    value = (m * sech2(m) - torch.tanh(m)) / (2.0 * m ** 3)
    return torch.where(mu < 1e-3, -1.0 / 3.0 + 4.0 * mu / 15.0 - 17.0 * mu * mu / 105.0, value)


def gain_sq_slope_sup(mu: torch.Tensor) -> torch.Tensor:
    """sup over μ' ≥ μ of |G'(μ')| = |G'(μ)| (|G'| decreases: Lemma 7), with a rounding margin; 1/3 near 0."""
    return torch.where(mu < 0.0025, torch.full_like(mu, 1.0 / 3.0), gain_sq_slope_exact(mu).abs() * (1.0 + 1e-9))


def gain_sq_curv_sup(mu: torch.Tensor) -> torch.Tensor:
    """sup over μ' ≥ μ of G''(μ') = G''(μ) = Σ_k 256/((2k+1)²π² + 4μ)³ (decreasing), plus a bound on the tail k ≥ K:
    Σ_{k≥K} 256/((2k+1)π)⁶ ≤ 256/(10 π⁶ (2K−1)⁵) (docs/bounds.md, Lemma 8)."""
    k = torch.arange(SERIES_TERMS, dtype=F64)
    a = ((2 * k + 1) * math.pi) ** 2
    terms = 256.0 / (a[None, :] + 4.0 * mu.reshape(-1, 1)) ** 3
    tail = 256.0 / (10.0 * math.pi ** 6 * (2 * SERIES_TERMS - 1) ** 5)
    return (terms.sum(-1) * (1.0 + 1e-12) + tail).reshape(mu.shape)


def sech2(m: torch.Tensor) -> torch.Tensor:
    e = torch.exp(-2.0 * m)
    return 4.0 * e / (1.0 + e) ** 2


def gain_slope_sup(m: torch.Tensor) -> torch.Tensor:
    """sup over m' ≥ m of |g'(m')| (bounds.slope_sup, vectorised: Lemma 2)."""
    safe = m.clamp_min(SLOPE_PEAK_M)
    slope = (torch.tanh(safe) - safe * sech2(safe)) / safe ** 2
    return torch.where(m <= SLOPE_PEAK_M, torch.full_like(m, SLOPE_MAX), slope * (1.0 + 1e-12))


def second_derivative_sup(o: float, t_lo: torch.Tensor, t_hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_f, L_g): bounds on ‖D²f(u)‖ and ‖∇²g(u)‖ for t_lo ≤ |u| ≤ t_hi (Lemma 8):
    ‖D²f‖ ≤ 6|G'|t + 4G''t³, ‖∇²g‖ ≤ 2|G'| + 4G''t², each factor at its worst end of the shell."""
    mu_lo = o + t_lo * t_lo
    d1, d2 = gain_sq_slope_sup(mu_lo), gain_sq_curv_sup(mu_lo)
    return 6.0 * d1 * t_hi + 4.0 * d2 * t_hi ** 3, 2.0 * d1 + 4.0 * d2 * t_hi * t_hi


# --- batched norms ------------------------------------------------------------------------------------------------
def op_norm_upper(a: torch.Tensor) -> torch.Tensor:
    """Upper bounds on the spectral norms of a batch of matrices (…, n, k): ‖A‖₂^(2p) = ‖(AᵀA)^p‖₂ ≤ ‖(AᵀA)^p‖_F with
    p = 2^NORM_POWER_STEPS, computed by repeated squaring with rescaling (a few batched matmuls instead of an SVD)."""
    if a.shape[-1] == 0 or a.shape[-2] == 0:
        return torch.zeros(a.shape[:-2], dtype=a.dtype)
    gram = a.transpose(-1, -2) @ a if a.shape[-2] >= a.shape[-1] else a @ a.transpose(-1, -2)
    log_scale = torch.zeros(a.shape[:-2], dtype=a.dtype)
    power = 1.0
    for _ in range(NORM_POWER_STEPS):
        s = torch.linalg.matrix_norm(gram).clamp_min(1e-300)
        gram = gram / s[..., None, None]
        log_scale = log_scale + torch.log(s) / power  # ‖A‖² ≤ Π s_j^(1/power_j) · ‖M‖_F^(1/power)
        gram = gram @ gram
        power *= 2.0
    log_norm_sq = log_scale + torch.log(torch.linalg.matrix_norm(gram).clamp_min(1e-300)) / power
    return torch.exp(0.5 * log_norm_sq) * NORM_MARGIN


@dataclass
class Form:
    """Per centre (batch axis 0): v(x) = c + A (x − x_i) + w(x), |w(x)| ≤ r, for |x − x_i| ≤ ε."""

    c: torch.Tensor  # (P, n)
    A: torch.Tensor  # (P, n, n0)
    r: torch.Tensor  # (P,)
    a_norm: torch.Tensor | None = None  # (P,) an upper bound on ‖A‖₂, filled in by `norm`

    def norm(self) -> torch.Tensor:
        if self.a_norm is None:
            self.a_norm = op_norm_upper(self.A)
        return self.a_norm

    def spread(self, eps: float) -> torch.Tensor:
        """sup |v − c| ≤ ‖A‖ε + r."""
        return self.norm() * eps + self.r

    def sup(self, eps: float) -> torch.Tensor:
        """sup |v| ≤ sqrt(|c|² + 2ε|Aᵀc| + ε²‖A‖²) + r (expand |c + Aδ|²)."""
        c2 = (self.c * self.c).sum(-1)
        atc = torch.linalg.vector_norm(torch.einsum("pn,pnk->pk", self.c, self.A), dim=-1)
        return torch.sqrt(c2 + 2.0 * eps * atc + (eps * self.norm()) ** 2) + self.r


@dataclass
class Scalar:
    """Per centre: s(x) = c + a·(x − x_i) + w(x), |w| ≤ r (the gains g and their differences)."""

    c: torch.Tensor  # (P,)
    a: torch.Tensor  # (P, n0)
    r: torch.Tensor  # (P,)

    def sup(self, eps: float) -> torch.Tensor:
        return self.c.abs() + eps * torch.linalg.vector_norm(self.a, dim=-1) + self.r

    def spread(self, eps: float) -> torch.Tensor:
        return eps * torch.linalg.vector_norm(self.a, dim=-1) + self.r


def pick(mask: torch.Tensor, first, second):
    """Per centre, `first` where mask else `second` (both Forms or both Scalars)."""
    m1 = mask.reshape(-1, *([1] * (first.c.dim() - 1)))
    if isinstance(first, Form):
        return Form(torch.where(m1, first.c, second.c), torch.where(mask[:, None, None], first.A, second.A),
                    torch.where(mask, first.r, second.r))
    return Scalar(torch.where(mask, first.c, second.c), torch.where(mask[:, None], first.a, second.a),
                  torch.where(mask, first.r, second.r))


# --- one activation: the original's h, g and the differences Δh, Δg ------------------------------------------------
def jacobian_apply(gc: torch.Tensor, slope: torch.Tensor, c: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """J_f(c) m for a batch: J = g I + 2G'(μ) c cᵀ (m: (P, n) or (P, n, k))."""
    if m.dim() == 2:
        return gc[:, None] * m + (2.0 * slope * (c * m).sum(-1))[:, None] * c
    return gc[:, None, None] * m + (2.0 * slope)[:, None, None] * c[:, :, None] * torch.einsum("pn,pnk->pk", c, m)[:, None, :]


def activation(z: Form, dz: Form, o: float, eps: float) -> tuple[Form, Scalar, Form, Scalar]:
    """h = f(z), g = g(z) of the original and Δh = f(z + Δz) − f(z), Δg likewise, as forms (docs/bounds.md, §8.3)."""
    c = z.c
    cn = torch.linalg.vector_norm(c, dim=-1)
    rz = z.spread(eps)
    t_lo, t_hi = (cn - rz).clamp_min(0.0), cn + rz
    mu_c = o + cn * cn
    gc, slope = gain_of_sq(mu_c), gain_sq_slope_exact(mu_c)
    grad = 2.0 * slope[:, None] * c  # ∇g at c
    lf, lg = second_derivative_sup(o, t_lo, t_hi)
    g_top, g_bot = gain_of_sq(o + t_lo * t_lo), gain_of_sq(o + t_hi * t_hi)
    spec_lo = sech2(torch.sqrt(o + t_hi * t_hi))  # every eigenvalue of J_f on the ball lies in [spec_lo, g_top]
    # h = f(c) + J_c A δ + w: |w| ≤ the Taylor remainder, or ≤ |h − f(c)| + |J_c A δ| (Lemma 1 on the ball)
    h = Form(gc[:, None] * c, jacobian_apply(gc, slope, c, z.A),
             torch.minimum(gc * z.r + torch.minimum(lf * rz * rz / 2.0, (g_top - spec_lo) * rz),
                           g_top * rz + gc * z.norm() * eps))
    # g = g_c + ∇g_c·A δ + w: Taylor remainder, or the interval [g_bot, g_top] plus the linear part
    grad_a = torch.einsum("pn,pnk->pk", grad, z.A)
    lin = eps * torch.linalg.vector_norm(grad_a, dim=-1)
    g = Scalar(gc, grad_a, torch.minimum(torch.linalg.vector_norm(grad, dim=-1) * z.r + lg * rz * rz / 2.0,
                                         torch.maximum(g_top - gc, gc - g_bot) + lin))
    # differences: z and z + Δz lie in B(c, rz + D)
    d = dz.sup(eps)
    wide = rz + d
    w_lo, w_hi = (cn - wide).clamp_min(0.0), cn + wide
    lf_w, lg_w = second_derivative_sup(o, w_lo, w_hi)
    top_w, bot_w = gain_of_sq(o + w_lo * w_lo), gain_of_sq(o + w_hi * w_hi)
    spec_w = sech2(torch.sqrt(o + w_hi * w_hi))
    omega = torch.minimum(lf_w * wide, top_w - spec_w)  # ‖J̄ − J_f(c)‖
    lin_dz = torch.linalg.vector_norm(dz.c, dim=-1) + dz.norm() * eps  # ≥ |d + B δ|
    dh_t = Form(jacobian_apply(gc, slope, c, dz.c), jacobian_apply(gc, slope, c, dz.A),
                torch.minimum(gc * dz.r + omega * d, torch.clamp(top_w * d, max=2.0) + gc * lin_dz))
    kappa = (top_w + spec_w) / 2.0
    dh_m = Form(kappa[:, None] * dz.c, kappa[:, None, None] * dz.A, kappa * dz.r + (top_w - spec_w) / 2.0 * d)
    dh = pick(dh_t.r <= dh_m.r, dh_t, dh_m)  # both keep a linear part; the smaller remainder wins
    dgrad_a = torch.einsum("pn,pnk->pk", grad, dz.A)
    dg_lin = (grad * dz.c).sum(-1).abs() + eps * torch.linalg.vector_norm(dgrad_a, dim=-1)
    dg = Scalar((grad * dz.c).sum(-1), dgrad_a,
                torch.minimum(torch.linalg.vector_norm(grad, dim=-1) * dz.r + lg_w * wide * d,
                              torch.minimum(gain_slope_sup(torch.sqrt(o + w_lo * w_lo)) * d, top_w - bot_w) + dg_lin))
    # exact centre (§8.4): Δh(x) − Δh(x_i) = J(c')(Δz − d) + (J(c') − J(c)) u + R' − R, c' = c + d, u = z − c
    dh_e, dg_e = exact_centre(z, dz, h, grad_a, gc, slope, grad, lf, lg, rz, o, eps)
    dh = pick(dh_e.r < dh.r, dh_e, dh)
    dg = pick(dg_e.r < dg.r, dg_e, dg)
    return h, g, dh, dg


# --- one affine layer ---------------------------------------------------------------------------------------------
def exact_centre(z: Form, dz: Form, h: Form, grad_a, gc, slope, grad, lf, lg, rz, o: float, eps: float):
    """Δh and Δg as forms centred on their exact values at x_i (docs/bounds.md §8.4): remainders of order ε², not of
    order |Δz(x_i)|·ε, which wins where the centres of the two networks are far apart."""
    c = z.c
    c2 = c + dz.c
    n2 = torch.linalg.vector_norm(c2, dim=-1)
    mu2 = o + n2 * n2
    g2, slope2 = gain_of_sq(mu2), gain_sq_slope_exact(mu2)
    grad2 = 2.0 * slope2[:, None] * c2
    ru2 = rz + dz.norm() * eps + dz.r  # sup |z' − c'|
    lf2, lg2 = second_derivative_sup(o, (n2 - ru2).clamp_min(0.0), n2 + ru2)
    # ‖J(c') − J(c)‖ ≤ L_f on the segment [c, c'] × |d| (Lemma 8), and ≤ the spread of their spectra
    cn = torch.linalg.vector_norm(c, dim=-1)
    dn = torch.linalg.vector_norm(dz.c, dim=-1)
    seg_lf, seg_lg = second_derivative_sup(o, (torch.minimum(cn, n2) - dn).clamp_min(0.0), torch.maximum(cn, n2))
    top = gain_of_sq(o + (torch.minimum(cn, n2) - dn).clamp_min(0.0) ** 2)
    low = sech2(torch.sqrt(o + torch.maximum(cn, n2) ** 2))
    jdiff = torch.minimum(seg_lf * dn, top - low)
    quad = (lf * rz * rz + lf2 * ru2 * ru2) / 2.0
    dh = Form(g2[:, None] * c2 - gc[:, None] * c, jacobian_apply(g2, slope2, c2, z.A + dz.A) - h.A,
              g2 * dz.r + jdiff * z.r + quad)
    gdiff = torch.minimum(seg_lg * dn, torch.linalg.vector_norm(grad2 - grad, dim=-1))
    dg = Scalar(g2 - gc, torch.einsum("pn,pnk->pk", grad2, dz.A) + torch.einsum("pn,pnk->pk", grad2 - grad, z.A),
                torch.linalg.vector_norm(grad2, dim=-1) * dz.r + gdiff * z.r + (lg * rz * rz + lg2 * ru2 * ru2) / 2.0)
    return dh, dg


def affine(layer: Layer, h: Form, g: Scalar | None, dh: Form, dg: Scalar | None, removed: torch.Tensor,
           consts: torch.Tensor) -> tuple[Form, Form]:
    """z = W h + b + psi g and Δz = P_K(W Δh + psi Δg) − P_S(z − c) (docs/bounds.md, eq. 2)."""
    w, psi = layer.dense_weight(), layer.psi
    zc = h.c @ w.T + layer.bias
    za = torch.matmul(w, h.A)
    dc = dh.c @ w.T
    da = torch.matmul(w, dh.A)
    keep = ~removed
    wk, ws = w[keep], w[removed]
    zr = spectral_norm(w) * h.r
    kept_r = spectral_norm(wk) * dh.r
    gone_r = spectral_norm(ws) * h.r
    if psi is not None:
        zc = zc + psi[None, :] * g.c[:, None]
        za = za + psi[None, :, None] * g.a[:, None, :]
        dc = dc + psi[None, :] * dg.c[:, None]
        da = da + psi[None, :, None] * dg.a[:, None, :]
        zr = zr + vec_norm(psi) * g.r
        kept_r = kept_r + vec_norm(psi[keep]) * dg.r
        gone_r = gone_r + vec_norm(psi[removed]) * g.r
    sel = removed.to(F64)
    dc = keep.to(F64) * dc - sel * (zc - consts)
    da = keep.to(F64)[None, :, None] * da - sel[None, :, None] * za
    return Form(zc, za, zr), Form(dc, da, torch.hypot(kept_r, gone_r))


# --- the whole network --------------------------------------------------------------------------------------------
def local_bounds(layers: list[Layer], removed: list[torch.Tensor], consts: list[torch.Tensor], centres: torch.Tensor,
                 eps: float, allowance: float = 0.0) -> dict:
    """For every centre x_i (rows of `centres`): β_i ≥ sup |y'(x) − y(x)| over |x − x_i| ≤ ε, and whether the top-1
    class of the original at x_i is proven to be the top-1 of both networks everywhere in that ball (Theorem 4).
    `allowance`: an absolute float64 rounding allowance added to β and subtracted from every margin.
    Returns tensors: bound (P,), top1 (P,) bool, margin_original (P,), margin_pruned (P,) (certified lower bounds on
    the top-1 margins over the ball), top_class (P,)."""
    x = centres.to(F64)
    p = x.shape[0]
    first = layers[0]
    w0 = first.dense_weight()
    n_hidden = len(layers) - 1
    z = Form(x @ w0.T + first.bias, w0.expand(p, *w0.shape), torch.zeros(p, dtype=F64),
             torch.full((p,), spectral_norm(w0), dtype=F64))
    mask0 = removed[0].to(F64)
    dz = Form(-mask0 * (z.c - consts[0]), -mask0[None, :, None] * z.A, torch.zeros(p, dtype=F64),
              torch.full((p,), spectral_norm(w0[removed[0]]), dtype=F64))
    for i in range(1, n_hidden + 1):
        h, g, dh, dg = activation(z, dz, float(layers[i - 1].o), eps)
        last = i == n_hidden
        mask = torch.zeros(layers[i].n_out, dtype=torch.bool) if last else removed[i]
        const = torch.zeros(layers[i].n_out, dtype=F64) if last else consts[i]
        z, dz = affine(layers[i], h, g, dh, dg, mask, const)
    slack = allowance + ROUNDING * (torch.linalg.vector_norm(z.c, dim=-1) + z.spread(eps))
    beta = dz.sup(eps) + slack
    top = z.c.argmax(-1)
    m_orig = margin_lower(z, top, eps) - 2.0 * slack
    pruned = Form(z.c + dz.c, z.A + dz.A, z.r + dz.r)
    m_pruned = margin_lower(pruned, top, eps) - 2.0 * slack
    return {"bound": beta, "top1": (m_orig > 0) & (m_pruned > 0), "margin_original": m_orig,
            "margin_pruned": m_pruned, "top_class": top}


def margin_lower(y: Form, top: torch.Tensor, eps: float) -> torch.Tensor:
    """min over k ≠ top and |δ| ≤ ε of y_top − y_k ≥ (c_top − c_k) − ε|A_top − A_k| − √2 r (|w_top − w_k| ≤ √2|w|)."""
    idx = torch.arange(len(top))
    gap = y.c[idx, top][:, None] - y.c
    slope = torch.linalg.vector_norm(y.A[idx, top][:, None, :] - y.A, dim=-1)
    low = gap - eps * slope - SQRT2 * y.r[:, None]
    low[idx, top] = math.inf
    if low.shape[1] == 1:
        return torch.full((len(top),), math.inf, dtype=F64)
    return low.min(-1).values


# --- the attack (tests and benchmarks): projected gradient ascent inside each ball -----------------------------
def local_search(reference, candidate, centres: torch.Tensor, eps: float, starts: int = 16, steps: int = 100,
                 seed: int = 0) -> dict:
    """The largest |y'(x) − y(x)| found per ball (Adam ascent in float64 from `starts` random points per ball, projected
    onto the ball after every step), and per ball whether some x flips the top-1 of either network away from the
    original's class at the centre. Lower bounds on the true maxima; batched over centres and starts."""
    gen = torch.Generator().manual_seed(seed)
    x0 = centres.to(F64)
    p, n = x0.shape
    with torch.no_grad():
        top = reference(x0).argmax(-1)
    d = torch.randn(starts, p, n, dtype=F64, generator=gen)
    d = d / torch.linalg.vector_norm(d, dim=-1, keepdim=True) * eps * torch.rand(starts, p, 1, dtype=F64, generator=gen)
    if starts >= 4:  # ±ε along the top right singular vector of the Jacobian of y' − y at the centre (first order)
        top_dir = _top_direction(reference, candidate, x0)
        d[0], d[1] = eps * top_dir, -eps * top_dir
    best = torch.zeros(p, dtype=F64)
    flipped = torch.zeros(p, dtype=torch.bool)
    delta = d.clone().requires_grad_(True)
    opt = torch.optim.Adam([delta], lr=0.1 * eps)
    idx = torch.arange(p)
    for step in range(steps + 1):
        xs = (x0[None] + delta).reshape(-1, n)
        y, y2 = reference(xs).reshape(starts, p, -1), candidate(xs).reshape(starts, p, -1)
        diff = torch.linalg.vector_norm(y2 - y, dim=-1)
        with torch.no_grad():
            best = torch.maximum(best, diff.max(0).values)
            flipped |= ((y.argmax(-1) != top[None]) | (y2.argmax(-1) != top[None])).any(0)
        if step == steps:
            break
        # half the starts ascend |Δy|, half descend the smaller of the two networks' top-1 margins
        margin = torch.minimum(_margin(y, top, idx), _margin(y2, top, idx))
        half = starts // 2
        loss = -diff[:half].sum() + margin[half:].sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            norm = torch.linalg.vector_norm(delta, dim=-1, keepdim=True)
            delta.mul_(torch.clamp(eps / norm.clamp_min(1e-300), max=1.0))
    return {"max_abs": best, "flipped": flipped}


def _top_direction(reference, candidate, x0: torch.Tensor) -> torch.Tensor:
    x = x0.clone().requires_grad_(True)
    diff = candidate(x) - reference(x)
    rows = [torch.autograd.grad(diff[:, k].sum(), x, retain_graph=k < diff.shape[1] - 1)[0] for k in range(diff.shape[1])]
    jac = torch.stack(rows, dim=1).detach()  # (P, n_out, n0)
    _, _, vh = torch.linalg.svd(jac, full_matrices=False)
    return vh[:, 0]


def _margin(y: torch.Tensor, top: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    ytop = y[:, idx, top]
    other = y.clone()
    other[:, idx, top] = -math.inf
    return ytop - other.max(-1).values


# --- the refutation (issue 10): a verified point of the ball where the two networks' top-1 classes differ ---------
DISAGREE_STARTS = 8  # per ball: starts × steps of projected Adam descent (and BISECT_STEPS per recorded segment)
DISAGREE_STEPS = 40
BISECT_STEPS = 40
INSIDE = 1.0 - 1e-7  # the search stays in the ball of radius INSIDE·ε: a found point is strictly inside, not on, it
TIE = 1e-9  # a witness needs both top-1 margins > TIE·(1 + max |y| + max |y'|): far above float64 forward rounding


def class_margin(y: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """y_k − max_{j≠k} y_j along the last axis (k has the shape of y without its last axis)."""
    idx = k[..., None]
    return y.gather(-1, idx)[..., 0] - torch.scatter(y, -1, idx, -math.inf).max(-1).values


def verdicts(y: torch.Tensor, y2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: the two top-1 classes and whether they differ *strictly* (both margins above the TIE allowance)."""
    cls, cls2 = y.argmax(-1), y2.argmax(-1)
    tol = TIE * (1.0 + y.abs().amax(-1) + y2.abs().amax(-1))
    strict = (class_margin(y, cls) > tol) & (class_margin(y2, cls2) > tol)
    return cls, cls2, (cls != cls2) & strict


def disagreement_search(reference, candidate, centres: torch.Tensor, eps: float, starts: int = DISAGREE_STARTS,
                        steps: int = DISAGREE_STEPS, seed: int = 0, verify=None) -> dict:
    """Per ball |x − x_i| ≤ ε, look for an x with argmax candidate(x) ≠ argmax reference(x) (docs/bounds.md §8.5).
    Projected Adam descent in float64, batched over balls and starts, on three objectives (a third of the starts
    each): the candidate's margin for the reference's class at x, the reference's margin for the candidate's class,
    and the reference's own margin (its boundary, beside which the disagreement sliver lies); then bisection of every
    segment between two points where the networks agree on different classes. A found point counts only once a plain
    float64 forward of the `verify` pair (default: the searched pair) shows strictly different top-1 classes and
    |x − x_i| ≤ ε: `refuted` is then a proof that top-1 is not unchanged on that ball. Returns refuted (P,) bool,
    counterexample (P, n) (NaN rows where none), distance (P,), classes (P, 2) (−1 where none)."""
    x0 = centres.to(F64)
    p, n = x0.shape
    found, hit = x0.clone(), torch.zeros(p, dtype=torch.bool)
    with torch.no_grad():
        hit |= verdicts(reference(x0), candidate(x0))[2]  # the centre itself
    delta = _disagreement_starts(reference, candidate, x0, eps, starts, torch.Generator().manual_seed(seed))
    segments = _descend(reference, candidate, x0, eps, delta, steps, found, hit)
    _bisect(reference, candidate, segments, found, hit)
    ref, cand = verify if verify is not None else (reference, candidate)
    return _verify(ref, cand, x0, eps, found, hit)


def _disagreement_starts(reference, candidate, x0, eps, starts, gen) -> torch.Tensor:
    """(starts, P, n) offsets inside the ball: random, except the first of each objective, a first-order (Newton)
    step onto that objective's zero set, past it by 5%, clipped to the ball."""
    p, n = x0.shape
    d = torch.randn(starts, p, n, dtype=F64, generator=gen)
    d = d / torch.linalg.vector_norm(d, dim=-1, keepdim=True) * eps * INSIDE * torch.rand(starts, p, 1, dtype=F64,
                                                                                          generator=gen)
    x = x0.clone().requires_grad_(True)
    y, y2 = reference(x), candidate(x)
    cls, cls2 = y.argmax(-1).detach(), y2.argmax(-1).detach()
    for s, m in enumerate((class_margin(y2, cls), class_margin(y, cls2), class_margin(y, cls))[:starts]):
        (grad,) = torch.autograd.grad(m.sum(), x, retain_graph=True)
        step = -(1.05 * m.detach() / (grad * grad).sum(-1).clamp_min(1e-300))[:, None] * grad
        d[s] = _project(torch.nan_to_num(step, nan=0.0, posinf=0.0, neginf=0.0), eps)  # a flat objective: no step
    return d


def _project(delta: torch.Tensor, eps: float) -> torch.Tensor:
    norm = torch.linalg.vector_norm(delta, dim=-1, keepdim=True)
    return delta * torch.clamp(eps * INSIDE / norm.clamp_min(1e-300), max=1.0)


def _record(points: torch.Tensor, balls: torch.Tensor, mask: torch.Tensor, found: torch.Tensor, hit: torch.Tensor):
    """Keep a disagreeing point (rows `mask`) for every ball that has none yet (in place)."""
    new = mask & ~hit[balls]
    found[balls[new]] = points[new]
    hit[balls[new]] = True


def _descend(reference, candidate, x0, eps, d, steps, found, hit) -> list[tuple]:
    """The projected descent; records hits in place and returns the segments (lo, hi, class at lo, ball) between
    two points of one start (or the centre and a point) where the networks agree on different classes."""
    starts, p, n = d.shape
    balls = torch.arange(p).repeat(starts)
    group = (torch.arange(starts) % 3)[:, None].expand(starts, p)
    with torch.no_grad():
        c_cls, c_cls2, _ = verdicts(reference(x0), candidate(x0))
    centre_ok = (c_cls == c_cls2).repeat(starts)
    last, last_cls = x0.repeat(starts, 1), torch.where(centre_ok, c_cls.repeat(starts), -1)
    seg = {"lo": x0.repeat(starts, 1), "hi": x0.repeat(starts, 1), "cls": torch.full((starts * p,), -1),
           "chi": x0.repeat(starts, 1), "cok": torch.zeros(starts * p, dtype=torch.bool)}
    delta = d.clone().requires_grad_(True)
    opt = torch.optim.Adam([delta], lr=0.1 * eps)
    for step in range(steps + 1):
        xs = (x0[None] + delta).reshape(-1, n)
        y, y2 = reference(xs), candidate(xs)
        with torch.no_grad():
            cls, cls2, differ = verdicts(y, y2)
            pts = xs.detach()
            _record(pts, balls, differ, found, hit)
            agree = cls == cls2
            turn = agree & (last_cls >= 0) & (cls != last_cls)
            seg["lo"][turn], seg["hi"][turn], seg["cls"][turn] = last[turn], pts[turn], last_cls[turn]
            far = agree & centre_ok & (cls != c_cls.repeat(starts))
            seg["chi"][far] = pts[far]
            seg["cok"] |= far
            last[agree], last_cls[agree] = pts[agree], cls[agree]
        if step == steps or bool(hit.all()):
            break
        m_cand = class_margin(y2, cls).reshape(starts, p)
        m_ref = class_margin(y, cls2).reshape(starts, p)
        m_own = class_margin(y, cls).reshape(starts, p)
        loss = torch.where(group == 0, m_cand, torch.where(group == 1, m_ref, m_own)).sum()
        opt.zero_grad()
        loss.backward()
        for g in opt.param_groups:
            g["lr"] = eps * (0.01 + 0.09 * (1.0 - step / max(steps, 1)))
        opt.step()
        with torch.no_grad():
            delta.copy_(_project(delta, eps))
    centre = x0.repeat(starts, 1)
    ok = seg["cls"] >= 0
    return [(seg["lo"][ok], seg["hi"][ok], seg["cls"][ok], balls[ok]),
            (centre[seg["cok"]], seg["chi"][seg["cok"]], c_cls.repeat(starts)[seg["cok"]], balls[seg["cok"]])]


def _bisect(reference, candidate, segments, found, hit) -> None:
    """On each segment [lo, hi] (both networks agree: on class k at lo, on another class at hi) bisect, keeping that
    invariant, until a midpoint where they disagree (recorded in place): where the two boundaries cross the segment
    at different points, the bracket closes on the sliver between them."""
    lo = torch.cat([s[0] for s in segments])
    hi, k, balls = (torch.cat([s[i] for s in segments]) for i in (1, 2, 3))
    keep = ~hit[balls]
    lo, hi, k, balls = lo[keep], hi[keep], k[keep], balls[keep]
    with torch.no_grad():
        for _ in range(BISECT_STEPS if len(balls) else 0):
            mid = 0.5 * (lo + hi)
            cls, cls2, differ = verdicts(reference(mid), candidate(mid))
            _record(mid, balls, differ, found, hit)
            to_lo = (cls == cls2) & (cls == k)
            lo = torch.where(to_lo[:, None], mid, lo)
            hi = torch.where((~to_lo & (cls == cls2))[:, None], mid, hi)


def _verify(reference, candidate, x0, eps, found, hit) -> dict:
    """The witnesses, re-checked: a fresh float64 forward of both networks and the ball constraint."""
    p, n = x0.shape
    counter = torch.full((p, n), math.nan, dtype=F64)
    classes = torch.full((p, 2), -1, dtype=torch.long)
    distance = torch.full((p,), math.nan, dtype=F64)
    refuted = torch.zeros(p, dtype=torch.bool)
    idx = hit.nonzero()[:, 0]
    if len(idx):
        with torch.no_grad():
            x = found[idx].to(F64)
            cls, cls2, differ = verdicts(reference(x), candidate(x))
        dist = torch.linalg.vector_norm(x - x0[idx], dim=-1)
        ok = differ & (dist <= eps)
        good = idx[ok]
        refuted[good], counter[good], distance[good] = True, x[ok], dist[ok]
        classes[good] = torch.stack([cls[ok], cls2[ok]], -1)
    return {"refuted": refuted, "counterexample": counter, "distance": distance, "classes": classes}
