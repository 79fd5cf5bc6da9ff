"""Pure tensor functions: the isotropic activation, SVDs, ranks, rotations. No model objects here.

Linear algebra runs in float64; callers cast at the edges.
"""

from __future__ import annotations

import math

import torch

from isocompress.core import threads

# Below this value of m² = o + |z|², g = tanh(m)/m is evaluated by its series (docs/math.md, "Forward pass").
SMALL_M2 = 1e-8


SIGMAS = ("tanh", "log1p")  # the radial functions σ of f(z) = σ(m)/m · z that isocompress handles


def isotropic_gain(m2: torch.Tensor, sigma: str = "tanh") -> torch.Tensor:
    """g(m) = σ(m)/m as a function of m² ≥ 0, finite with finite gradients everywhere (including m² = 0).
    (The caller passes m² = |o + |z|²|; see `isotropic`.)

    Series near 0: tanh(m)/m = 1 − m²/3 + 2m⁴/15 − …, log1p(m)/m = 1 − m/2 + m²/3 − …; `where` keeps the untaken
    branch's argument finite so that no NaN gradient leaks through it. log1p's series is in m, not m²: its small
    branch takes sqrt(m² + 1e-200), whose gradient stays finite at 0 (g itself is not differentiable there)."""
    small = m2 < SMALL_M2
    safe_m2 = torch.where(small, torch.ones_like(m2), m2)
    m = torch.sqrt(safe_m2)
    if sigma == "tanh":
        series = 1.0 - m2 / 3.0 + 2.0 * m2 * m2 / 15.0
        return torch.where(small, series, torch.tanh(m) / m)
    if sigma == "log1p":
        root = torch.sqrt(torch.where(small, m2, torch.zeros_like(m2)) + 1e-200)
        series = 1.0 - root / 2.0 + m2 / 3.0
        return torch.where(small, series, torch.log1p(m) / m)
    raise ValueError(f"unknown activation {sigma!r}; one of {SIGMAS}")


def isotropic(z: torch.Tensor, o: torch.Tensor | float, sigma: str = "tanh",
              dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """f(z) = g·z with g = σ(m)/m, m = sqrt(|o + |z|²|), |z| over the channel axis `dim` (the last axis of a vector,
    axis 1 of an N × C × positions map). Returns (h, g), g with the channel axis kept as size 1.

    The absolute value is the reference code's semantics for a raw (possibly negative) intrinsic length; for o ≥ 0
    it changes nothing. For o < 0, m = 0 on the sphere |z|² = −o (g = 1 there; docs/math.md, "Negative o")."""
    m2 = (z * z).sum(dim=dim, keepdim=True) + o
    if _may_be_negative(o):
        m2 = m2.abs()
    g = isotropic_gain(m2, sigma)
    return g * z, g


def isotropic_tanh(z: torch.Tensor, o: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """`isotropic` with σ = tanh over the last axis (the MLP case)."""
    return isotropic(z, o, "tanh", -1)


def _may_be_negative(o: torch.Tensor | float) -> bool:
    """Whether o < 0 (then |o + |z|²| needs its abs; skipping it for o ≥ 0 keeps the common path unchanged)."""
    if isinstance(o, torch.Tensor):
        return o.requires_grad or bool((o < 0).any())
    return o < 0


def svd64(matrix: torch.Tensor, full: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD in float64: matrix = U diag(S) Vh, S descending. `full` gives square U and Vh. Threads: threads.for_matrix."""
    with threads.for_matrix(*matrix.shape):
        return torch.linalg.svd(matrix.to(torch.float64), full_matrices=full)


def spectral_norm_upper(matrix: torch.Tensor) -> float:
    """An upper bound on ‖A‖₂ (float64), about 3× cheaper than singular values: sqrt of λ_max of the smaller Gram
    matrix (`gram_matrix`, `spectral_norm_from_gram`)."""
    a = matrix.to(torch.float64)
    if a.numel() == 0:
        return 0.0
    return spectral_norm_from_gram(gram_matrix(a), max(a.shape))


def gram_matrix(a: torch.Tensor) -> torch.Tensor:
    """The smaller Gram matrix of a float64 matrix: A Aᵀ or Aᵀ A (threads as for a factorisation of A: for a wide
    layer this product costs as much as the eigenvalue step)."""
    with threads.for_matrix(*a.shape):
        return a @ a.T if a.shape[0] <= a.shape[1] else a.T @ a


def spectral_norm_from_gram(gram: torch.Tensor, inner: int) -> float:
    """sqrt(λ_max(G)) plus the float64 error of forming G (inner size `inner`) and of eigvalsh: each is ≤
    k·eps·‖A‖_F² with k ≤ max(inner, n), so 4·k·eps·‖A‖_F² covers both. ‖A‖_F² = trace(G), whose own rounding
    (relative ≤ inner·eps) is covered by the factor (1 + 2·inner·eps). A caller may free A before this call: only G
    is used (peak memory of a streamed shrink)."""
    if gram.numel() == 0:
        return 0.0
    eps = torch.finfo(torch.float64).eps
    fro2 = float(gram.diagonal().sum()) * (1.0 + 2.0 * inner * eps)
    with threads.for_matrix(*gram.shape):
        lam = float(torch.linalg.eigvalsh(gram)[-1])
    margin = 4.0 * max(inner, gram.shape[0]) * eps * fro2
    return math.sqrt(max(lam, 0.0) + margin)


def numerical_rank(singular_values: torch.Tensor, shape: tuple[int, int], rtol: float | None = None) -> int:
    """Number of singular values above rtol·σ_max (default rtol = max(shape)·eps(float64), as numpy.matrix_rank)."""
    if singular_values.numel() == 0:
        return 0
    if rtol is None:
        rtol = max(shape) * torch.finfo(torch.float64).eps
    top = singular_values.max()
    if top <= 0:
        return 0
    return int((singular_values > rtol * top).sum())


def rotate_rows(rt: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Rᵀ applied to the output channels of a weight C_out × C_in × kernel (or a bias/psi C_out × kernel): the rows of
    the reshaped kernel M = W.reshape(C_out, −1) in a new basis (rt = Rᵀ, possibly r × C_out)."""
    if w.dim() <= 2:
        return rt @ w
    return (rt @ w.reshape(w.shape[0], -1)).reshape(rt.shape[0], *w.shape[1:])


def rotate_columns(w: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """W R on the input channels of a weight C_out × C_in × kernel: every kernel offset's C_out × C_in slice times R
    (C_in × r). For a dense matrix, W @ R."""
    if w.dim() == 2:
        return w @ r
    return (w.movedim(1, -1) @ r).movedim(-1, 1)


def contract_channels(w: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Σ_j W[:, j, …] c_j: a weight's input channels against a vector c, giving C_out × kernel (W @ c for a matrix):
    the psi kernel that a constant channel direction c contributes (docs/math.md, "Exact removal")."""
    if w.dim() == 2:
        return w @ c
    return w.movedim(1, -1) @ c


def diag_matmul(diagonal: torch.Tensor, x: torch.Tensor, n_out: int) -> torch.Tensor:
    """y = D x for a rectangular diagonal D (n_out × n_in) stored as its k = min(n_out, n_in) diagonal entries."""
    k = diagonal.shape[0]
    y = x[..., :k] * diagonal
    if n_out > k:
        y = torch.nn.functional.pad(y, (0, n_out - k))
    return y


def diag_to_dense(diagonal: torch.Tensor, n_out: int, n_in: int) -> torch.Tensor:
    dense = torch.zeros(n_out, n_in, dtype=diagonal.dtype)
    k = diagonal.shape[0]
    dense[range(k), range(k)] = diagonal
    return dense


def random_orthogonal(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A Haar-random orthogonal n×n matrix in float64 (QR of a Gaussian with the sign fix)."""
    a = torch.randn(n, n, dtype=torch.float64, generator=generator)
    q, r = torch.linalg.qr(a)
    return q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(n, dtype=torch.float64))


# softplus(RAW_FOR_ZERO) ≈ 4e-18: the trainable stand-in for a stored o = 0 (softplus never reaches 0).
RAW_FOR_ZERO = -40.0


def inverse_softplus(o: torch.Tensor) -> torch.Tensor:
    """raw with softplus(raw) = o for o > 0 (log(expm1(o)), written stably for large o); RAW_FOR_ZERO for o = 0."""
    o = o.to(torch.float64)
    positive = o > 0
    safe = torch.where(positive, o, torch.ones_like(o))
    raw = safe + torch.log(-torch.expm1(-safe))
    return torch.where(positive, raw, torch.full_like(o, RAW_FOR_ZERO))
