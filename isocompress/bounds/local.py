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

from isocompress.bounds.certified import SLOPE_MAX, SLOPE_PEAK_M, spectral_norm, vec_norm
from isocompress.core.model import Layer
from isocompress.core.primitives import isotropic_gain

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


@dataclass(frozen=True)
class Domain:
    """The input set Δ of the offsets δ = x − x_i, in the coordinates the first layer's A is written in
    (docs/bounds.md §8.6): the ball |δ| ≤ scale (k = 0), or, for a piece of a split ball, the product of the box
    |η_j| ≤ scale (j < k) and the ball |η_{k:}| ≤ scale. `vec` and `mat` bound sup |a·η| and sup |A η| over it."""

    scale: float
    k: int = 0

    def vec(self, a: torch.Tensor) -> torch.Tensor:
        """sup over Δ of |a·η| = scale (Σ_{j<k} |a_j| + |a_{k:}|), for rows a (…, m)."""
        return self.scale * (a[..., : self.k].abs().sum(-1) + torch.linalg.vector_norm(a[..., self.k:], dim=-1))

    def mat(self, a: torch.Tensor) -> torch.Tensor:
        """An upper bound on sup over Δ of |A η|: scale (Σ_{j<k} |A_{:,j}| + ‖A_{:,k:}‖₂), for A (…, n, m)."""
        box = torch.linalg.vector_norm(a[..., : self.k], dim=-2).sum(-1)
        return self.scale * (box + op_norm_upper(a[..., self.k:]))


MAX_MATRIX_TERMS = 4  # matrix terms a Residue carries; older ones are folded into its ball (cost stays linear in depth)


@dataclass
class Residue:
    """The structure of a form's remainder (docs/bounds.md, Lemma 9'): per point and every x in the ball,
    w = Σ_j t_j v_j + Σ_j τ_j V_j δ + w₀ with scalars |t_j| ≤ κ_j, |τ_j| ≤ λ_j (functions of x) and |w₀| ≤ r0.
    A matrix M moves it by at most Σ κ_j|M v_j| + Σ λ_j ε‖M V_j‖ + ‖M‖ r0 — much less than ‖M‖ sup|w| when M's rows
    are nearly orthogonal to the v_j and to the ranges of the V_j, as the removed rows are to the data's directions."""

    vecs: list  # [(v (P, n), kappa (P,))]
    mats: list  # [(V (P, n, n0), lam (P,), an upper bound on sup_{δ∈Δ} |V δ| (P,): `Domain.mat`)]
    r0: torch.Tensor  # (P,)

    def sup(self, eps: Domain) -> torch.Tensor:
        total = self.r0.clone()
        for v, k in self.vecs:
            total = total + k * torch.linalg.vector_norm(v, dim=-1)
        for _, lam, norm in self.mats:
            total = total + lam * norm
        return total

    def dotted_sup(self, a: torch.Tensor, eps: Domain) -> torch.Tensor:
        """A bound on |a·w| for a per-point row a (P, n)."""
        total = torch.linalg.vector_norm(a, dim=-1) * self.r0
        for v, k in self.vecs:
            total = total + k * (a * v).sum(-1).abs()
        for v, lam, _ in self.mats:
            total = total + lam * eps.vec(torch.einsum("pn,pnk->pk", a, v))
        return total

    def mapped(self, m: torch.Tensor, eps: Domain, tight: torch.Tensor | None = None) -> "Residue":
        """M w, exactly in the terms (M v_j, M V_j) and ‖M‖ r0. The norms ‖M V_j‖ are bounded by ‖M‖‖V_j‖, or, for
        `tight` (a mask of M's only nonzero rows: few, the removed ones), computed from those rows."""
        norm_m = spectral_norm(m)
        mats = []
        for v, lam, norm in self.mats:
            mv = torch.matmul(m, v)
            mats.append((mv, lam, norm_m * norm if tight is None else eps.mat(mv[:, tight, :])))
        return Residue([(v @ m.T, k) for v, k in self.vecs], mats, norm_m * self.r0)

    def through_jacobian(self, gc: torch.Tensor, slope: torch.Tensor, c: torch.Tensor) -> "Residue":
        """J_f(c) w (‖J_f(c)‖ = g_c, Lemma 1)."""
        return Residue([(jacobian_apply(gc, slope, c, v), k) for v, k in self.vecs],
                       [(jacobian_apply(gc, slope, c, v), lam, gc * norm) for v, lam, norm in self.mats],
                       gc * self.r0)

    def added(self, other: "Residue", eps: Domain) -> "Residue":
        """The residue of the sum of the two remainders."""
        return self.plus(other.vecs, other.mats, other.r0, eps)

    def plus(self, vecs: list, mats: list, r0: torch.Tensor, eps: Domain) -> "Residue":
        """These terms added; beyond MAX_MATRIX_TERMS the oldest matrix terms are folded into the ball."""
        all_mats, extra = self.mats + mats, self.r0 + r0
        while len(all_mats) > MAX_MATRIX_TERMS:
            _, lam, norm = all_mats.pop(0)
            extra = extra + lam * norm
        return Residue(self.vecs + vecs, all_mats, extra)


def residue_of(form) -> Residue:
    """The form's residue, or the plain ball r as one."""
    return form.res if form.res is not None else Residue([], [], form.r)


def picked_residue(mask: torch.Tensor, first, second, eps: Domain) -> Residue:
    """Per point the residue of `first` where mask, else of `second`: each one's coefficients zeroed where the other
    is chosen (a residue with zero coefficients is still a valid one)."""
    a, b = residue_of(first), residue_of(second)
    zero = torch.zeros_like(a.r0)
    on = lambda terms: [(t[0], torch.where(mask, t[1], zero), *t[2:]) for t in terms]  # noqa: E731
    off = lambda terms: [(t[0], torch.where(mask, zero, t[1]), *t[2:]) for t in terms]  # noqa: E731
    return Residue(on(a.vecs) + off(b.vecs), [], torch.where(mask, a.r0, b.r0)).plus([], on(a.mats) + off(b.mats),
                                                                                   zero, eps)


def activation_residue(z: Form, gc, slope, on_c, on_u, eps: Domain) -> Residue:
    """Lemma 9': h − f(c) − J_f(c)Aδ = J_f(c)w_z + A c + B Aδ + B w_z with |A| ≤ on_c (α + γ, or Lemma 12's Ā) and
    |B| ≤ on_u (β + γ, or Lemma 12's B̄): the coefficients of c and of u in the exact remainder."""
    inner = residue_of(z).through_jacobian(gc, slope, z.c)
    return inner.plus([(z.c, on_c)], [(z.A, on_u, z.lin(eps))], on_u * z.r, eps)


def taylor_coefficients(slope: torch.Tensor, sigma: torch.Tensor, rad: torch.Tensor, o: float,
                        t_lo: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(alpha, beta, gamma) of Lemma 9 at a centre c with slope = G'(μ_c) (`gain_sq_slope_exact`), for |u| ≤ rad and
    |c·u| ≤ sigma, with every |c + u| ≥ t_lo: with
    s = 2c·u + |u|² (|s| ≤ S = 2σ + rad²), f(c+u) − f(c) − J_f(c)u = G'(μ_c)|u|² c + G'(μ_c) s u + ½G''(ξ) s² (c+u) and
    g(c+u) − g(c) − ∇g(c)·u = G'(μ_c)|u|² + ½G''(ξ) s², with ξ ≥ o + t_lo² (G'' > 0 and decreasing, Lemma 8):
    alpha = |G'(μ_c)| rad², beta = |G'(μ_c)| S, gamma = ½ G''(o + t_lo²) S². The remainders are then at most
    alpha|c| + beta rad + gamma t_hi (of f) and alpha + gamma (of g)."""
    big_s = 2.0 * sigma + rad * rad
    d1 = slope.abs() * (1.0 + 1e-9)
    d2 = gain_sq_curv_sup(o + t_lo * t_lo)
    return d1 * rad * rad, d1 * big_s, 0.5 * d2 * big_s * big_s


GRID = 64  # intervals of the grid in c·u on which Lemma 12's coefficients are evaluated


def exact_coefficients(o: float, cn: torch.Tensor, sigma: torch.Tensor, rad: torch.Tensor):
    """Lemma 12 (docs/bounds.md §8.7): for |u| ≤ rad and |c·u| ≤ sigma, exactly
    f(c+u) − f(c) − J_f(c)u = A c + B u = K c + B u_⊥ and g(c+u) − g(c) − ∇g(c)·u = A, with p = c·u, q = |u|²,
    μ = μ_c + 2p + q, A = G(μ) − G_c − 2G'_c p, B = G(μ) − G_c, K = A + B p/|c|², u_⊥ = u − (p/|c|²) c.
    Returns upper bounds (K̄, Ā, B̄) on |K|, |A|, |B| (inf where σ ≥ |c|²/2 or c = 0: not used there). K and A
    decrease in q, so their extremes lie on q = rad² or q = p²/|c|² (Cauchy–Schwarz); on each, sampled on a grid in p,
    the sup is at most the largest grid value plus h²/8 · sup|second derivative| (linear interpolation); B is monotone
    in μ, so exact at the ends of μ's range."""
    c2 = (cn * cn).clamp_min(1e-300)
    sigma = torch.minimum(sigma, cn * rad)  # |c·u| ≤ |c||u|: every grid point of both curves is then feasible
    ok = (sigma < 0.5 * c2) & (cn > 0)
    sig = torch.where(ok, sigma, torch.zeros_like(sigma))
    mu_c = o + cn * cn
    g_c, d_c = gain_of_sq(mu_c), gain_sq_slope_exact(mu_c)
    mu_lo = o + (cn - sig / cn.clamp_min(1e-300)).clamp_min(0.0) ** 2
    g1, g2 = gain_sq_slope_sup(mu_lo), gain_sq_curv_sup(mu_lo)
    pts = torch.linspace(-1.0, 1.0, GRID + 1, dtype=F64)[None, :] * sig[:, None]
    kappa = 1.0 + pts / c2[:, None]
    best_k, best_a = torch.zeros_like(cn), torch.zeros_like(cn)
    for q in (rad[:, None] ** 2 * torch.ones_like(pts), pts * pts / c2[:, None]):
        mu = (mu_c[:, None] + 2.0 * pts + q).clamp_min(o)  # ≥ o + (|c| + p/|c|)² ≥ o on the region
        big_a = gain_of_sq(mu) - g_c[:, None] - 2.0 * d_c[:, None] * pts
        big_k = (gain_of_sq(mu) - g_c[:, None]) * kappa - 2.0 * d_c[:, None] * pts
        best_k = torch.maximum(best_k, big_k.abs().amax(-1))
        best_a = torch.maximum(best_a, big_a.abs().amax(-1))
    km = 1.0 + sig / c2
    h = 2.0 * sig / GRID
    k_curv = 4.0 * g2 * km ** 3 + 6.0 * g1 * km / c2  # ≥ |d²K/dp²| on both curves
    a_curv = 4.0 * g2 * km * km + 2.0 * g1 / c2  # ≥ |d²A/dp²| on both curves
    slack = 1e-13 * (1.0 + g_c)  # float64 rounding of the differences above
    k_bar = best_k * (1.0 + 1e-9) + h * h / 8.0 * k_curv + slack
    a_bar = best_a * (1.0 + 1e-9) + h * h / 8.0 * a_curv + slack
    s_hi, s_lo = 2.0 * sig + rad * rad, -2.0 * sig + sig * sig / c2
    b_bar = torch.maximum((gain_of_sq(mu_c + s_lo) - g_c).abs(), (gain_of_sq(mu_c + s_hi) - g_c).abs()) * (1.0 + 1e-9) \
        + slack
    inf = torch.full_like(cn, math.inf)
    return torch.where(ok, k_bar, inf), torch.where(ok, a_bar, inf), torch.where(ok, b_bar, inf)


# --- batched norms ------------------------------------------------------------------------------------------------
def op_norm_upper(a: torch.Tensor) -> torch.Tensor:
    """Upper bounds on the spectral norms of a batch of matrices (…, n, k): ‖A‖₂^(2p) = ‖(AᵀA)^p‖₂ ≤ ‖(AᵀA)^p‖_F with
    p = 2^NORM_POWER_STEPS, computed by repeated squaring with rescaling (a few batched matmuls instead of an SVD)."""
    if a.shape[-1] == 0 or a.shape[-2] == 0:
        return torch.zeros(a.shape[:-2], dtype=a.dtype)
    top = a.abs().amax(dim=(-2, -1))  # scaled to entries ≤ 1 first: tiny or huge entries must not under/overflow
    a = a / torch.where(top > 0, top, torch.ones_like(top))[..., None, None]
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
    return torch.where(top > 0, torch.exp(0.5 * log_norm_sq) * NORM_MARGIN * top, torch.zeros_like(top))


@dataclass
class Form:
    """Per centre (batch axis 0): v(x) = c + A (x − x_i) + w(x), |w(x)| ≤ r, for |x − x_i| ≤ ε."""

    c: torch.Tensor  # (P, n)
    A: torch.Tensor  # (P, n, n0)
    r: torch.Tensor  # (P,)
    a_norm: torch.Tensor | None = None  # (P,) an upper bound on sup_{δ∈Δ} |A δ|, filled in by `lin`
    res: "Residue | None" = None  # the structure of w (Lemma 9'), where known

    def lin(self, eps: Domain) -> torch.Tensor:
        """sup over δ ∈ Δ of |A δ| (‖A‖ε on a ball)."""
        if self.a_norm is None:
            self.a_norm = eps.mat(self.A)
        return self.a_norm

    def spread(self, eps: Domain) -> torch.Tensor:
        """sup |v − c| ≤ ‖A‖ε + r."""
        return self.lin(eps) + self.r

    def sup(self, eps: Domain) -> torch.Tensor:
        """sup |v| ≤ sqrt(|c|² + 2ε|Aᵀc| + ε²‖A‖²) + r (expand |c + Aδ|²; on Δ, sup |cᵀAδ| and sup |Aδ|)."""
        c2 = (self.c * self.c).sum(-1)
        atc = eps.vec(torch.einsum("pn,pnk->pk", self.c, self.A))
        return torch.sqrt(c2 + 2.0 * atc + self.lin(eps) ** 2) + self.r


@dataclass
class Scalar:
    """Per centre: s(x) = c + a·(x − x_i) + w(x), |w| ≤ r (the gains g and their differences)."""

    c: torch.Tensor  # (P,)
    a: torch.Tensor  # (P, n0)
    r: torch.Tensor  # (P,)

    def sup(self, eps: Domain) -> torch.Tensor:
        return self.c.abs() + eps.vec(self.a) + self.r

    def spread(self, eps: Domain) -> torch.Tensor:
        return eps.vec(self.a) + self.r


def pick(mask: torch.Tensor, first, second, eps: Domain):
    """Per centre, `first` where mask else `second` (both Forms or both Scalars; Forms keep their residues, whose
    folded matrix terms need ε)."""
    m1 = mask.reshape(-1, *([1] * (first.c.dim() - 1)))
    if isinstance(first, Form):
        res = None if first.res is None and second.res is None else picked_residue(mask, first, second, eps)
        return Form(torch.where(m1, first.c, second.c), torch.where(mask[:, None, None], first.A, second.A),
                    torch.where(mask, first.r, second.r), res=res)
    return Scalar(torch.where(mask, first.c, second.c), torch.where(mask[:, None], first.a, second.a),
                  torch.where(mask, first.r, second.r))


# --- one activation: the original's h, g and the differences Δh, Δg ------------------------------------------------
def jacobian_apply(gc: torch.Tensor, slope: torch.Tensor, c: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """J_f(c) m for a batch: J = g I + 2G'(μ) c cᵀ (m: (P, n) or (P, n, k))."""
    if m.dim() == 2:
        return gc[:, None] * m + (2.0 * slope * (c * m).sum(-1))[:, None] * c
    return gc[:, None, None] * m + (2.0 * slope)[:, None, None] * c[:, :, None] * torch.einsum("pn,pnk->pk", c, m)[:, None, :]


def activation(z: Form, dz: Form, o: float, eps: Domain) -> tuple[Form, Scalar, Form, Scalar]:
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
    along_c = torch.minimum(residue_of(z).dotted_sup(c, eps), cn * z.r)  # ≥ |c·w_z|
    sigma = eps.vec(torch.einsum("pn,pnk->pk", c, z.A)) + along_c
    alpha, beta, gamma = taylor_coefficients(slope, sigma, rz, o, t_lo)
    k_bar, a_bar, b_bar = exact_coefficients(o, cn, sigma, rz)  # Lemma 12: the same remainder, exactly in (c·u, |u|²)
    rem_f = torch.minimum(alpha * cn + beta * rz + gamma * t_hi, torch.hypot(k_bar * cn, b_bar * rz))
    rem_g = torch.minimum(alpha + gamma, a_bar)
    res = activation_residue(z, gc, slope, torch.minimum(alpha + gamma, a_bar), torch.minimum(beta + gamma, b_bar), eps)
    h = Form(gc[:, None] * c, jacobian_apply(gc, slope, c, z.A),
             torch.minimum(torch.minimum(gc * z.r + torch.minimum(torch.minimum(lf * rz * rz / 2.0, rem_f),
                                                                   (g_top - spec_lo) * rz),
                                         g_top * rz + gc * z.lin(eps)), res.sup(eps)), res=res)
    # g = g_c + ∇g_c·A δ + w: Taylor remainder, or the interval [g_bot, g_top] plus the linear part
    grad_a = torch.einsum("pn,pnk->pk", grad, z.A)
    lin = eps.vec(grad_a)
    grad_w = torch.minimum(torch.linalg.vector_norm(grad, dim=-1) * z.r, residue_of(z).dotted_sup(grad, eps))  # ≥ |∇g_c·w_z|
    g = Scalar(gc, grad_a, torch.minimum(grad_w + torch.minimum(lg * rz * rz / 2.0, rem_g),
                                         torch.maximum(g_top - gc, gc - g_bot) + lin))
    # differences: z and z + Δz lie in B(c, rz + D)
    d = dz.sup(eps)
    wide = rz + d
    w_lo, w_hi = (cn - wide).clamp_min(0.0), cn + wide
    lf_w, lg_w = second_derivative_sup(o, w_lo, w_hi)
    top_w, bot_w = gain_of_sq(o + w_lo * w_lo), gain_of_sq(o + w_hi * w_hi)
    spec_w = sech2(torch.sqrt(o + w_hi * w_hi))
    omega = torch.minimum(lf_w * wide, top_w - spec_w)  # ‖J̄ − J_f(c)‖
    lin_dz = torch.linalg.vector_norm(dz.c, dim=-1) + dz.lin(eps)  # ≥ |d + B δ|
    dres = jacobian_residue(z, dz, gc, slope, sigma, d, w_lo, o, eps)
    dh_t = Form(jacobian_apply(gc, slope, c, dz.c), jacobian_apply(gc, slope, c, dz.A),
                torch.minimum(torch.minimum(gc * dz.r + omega * d, torch.clamp(top_w * d, max=2.0) + gc * lin_dz),
                              dres.sup(eps)), res=dres)
    kappa = (top_w + spec_w) / 2.0
    dh_m = Form(kappa[:, None] * dz.c, kappa[:, None, None] * dz.A, kappa * dz.r + (top_w - spec_w) / 2.0 * d)
    dh = pick(dh_t.r <= dh_m.r, dh_t, dh_m, eps)  # both keep a linear part; the smaller remainder wins
    dgrad_a = torch.einsum("pn,pnk->pk", grad, dz.A)
    dg_lin = (grad * dz.c).sum(-1).abs() + eps.vec(dgrad_a)
    dg = Scalar((grad * dz.c).sum(-1), dgrad_a,
                torch.minimum(torch.linalg.vector_norm(grad, dim=-1) * dz.r + lg_w * wide * d,
                              torch.minimum(gain_slope_sup(torch.sqrt(o + w_lo * w_lo)) * d, top_w - bot_w) + dg_lin))
    # exact centre (§8.4): Δh(x) − Δh(x_i) = J(c')(Δz − d) + (J(c') − J(c)) u + R' − R, c' = c + d, u = z − c
    dh_e, dg_e = exact_centre(z, dz, h, grad_a, gc, slope, grad, (torch.minimum(lf * rz * rz / 2.0, rem_f),
                              torch.minimum(lg * rz * rz / 2.0, rem_g)), rz, o, eps)
    dh = pick(dh_e.r < dh.r, dh_e, dh, eps)
    dg = pick(dg_e.r < dg.r, dg_e, dg, eps)
    return h, g, dh, dg


def jacobian_residue(z: Form, dz: Form, gc, slope, sigma, big_d, w_lo, o: float, eps: Domain) -> Residue:
    """Lemma 10: the remainder of Δh = J_f(c)(d + Bδ) + w in the Jacobian-at-c form (§8.4) as a residue. With
    v = Δz and y = z + τv = c + u + τv, (J_f(y) − J_f(c))v = t1 v + t2 c + t3 (u + τv), t1 = G(μ_y) − G(μ_c),
    t3 = 2G'(μ_y)(y·v), t2 = t3 − 2G'(μ_c)(c·v); so w = J_f(c)w_Δ + (t̄1 + t̄4)(d + Bδ + w_Δ) + t̄2 c + t̄3 (Aδ + w)
    with |t̄1| ≤ T1, |t̄2| ≤ T2, |t̄3|, |t̄4| ≤ T3 (the mean over τ of bounded scalars)."""
    c, cn = z.c, torch.linalg.vector_norm(z.c, dim=-1)
    wide = z.spread(eps) + big_d  # ≥ |y − c|
    cv = (c * dz.c).sum(-1).abs() + eps.vec(torch.einsum("pn,pnk->pk", c, dz.A)) \
        + cn * dz.r  # ≥ |c·v|
    shift = 2.0 * (sigma + cv) + wide * wide  # ≥ |μ_y − μ_c| = |2c·(u + τv) + |u + τv|²|
    d1, d2 = gain_sq_slope_sup(o + w_lo * w_lo), gain_sq_curv_sup(o + w_lo * w_lo)
    yv = cv + wide * big_d  # ≥ |y·v|
    t1, t3 = d1 * shift, 2.0 * d1 * yv
    t2 = 2.0 * d2 * shift * yv + 2.0 * slope.abs() * (1.0 + 1e-9) * wide * big_d  # slope = G'(μ_c)
    inner = residue_of(dz).through_jacobian(gc, slope, c)
    return inner.plus([(dz.c, t1 + t3), (c, t2)], [(dz.A, t1 + t3, dz.lin(eps)), (z.A, t3, z.lin(eps))],
                      (t1 + t3) * dz.r + t3 * z.r, eps)


# --- one affine layer ---------------------------------------------------------------------------------------------
def exact_centre(z: Form, dz: Form, h: Form, grad_a, gc, slope, grad, rem, rz, o: float, eps: Domain):
    """Δh and Δg as forms centred on their exact values at x_i (docs/bounds.md §8.4): remainders of order ε², not of
    order |Δz(x_i)|·ε, which wins where the centres of the two networks are far apart. `rem`: the bounds on the
    original's Taylor remainders R of f and g at c (§8.3); those of the pruned network at c' are formed here."""
    c = z.c
    c2 = c + dz.c
    n2 = torch.linalg.vector_norm(c2, dim=-1)
    mu2 = o + n2 * n2
    g2, slope2 = gain_of_sq(mu2), gain_sq_slope_exact(mu2)
    grad2 = 2.0 * slope2[:, None] * c2
    ru2 = rz + dz.lin(eps) + dz.r  # sup |z' − c'|
    lo2, hi2 = (n2 - ru2).clamp_min(0.0), n2 + ru2
    lf2, lg2 = second_derivative_sup(o, lo2, hi2)
    sigma2 = eps.vec(torch.einsum("pn,pnk->pk", c2, z.A + dz.A)) + n2 * (z.r + dz.r)
    alpha2, beta2, gamma2 = taylor_coefficients(slope2, sigma2, ru2, o, lo2)
    k2, a2, b2 = exact_coefficients(o, n2, sigma2, ru2)  # Lemma 12 at c'
    rem_f2 = torch.minimum(alpha2 * n2 + beta2 * ru2 + gamma2 * hi2, torch.hypot(k2 * n2, b2 * ru2))
    rem_g2 = torch.minimum(alpha2 + gamma2, a2)
    # ‖J(c') − J(c)‖ ≤ L_f on the segment [c, c'] × |d| (Lemma 8), and ≤ the spread of their spectra
    cn = torch.linalg.vector_norm(c, dim=-1)
    dn = torch.linalg.vector_norm(dz.c, dim=-1)
    seg_lf, seg_lg = second_derivative_sup(o, (torch.minimum(cn, n2) - dn).clamp_min(0.0), torch.maximum(cn, n2))
    top = gain_of_sq(o + (torch.minimum(cn, n2) - dn).clamp_min(0.0) ** 2)
    low = sech2(torch.sqrt(o + torch.maximum(cn, n2) ** 2))
    jdiff = torch.minimum(seg_lf * dn, top - low)
    quad = rem[0] + torch.minimum(lf2 * ru2 * ru2 / 2.0, rem_f2)
    dh = Form(g2[:, None] * c2 - gc[:, None] * c, jacobian_apply(g2, slope2, c2, z.A + dz.A) - h.A,
              g2 * dz.r + jdiff * z.r + quad)
    gdiff = torch.minimum(seg_lg * dn, torch.linalg.vector_norm(grad2 - grad, dim=-1))
    dg = Scalar(g2 - gc, torch.einsum("pn,pnk->pk", grad2, dz.A) + torch.einsum("pn,pnk->pk", grad2 - grad, z.A),
                torch.linalg.vector_norm(grad2, dim=-1) * dz.r + gdiff * z.r + rem[1]
                + torch.minimum(lg2 * ru2 * ru2 / 2.0, rem_g2))
    return dh, dg


def affine(layer: Layer, h: Form, g: Scalar | None, dh: Form, dg: Scalar | None, removed: torch.Tensor,
           consts: torch.Tensor, eps: Domain) -> tuple[Form, Form]:
    """z = W h + b + psi g and Δz = P_K(W Δh + psi Δg) − P_S(z − c) (docs/bounds.md, eq. 2)."""
    w, psi = layer.dense_weight(), layer.psi
    zc = h.c @ w.T + layer.bias
    za = torch.matmul(w, h.A)
    dc = dh.c @ w.T
    da = torch.matmul(w, dh.A)
    keep = ~removed
    wk, ws = w[keep], w[removed]
    h_res = residue_of(h)
    res = h_res.mapped(w, eps)  # Lemma 9': z's remainder keeps h's structure
    gone = h_res.mapped(-removed.to(F64)[:, None] * w, eps, tight=removed)  # −P_S W w_h: the removed rows' share
    zr = spectral_norm(w) * h.r
    kept_r = spectral_norm(wk) * dh.r
    gone_r = torch.minimum(spectral_norm(ws) * h.r, gone.sup(eps))  # the removed rows barely see the curvature
    if psi is not None:
        zc = zc + psi[None, :] * g.c[:, None]
        za = za + psi[None, :, None] * g.a[:, None, :]
        dc = dc + psi[None, :] * dg.c[:, None]
        da = da + psi[None, :, None] * dg.a[:, None, :]
        zr = zr + vec_norm(psi) * g.r
        kept_r = kept_r + vec_norm(psi[keep]) * dg.r
        gone_r = gone_r + vec_norm(psi[removed]) * g.r
    if psi is not None:  # psi·w_g: the vector psi with a coefficient |w_g| ≤ r_g
        res = res.plus([(psi.expand_as(zc), g.r)], [], torch.zeros_like(zr), eps)
    zr = torch.minimum(zr, res.sup(eps))
    sel = removed.to(F64)
    dc = keep.to(F64) * dc - sel * (zc - consts)
    da = keep.to(F64)[None, :, None] * da - sel[None, :, None] * za
    dres = difference_residue(w, psi, g, dh, dg, removed, gone, eps)
    return Form(zc, za, zr, res=res), Form(dc, da, torch.minimum(torch.hypot(kept_r, gone_r), dres.sup(eps)), res=dres)


def difference_residue(w, psi, g: Scalar, dh: Form, dg: Scalar, removed: torch.Tensor, gone: Residue,
                       eps: Domain) -> Residue:
    """The residue of Δz's remainder P_K(W w_Δh + psi w_Δg) − P_S(W w_h + psi w_g) (eq. 2, Lemma 9'), given `gone`,
    the residue of −P_S W w_h."""
    keep = (~removed).to(F64)
    p = dh.c.shape[0]
    out = residue_of(dh).mapped(keep[:, None] * w, eps, tight=~removed).added(gone, eps)
    if psi is not None:
        out = out.plus([((keep * psi).expand(p, -1), dg.r), (((1.0 - keep) * psi).expand(p, -1), g.r)], [],
                       torch.zeros(p, dtype=F64), eps)
    return out


# --- the whole network --------------------------------------------------------------------------------------------
def local_bounds(layers: list[Layer], removed: list[torch.Tensor], consts: list[torch.Tensor], centres: torch.Tensor,
                 eps: float, allowance: float = 0.0, inputs: torch.Tensor | None = None, box: int = 0) -> dict:
    """For every centre x_i (rows of `centres`): β_i ≥ sup |y'(x) − y(x)| over |x − x_i| ≤ ε, and whether the top-1
    class of the original at x_i is proven to be the top-1 of both networks everywhere in that ball (Theorem 4).
    `allowance`: an absolute float64 rounding allowance added to β and subtracted from every margin.
    `inputs` (P, n0, m), `box`: the set is instead {x_i + E_i η : |η_j| ≤ ε for j < box, |η_{box:}| ≤ ε} (a piece of
    a split ball, docs/bounds.md §8.6). Returns tensors: bound (P,), top1 (P,) bool, margin_original (P,),
    margin_pruned (P,) (certified lower bounds on the top-1 margins over the set), top_class (P,), linear (P, 2m, ·)
    (the linear parts of y and y' at the centres: the split directions of `branch.refine`)."""
    x = centres.to(F64)
    p = x.shape[0]
    first = layers[0]
    w0 = first.dense_weight()
    n_hidden = len(layers) - 1
    dom = Domain(float(eps), box)
    mask0 = removed[0].to(F64)
    if inputs is None:  # the ball: A = W_1, its norms by one exact SVD
        a0 = w0.expand(p, *w0.shape)
        norms = (torch.full((p,), eps * spectral_norm(w0), dtype=F64),
                 torch.full((p,), eps * spectral_norm(w0[removed[0]]), dtype=F64))
    else:
        a0 = torch.matmul(w0, inputs.to(F64))
        norms = (dom.mat(a0), dom.mat(a0[:, removed[0], :]))
    z = Form(x @ w0.T + first.bias, a0, torch.zeros(p, dtype=F64), norms[0])
    dz = Form(-mask0 * (z.c - consts[0]), -mask0[None, :, None] * z.A, torch.zeros(p, dtype=F64), norms[1])
    eps = dom
    for i in range(1, n_hidden + 1):
        h, g, dh, dg = activation(z, dz, float(layers[i - 1].o), eps)
        last = i == n_hidden
        mask = torch.zeros(layers[i].n_out, dtype=torch.bool) if last else removed[i]
        const = torch.zeros(layers[i].n_out, dtype=F64) if last else consts[i]
        z, dz = affine(layers[i], h, g, dh, dg, mask, const, eps)
    slack = allowance + ROUNDING * (torch.linalg.vector_norm(z.c, dim=-1) + z.spread(eps))
    beta = dz.sup(eps) + slack
    top = z.c.argmax(-1)
    m_orig = margin_lower(z, top, eps, residue_of(z)) - 2.0 * slack
    pruned = Form(z.c + dz.c, z.A + dz.A, z.r + dz.r)
    joint = residue_of(z).added(residue_of(dz), eps)  # w' = w + w_Δ
    m_pruned = margin_lower(pruned, top, eps, joint) - 2.0 * slack
    return {"bound": beta, "top1": (m_orig > 0) & (m_pruned > 0), "margin_original": m_orig,
            "margin_pruned": m_pruned, "top_class": top, "linear": torch.cat([z.A, pruned.A], dim=1)}


def margin_lower(y: Form, top: torch.Tensor, eps: Domain, res: Residue | None = None) -> torch.Tensor:
    """min over k ≠ top and |δ| ≤ ε of y_top − y_k ≥ (c_top − c_k) − ε|A_top − A_k| − |w_top − w_k|, with
    |w_top − w_k| ≤ √2 r (Cauchy–Schwarz), or, given the residue of w, by Lemma 9' with the row e_top − e_k."""
    idx = torch.arange(len(top))
    gap = y.c[idx, top][:, None] - y.c
    slope = eps.vec(y.A[idx, top][:, None, :] - y.A)
    pair = SQRT2 * y.r[:, None].expand_as(gap)
    if res is not None:
        rows = [res.dotted_sup(_class_row(top, k, y.c.shape[1]), eps) for k in range(y.c.shape[1])]
        pair = torch.minimum(pair, torch.stack(rows, dim=1))
    low = gap - slope - pair
    low[idx, top] = math.inf
    if low.shape[1] == 1:
        return torch.full((len(top),), math.inf, dtype=F64)
    return low.min(-1).values


def _class_row(top: torch.Tensor, k: int, n: int) -> torch.Tensor:
    """Per point the row e_top − e_k (P, n)."""
    row = torch.nn.functional.one_hot(top, n).to(F64)
    row[:, k] -= 1.0
    return row


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
