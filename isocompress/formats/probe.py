"""Recognising an isotropic activation by its behaviour (docs/math.md, "Importing a live module").

A function φ of an N × C × spatial map (or an N × C batch of vectors) is the isotropic activation f(z) = σ(m)/m · z,
m = sqrt(|o + |z|²|), σ ∈ {tanh, log1p}, acting on every position's channel vector, when it
  * maps each vector to a multiple of itself,
  * commutes with random rotations R of the channel axis, φ(R z) = R φ(z), and
  * has the radial profile g(r) = |φ(z)|/|z| of σ(m)/m with one o for every radius and position: for each probe radius
    the m with σ(m)/m = g is found by bisection and Newton steps in float64, and o = m² − r² must agree to 1e-9.
Probes stay outside |z| ≤ 0.05, where the reference code and the author's conv code switch to a series or to the
identity (inside a ball of radius ε = 1e-3). Pure functions of a callable; no model objects here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from isocompress.core.primitives import SIGMAS, random_orthogonal

F64 = torch.float64
PROBE_RADII = (0.05, 0.2, 0.5, 1.0, 1.7, 2.5, 4.0)
O_TOLERANCE = 1e-9  # o recovered from every radius must agree to this (relative to max(1, |o|))
MATCH_RTOL = 1e-9  # φ must equal its fitted isotropic form to this, relative to |φ(z)|


SMALL_RADII = (1e-6, 1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)  # where an implementation may switch to the identity


@dataclass(frozen=True)
class Fitted:
    """An isotropic activation recognised by its behaviour: σ and o; `identity_below`: the largest small probe radius
    at which it returned its input unchanged (the author's conv code is the identity inside |z| < ε), else None."""

    sigma: str
    o: float
    identity_below: float | None = None

    def identity_note(self, where: str) -> str | None:
        """One line for the report where the module is the identity on a small ball and isocompress is not."""
        if self.identity_below is None:
            return None
        r = self.identity_below
        worst = r * r / 3.0 if self.sigma == "tanh" else r / 2.0
        return (f"{where} is the identity for |z| < {r:.3g}; isocompress computes σ(m)/m there too, which differs from"
                f" the identity by at most {worst:.2g} relative inside that ball and not at all outside")


class NotIsotropic(ValueError):
    """φ is not an isotropic activation; the message says which test failed."""


def sigma_gain(sigma: str, m: float) -> float:
    if m < 1e-12:
        return 1.0
    return math.tanh(m) / m if sigma == "tanh" else math.log1p(m) / m


def sigma_gain_slope(sigma: str, m: float) -> float:
    if sigma == "tanh":
        return (m / math.cosh(m) ** 2 - math.tanh(m)) / (m * m)
    return (m / (1.0 + m) - math.log1p(m)) / (m * m)


def invert_gain(sigma: str, g: float) -> float | None:
    """The m ≥ 0 with σ(m)/m = g (σ(m)/m falls from 1 at m = 0 towards 0), or None outside (0, 1)."""
    if not 0.0 < g < 1.0:
        return None
    lo, hi = 0.0, 1.0
    while sigma_gain(sigma, hi) > g:
        hi *= 2.0
        if hi > 1e12:
            return None
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if sigma_gain(sigma, mid) > g else (lo, mid)
    m = 0.5 * (lo + hi)
    for _ in range(3):  # Newton steps: bisection alone stops at the resolution of the gain's rounding
        slope = sigma_gain_slope(sigma, m)
        if slope == 0.0:
            break
        m -= (sigma_gain(sigma, m) - g) / slope
    return m


def fit_radial_profile(radii: list[float], gains: list[float]) -> Fitted:
    """The σ and o that make σ(m)/m = g at every probe radius, m = sqrt(|o + r²|): o from the four largest radii
    (outside any sphere |z|² = −o of a small negative o), then every radius must give its gain back to 1e-9."""
    reasons = []
    order = sorted(range(len(radii)), key=lambda k: radii[k])[-4:]
    for sigma in SIGMAS:
        ms = [invert_gain(sigma, gains[k]) for k in order]
        if any(m is None for m in ms):
            reasons.append(f"{sigma}: a gain outside (0, 1)")
            continue
        os_ = [m * m - radii[k] ** 2 for m, k in zip(ms, order)]
        o = sum(os_) / len(os_)
        if max(os_) - min(os_) > O_TOLERANCE * max(1.0, abs(o)):
            reasons.append(f"{sigma}: o from the radii spans {min(os_):.4g}…{max(os_):.4g}")
            continue
        predicted = [sigma_gain(sigma, math.sqrt(abs(o + r * r))) for r in radii]
        worst = max(abs(p - g) / g for p, g in zip(predicted, gains))
        if worst <= O_TOLERANCE:
            return Fitted(sigma, o)
        reasons.append(f"{sigma}: with o = {o:.4g} the gain is off by {worst:.2g} (relative) at a small radius")
    raise NotIsotropic("its radial profile is neither tanh(m)/m nor log1p(m)/m with one intrinsic length o ("
                       + "; ".join(reasons) + ")")


def probe_vectors(channels: int, seed: int = 0) -> tuple[torch.Tensor, list[float]]:
    """Random directions at the probe radii: one row per radius (PROBE_RADII), float64."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(len(PROBE_RADII), channels, dtype=F64, generator=gen)
    v = v / torch.linalg.vector_norm(v, dim=1, keepdim=True) * torch.tensor(PROBE_RADII, dtype=F64)[:, None]
    return v, list(PROBE_RADII)


def fit_activation(act: Callable[[torch.Tensor], torch.Tensor], channels: int, seed: int = 0) -> Fitted:
    """σ and o of `act`, a function of N × C batches of channel vectors (N × C in, N × C out); raises NotIsotropic
    with the failed test."""
    v, radii = probe_vectors(channels, seed)
    out = act(v)
    if tuple(out.shape) != tuple(v.shape):
        raise NotIsotropic(f"it maps {tuple(v.shape)} to {tuple(out.shape)}, not to the same shape")
    gains = (out * v).sum(dim=1) / (v * v).sum(dim=1)
    off_axis = torch.linalg.vector_norm(out - gains[:, None] * v, dim=1)
    if bool((off_axis > MATCH_RTOL * torch.linalg.vector_norm(out, dim=1).clamp_min(1e-300)).any()):
        raise NotIsotropic("it does not map each channel vector to a multiple of itself (an elementwise function?)")
    rotation = random_orthogonal(channels, torch.Generator().manual_seed(seed + 1))
    turned = act(v @ rotation.T)
    if not bool(torch.allclose(turned, out @ rotation.T, rtol=1e-9, atol=1e-12)):
        raise NotIsotropic("it does not commute with rotations of the channel axis (an elementwise function?)")
    fitted = fit_radial_profile(radii, [float(g) for g in gains])
    return Fitted(fitted.sigma, fitted.o, identity_radius(act, v[0]))


def identity_radius(act, direction: torch.Tensor) -> float | None:
    """The radius below which act(z) == z exactly, found on SMALL_RADII and refined by bisection to 0.1% (None if
    act is not the identity at any of them): the edge of an implementation's small identity ball."""
    unit = direction / torch.linalg.vector_norm(direction)

    def identity_at(radii: list[float]) -> list[bool]:
        z = unit[None] * torch.tensor(radii, dtype=F64)[:, None]
        return (act(z) == z).all(dim=1).tolist()

    same = identity_at(list(SMALL_RADII))
    hits = [r for r, hit in zip(SMALL_RADII, same) if hit]
    if not hits:
        return None
    lo = max(hits)
    misses = [r for r, hit in zip(SMALL_RADII, same) if not hit and r > lo]
    if not misses:
        return lo
    hi = min(misses)
    while hi / lo > 1.001:
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if identity_at([mid])[0] else (lo, mid)
    return hi


def isotropic_reference(fitted: Fitted, z: torch.Tensor, dim: int) -> torch.Tensor:
    """The fitted activation applied to z over axis `dim` (to check φ on maps and arbitrary inputs)."""
    from isocompress.core.primitives import isotropic

    return isotropic(z.to(F64), torch.tensor(fitted.o, dtype=F64), fitted.sigma, dim)[0]
