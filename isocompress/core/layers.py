"""Verbs that edit one layer or one hidden space of an `IsoMLP` exactly (docs/math.md, "Symmetry" onwards).

Hidden space i (0-based) is the output of weight layer i; it is read by layer i+1. Every verb is a pure function:
it returns a new float64 model and leaves its argument untouched. Paired verbs in the style of SliceGPT's rotate.py:
`rotate_hidden` / `remove_constant_directions`, `diagonalise_left` / `diagonalise_full`.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from isocompress.core.errors import IsocompressError
from isocompress.core.model import IsoMLP, Layer
from isocompress.core.primitives import contract_channels, numerical_rank, rotate_columns, rotate_rows, svd64

F64 = torch.float64


def as_float64(model: IsoMLP) -> IsoMLP:
    return model if model.dtype == F64 else model.cast(F64)


FORWARD_CHUNK = 128


@torch.no_grad()
def forward_float64(model: IsoMLP, x: torch.Tensor, chunk: int = FORWARD_CHUNK) -> torch.Tensor:
    """The model's outputs in float64, computed in chunks of rows (a wide network's activations for every input at
    once would dominate peak memory)."""
    model = as_float64(model)
    return torch.cat([model(part) for part in x.to(F64).split(chunk)])


def _check_hidden(model: IsoMLP, i: int) -> None:
    n_hidden = len(model.layers) - 1
    if not 0 <= i < n_hidden:
        raise IsocompressError(f"hidden space {i} does not exist; this model has hidden spaces 0..{n_hidden - 1}")


def _left_mul(rt: torch.Tensor, layer: Layer) -> Layer:
    """Output channels of the producing layer in a new basis: W → Rᵀ W, b → Rᵀ b, psi → Rᵀ psi (rt = Rᵀ, possibly
    r × n; for a convolution, the rows of the reshaped kernel)."""
    dense = layer.as_dense()
    return replace(
        dense,
        weight=rotate_rows(rt, dense.weight),
        bias=rt @ dense.bias,
        psi=None if dense.psi is None else rotate_rows(rt, dense.psi),
    )


def _right_mul(layer: Layer, r: torch.Tensor) -> Layer:
    """Input channels of the consuming layer in the new basis: W → W R at every kernel offset (R is n × r)."""
    dense = layer.as_dense()
    return replace(dense, weight=rotate_columns(dense.weight, r), n_in=int(r.shape[1]))


def rotate_hidden(model: IsoMLP, i: int, rotation: torch.Tensor) -> IsoMLP:
    """Rotate hidden space i by an orthogonal R: W_i → RᵀW_i, b_i → Rᵀb_i, psi_i → Rᵀpsi_i, W_{i+1} → W_{i+1}R.
    Exact because f(Rᵀz) = Rᵀ f(z) and |Rᵀz| = |z| (docs/math.md, "Symmetry")."""
    model = as_float64(model)
    _check_hidden(model, i)
    layers = model.layers
    n = layers[i].n_out
    r = rotation.to(F64)
    if tuple(r.shape) != (n, n):
        raise IsocompressError(f"rotation for hidden space {i} must be {n}×{n}, got {tuple(r.shape)}")
    return model.with_layers({i: _left_mul(r.T, layers[i]), i + 1: _right_mul(layers[i + 1], r)})


def diagonalise_left(model: IsoMLP, i: int) -> IsoMLP:
    """Left-partial diagonalisation of layer i (which must produce a hidden space): SVD W_i = UΣVᵀ, rotate hidden
    space i by U. Row j of the new W_i is σ_j v_jᵀ, ordered by σ_j."""
    model = as_float64(model)
    _check_hidden(model, i)
    u, _, _ = svd64(model.layers[i].matrix(), full=True)
    return rotate_hidden(model, i, u)


def diagonalisable_layers(model: IsoMLP) -> list[int]:
    """Pointwise layers (dense, or a 1×1 kernel) whose input and output are both hidden spaces (1 ≤ i ≤ L−2): the
    ones full diagonalisation can act on (a k×k kernel cannot be made diagonal by channel rotations)."""
    layers = model.layers
    return [i for i in range(1, len(layers) - 1) if layers[i].geometry.pointwise]


def diagonalise_full(model: IsoMLP, i: int) -> IsoMLP:
    """Full diagonalisation of layer i (1 ≤ i ≤ L−2): SVD W_i = UΣVᵀ; rotate hidden space i by U and hidden space
    i−1 by V. Layer i becomes Σ, stored as its diagonal; layers i−1 and i+1 absorb Vᵀ and U."""
    model = as_float64(model)
    if i not in diagonalisable_layers(model):
        raise IsocompressError(
            f"layer {i} cannot be fully diagonalised: it must be pointwise (dense or 1×1) and both its input and output"
            f" must be hidden spaces (layers 1..{len(model.layers) - 2})"
        )
    layers = model.layers
    current = layers[i]
    u, s, vh = svd64(current.matrix(), full=True)
    diagonal = replace(current, weight=s, bias=u.T @ current.bias,
                       psi=None if current.psi is None else rotate_rows(u.T, current.psi))
    return model.with_layers(
        {i - 1: _left_mul(vh, layers[i - 1]), i: diagonal, i + 1: _right_mul(layers[i + 1], u)}
    )


def diagonal_savings(layer: Layer) -> int:
    """Parameters saved by storing this (pointwise) layer's weight as its diagonal."""
    return layer.n_out * layer.n_in - min(layer.n_out, layer.n_in)


def varying_basis(layer: Layer, rtol: float | None = None, sigma_floor: float | None = None):
    """Orthonormal basis (n × r) of the directions of range([M, Ψ]) that vary with the input (M, Ψ: the reshaped
    kernel and psi kernel; W and psi for a dense layer). With `sigma_floor`: those with singular value above it (and
    the largest dropped σ is returned too); else those above rtol·σ_max (a numerical rank). At least one direction is
    kept so no hidden space is empty."""
    a = varying_matrix(layer)
    u, s, _ = svd64(a, full=False)
    if sigma_floor is None:
        rank = max(numerical_rank(s, tuple(a.shape), rtol), 1)
    else:
        rank = max(int((s > sigma_floor).sum()), 1)
    if sigma_floor is None:
        return u[:, :rank]
    return u[:, :rank], float(s[rank]) if rank < s.numel() else 0.0


def varying_matrix(layer: Layer) -> torch.Tensor:
    """[M, Ψ]: what a hidden space's varying part is the range of (uᵀ[M, Ψ] = 0 makes uᵀz = uᵀb at every position and
    for every input, padded borders included: zero padding only drops terms)."""
    m = layer.matrix()
    return m if layer.psi is None else torch.cat([m, layer.psi_matrix()], dim=1)


def remove_constant_directions(model: IsoMLP, i: int, rtol: float | None = None,
                               sigma_floor: float | None = None) -> IsoMLP:
    """Exact removal of every constant direction of hidden space i (docs/math.md, "Exact removal").

    With Q (n × r) an orthonormal basis of range([W_i, psi_i]), z_i = Q q + b⊥ where b⊥ = b_i − QQᵀb_i is the same
    for every input. So |z_i|² = |q|² + |b⊥|² (absorb o_i += |b⊥|²) and W_{i+1} h_i = W_{i+1}Q (g q) + g·W_{i+1}b⊥
    (absorb psi_{i+1} += W_{i+1} b⊥). Only the r varying directions are kept; no full basis is ever formed. For a
    convolution the same holds at every position, and the consumer's psi kernel gains Σ_j W_{i+1}[:, j, …] b⊥_j.
    `sigma_floor`: directions with singular value ≤ it count as constant (see `remove_all_constant_directions`).
    """
    return _remove_constant(model, i, rtol, sigma_floor)[0]


def _remove_constant(model: IsoMLP, i: int, rtol, sigma_floor) -> tuple[IsoMLP, float]:
    model = as_float64(model)
    _check_hidden(model, i)
    layers = model.layers
    pair, dropped_sigma = remove_constant_pair(layers[i], layers[i + 1], rtol, sigma_floor)
    return (model if pair is None else model.with_layers({i: pair[0], i + 1: pair[1]})), dropped_sigma


def producer_basis(producer: Layer, rtol: float | None = None,
                   sigma_floor: float | None = None) -> tuple[torch.Tensor, float]:
    """(Q, largest dropped σ) of `varying_basis` for the first layer of a pair (0 for the rtol rule): all that
    `remove_constant_pair` needs of the producer before it sees the consumer."""
    producer = producer.as_dense()
    if sigma_floor is None:
        return varying_basis(producer, rtol), 0.0
    return varying_basis(producer, sigma_floor=sigma_floor)


def remove_constant_pair(producer: Layer, consumer: Layer, rtol: float | None = None,
                         sigma_floor: float | None = None,
                         basis: tuple[torch.Tensor, float] | None = None) -> tuple[tuple[Layer, Layer] | None, float]:
    """remove_constant_directions on one (producer, consumer) pair of float64 layers: (the new pair, or None when the
    hidden space between them has no constant direction; the largest dropped singular value, 0 for the rtol rule).
    `basis`: producer_basis(producer, rtol, sigma_floor), computed before the consumer was read (a streamed shrink
    then never holds the consumer and the SVD's workspace at once)."""
    producer, consumer = producer.as_dense(), consumer.as_dense()
    q, dropped_sigma = producer_basis(producer, rtol, sigma_floor) if basis is None else basis
    if q.shape[1] == producer.n_out:
        return None, 0.0
    kept = _left_mul(q.T, producer)
    constant = producer.bias - q @ kept.bias
    kept = replace(kept, o=producer.o + constant @ constant)
    extra_psi = contract_channels(consumer.weight, constant)
    new_consumer = _right_mul(consumer, q)
    if consumer.psi is not None or bool(extra_psi.abs().max() > 0):
        base = torch.zeros_like(extra_psi) if consumer.psi is None else consumer.psi
        new_consumer = replace(new_consumer, psi=base + extra_psi)
    return (kept, new_consumer), dropped_sigma


