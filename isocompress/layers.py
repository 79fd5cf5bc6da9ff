"""Verbs that edit one layer or one hidden space of an `IsoMLP` exactly (docs/math.md, "Symmetry" onwards).

Hidden space i (0-based) is the output of weight layer i; it is read by layer i+1. Every verb is a pure function:
it returns a new float64 model and leaves its argument untouched. Paired verbs in the style of SliceGPT's rotate.py:
`rotate_hidden` / `remove_constant_directions`, `diagonalise_left` / `diagonalise_full`.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from isocompress.errors import IsocompressError
from isocompress.model import IsoMLP, Layer
from isocompress.primitives import numerical_rank, spectral_norm_upper, svd64

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
    """Rows of the producing layer in a new basis: W → Rᵀ W, b → Rᵀ b, psi → Rᵀ psi (rt = Rᵀ, possibly r × n)."""
    dense = layer.as_dense()
    return replace(
        dense,
        weight=rt @ dense.weight,
        bias=rt @ dense.bias,
        psi=None if dense.psi is None else rt @ dense.psi,
    )


def _right_mul(layer: Layer, r: torch.Tensor) -> Layer:
    """Columns of the consuming layer in the new basis: W → W R (R is n × r)."""
    dense = layer.as_dense()
    return replace(dense, weight=dense.weight @ r, n_in=int(r.shape[1]))


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
    u, _, _ = svd64(model.layers[i].dense_weight(), full=True)
    return rotate_hidden(model, i, u)


def diagonalisable_layers(model: IsoMLP) -> list[int]:
    """Layers whose input and output are both hidden spaces (1 ≤ i ≤ L−2): the ones full diagonalisation can act on."""
    return list(range(1, len(model.layers) - 1))


def diagonalise_full(model: IsoMLP, i: int) -> IsoMLP:
    """Full diagonalisation of layer i (1 ≤ i ≤ L−2): SVD W_i = UΣVᵀ; rotate hidden space i by U and hidden space
    i−1 by V. Layer i becomes Σ, stored as its diagonal; layers i−1 and i+1 absorb Vᵀ and U."""
    model = as_float64(model)
    if i not in diagonalisable_layers(model):
        raise IsocompressError(
            f"layer {i} cannot be fully diagonalised: both its input and output must be hidden spaces"
            f" (layers 1..{len(model.layers) - 2})"
        )
    layers = model.layers
    u, s, vh = svd64(layers[i].dense_weight(), full=True)
    current = layers[i]
    diagonal = Layer(
        weight=s,
        bias=u.T @ current.bias,
        n_in=current.n_in,
        psi=None if current.psi is None else u.T @ current.psi,
        o=current.o,
    )
    return model.with_layers(
        {i - 1: _left_mul(vh, layers[i - 1]), i: diagonal, i + 1: _right_mul(layers[i + 1], u)}
    )


def diagonal_savings(layer: Layer) -> int:
    """Parameters saved by storing this layer's weight as its diagonal."""
    return layer.n_out * layer.n_in - min(layer.n_out, layer.n_in)


def choose_alternating_layers(model: IsoMLP) -> list[int]:
    """Non-adjacent diagonalisable layers with the largest total saving (a path max-weight independent set; for
    equal widths this is layers 1, 3, 5, … — the paper's alternating form)."""
    layers = model.layers
    take, skip = (0, []), (0, [])  # best (saving, chosen) over the candidates so far, taking / not taking the last
    for i in diagonalisable_layers(model):
        take, skip = (skip[0] + diagonal_savings(layers[i]), skip[1] + [i]), max(take, skip, key=lambda t: t[0])
    return max(take, skip, key=lambda t: t[0])[1]


def alternate_diagonalise(model: IsoMLP, progress=None) -> IsoMLP:
    """Full diagonalisation of every other hidden-to-hidden layer (the paper's "50%" form), function unchanged."""
    model = as_float64(model)
    for i in choose_alternating_layers(model):
        model = diagonalise_full(model, i)
        if progress is not None:
            progress(f"diagonalise layer {i}")
    return model


# --- which directions are constant (issue 13) ---------------------------------------------------------------------
EXACT_RTOL = 1e-10  # drop a direction only if its proven effect on the output is ≤ this × the output scale
GAIN_LIPSCHITZ = 0.34343  # ≥ sup_m |g'(m)| (bounds.SLOPE_MAX): g(m(z)) is this-Lipschitz in z, as |∇_z g| ≤ |g'(m)|
DEFAULT_PROBE_SCALES = (0.01, 1.0, 10.0, 1000.0)  # the inputs the tolerance is set on when the caller gives none


def activation_constants(o: float) -> tuple[float, float, float]:
    """(Lipschitz constant of f, Lipschitz constant of g, sup |f|) in z for intrinsic length o (docs/bounds.md,
    "Constant directions"). o ≥ 0: (1, G', 1). o < 0, m = sqrt(|o + |z|²|): the radial slope of f is at most
    1 + 2|o|/3 and its tangential one g ≤ 1, |∇g| = |g'(m)|·|z|/m ≤ G' + (2/3)·sqrt|o| (|g'(m)|/m ≤ 2/3), and
    |f| ≤ sqrt(1 + |o|)."""
    if o >= 0:
        return 1.0, GAIN_LIPSCHITZ, 1.0
    return 1.0 + 2.0 * abs(o) / 3.0, GAIN_LIPSCHITZ + (2.0 / 3.0) * math.sqrt(abs(o)), math.sqrt(1.0 + abs(o))


def lipschitz_after(norms: list[tuple[float, float]], o: list[float | None]) -> list[float]:
    """after[i] = L_{i+1} = ∏_{k ≥ i+1} chain_factor(norms[k], o[k − 1]): a Lipschitz constant of z_i ↦ y, for every
    hidden space i at once (suffix products; `norms` and `o` per weight layer, `layer_norms` and its o)."""
    after, running = [1.0] * len(norms), 1.0
    for k in range(len(norms) - 1, 0, -1):
        running *= chain_factor(norms[k], o[k - 1])
        after[k - 1] = running
    return after


def layer_norms(layer: Layer) -> tuple[float, float]:
    """(‖W‖₂, |psi|) of one layer: what its factor in the Lipschitz chain needs."""
    w = float(layer.weight.abs().max()) if layer.kind == "diag" else spectral_norm_upper(layer.weight)
    return w, psi_norm(layer)


def psi_norm(layer: Layer) -> float:
    """|psi| of a layer (0 without psi)."""
    return 0.0 if layer.psi is None else torch.linalg.vector_norm(layer.psi).item()


def chain_factor(norms: tuple[float, float], o_before: float) -> float:
    """‖W_k‖₂·L_f + |psi_k|·L_g: how much weight layer k can amplify a change of the pre-activation before it (whose
    activation has intrinsic length `o_before`)."""
    lip_f, lip_g, _ = activation_constants(o_before)
    return norms[0] * lip_f + norms[1] * lip_g


def input_bound(model: IsoMLP, i: int, input_radius: float) -> float:
    """A bound on |[h; g]|, the input of weight layer i (|x| ≤ R for i = 0; after, |h| ≤ sup|f| and g ≤ 1)."""
    o_before = None if i == 0 else float(model.layers[i - 1].o)
    return layer_input_bound(i, input_radius, o_before, model.layers[i].psi is not None)


def layer_input_bound(i: int, input_radius: float, o_before: float | None, has_psi: bool) -> float:
    if i == 0:
        return float(input_radius)
    sup_h = activation_constants(o_before)[2]
    return math.hypot(sup_h, 1.0) if has_psi else sup_h


def constant_record(rtol: float | None, output_scale: float, input_radius: float) -> dict:
    """The report.json record of the constant-direction rule, before any hidden space is visited."""
    return {"rule": "drop σ_j only if σ_j·|input|·Lipschitz(downstream) ≤ rtol·output_scale",
            "rtol": EXACT_RTOL if rtol is None else rtol, "output_scale": output_scale,
            "input_radius": float(input_radius), "dropped": [], "largest_dropped_sigma": [], "bound": 0.0}


def constant_floor(input_bound_i: float, lipschitz_after: float, output_scale: float) -> float:
    """The largest singular value that may be dropped in a hidden space: σ·B_i·L_{i+1} ≤ EXACT_RTOL·Y."""
    return EXACT_RTOL * output_scale / max(input_bound_i * lipschitz_after, torch.finfo(F64).tiny)


@torch.no_grad()
def default_scales(model: IsoMLP, seed: int = 0) -> tuple[float, float]:
    """(input radius, output scale) on seeded Gaussian inputs at several scales (measure.probe_inputs' recipe)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.cat([torch.randn(64, model.widths[0], dtype=F64, generator=gen) * s for s in DEFAULT_PROBE_SCALES])
    y = forward_float64(model, x)
    return float(torch.linalg.vector_norm(x, dim=-1).max()), float(torch.linalg.vector_norm(y, dim=-1).max())


def varying_basis(layer: Layer, rtol: float | None = None, sigma_floor: float | None = None):
    """Orthonormal basis (n × r) of the directions of range([W, psi]) that vary with the input. With `sigma_floor`:
    those with singular value above it (and the largest dropped σ is returned too); else those above rtol·σ_max
    (a numerical rank). At least one direction is kept so no hidden space is empty."""
    w = layer.dense_weight()
    a = w if layer.psi is None else torch.cat([w, layer.psi[:, None]], dim=1)
    u, s, _ = svd64(a, full=False)
    if sigma_floor is None:
        rank = max(numerical_rank(s, tuple(a.shape), rtol), 1)
    else:
        rank = max(int((s > sigma_floor).sum()), 1)
    if sigma_floor is None:
        return u[:, :rank]
    return u[:, :rank], float(s[rank]) if rank < s.numel() else 0.0


def remove_constant_directions(model: IsoMLP, i: int, rtol: float | None = None,
                               sigma_floor: float | None = None) -> IsoMLP:
    """Exact removal of every constant direction of hidden space i (docs/math.md, "Exact removal").

    With Q (n × r) an orthonormal basis of range([W_i, psi_i]), z_i = Q q + b⊥ where b⊥ = b_i − QQᵀb_i is the same
    for every input. So |z_i|² = |q|² + |b⊥|² (absorb o_i += |b⊥|²) and W_{i+1} h_i = W_{i+1}Q (g q) + g·W_{i+1}b⊥
    (absorb psi_{i+1} += W_{i+1} b⊥). Only the r varying directions are kept; no full basis is ever formed.
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
    extra_psi = consumer.weight @ constant
    new_consumer = _right_mul(consumer, q)
    if consumer.psi is not None or bool(extra_psi.abs().max() > 0):
        base = torch.zeros_like(extra_psi) if consumer.psi is None else consumer.psi
        new_consumer = replace(new_consumer, psi=base + extra_psi)
    return (kept, new_consumer), dropped_sigma


def remove_all_constant_directions(model: IsoMLP, rtol: float | None = None, progress=None,
                                   input_radius: float | None = None, output_scale: float | None = None) -> IsoMLP:
    """Remove constant directions in every hidden space, first to last (each removal can add psi to the next layer,
    which is why the order matters). The widths become the rank chain r_1 ≤ n_0, r_{l+1} ≤ r_l + 1.
    What counts as constant: see `remove_constant_directions_accounted` (`rtol` instead: the old numerical rank)."""
    return remove_constant_directions_accounted(model, rtol, progress, input_radius, output_scale)[0]


def remove_constant_directions_accounted(model: IsoMLP, rtol: float | None = None, progress=None,
                                         input_radius: float | None = None,
                                         output_scale: float | None = None) -> tuple[IsoMLP, dict]:
    """`remove_all_constant_directions` and what it dropped (issue 13). A direction of hidden space i with singular
    value σ in [W_i, psi_i] moves z_i by at most σ·|[h; g]|, and so y by at most σ·B_i·L_{i+1} (B_i = input_bound,
    L_{i+1} = lipschitz_after). It is dropped only if that is ≤ EXACT_RTOL × output_scale (the largest |y| on
    the inputs; |x| ≤ input_radius). Returns (model, record): record["bound"] = Σ_i σ_i,dropped·B_i·L_{i+1}, a proven
    bound on |y − y_shrunk| for |x| ≤ input_radius (docs/bounds.md, "Constant directions")."""
    model = as_float64(model)
    if input_radius is None or output_scale is None:
        default_r, default_y = default_scales(model)
        input_radius = default_r if input_radius is None else input_radius
        output_scale = default_y if output_scale is None else output_scale
    scale = max(float(output_scale), torch.finfo(F64).tiny)
    lipschitz = lipschitz_after([layer_norms(layer) for layer in model.layers],
                                [None if layer.o is None else float(layer.o) for layer in model.layers])
    record = constant_record(rtol, scale, input_radius)
    for i in range(len(model.layers) - 1):
        width = model.layers[i].n_out
        floor = None
        b = input_bound(model, i, input_radius)
        if rtol is None:
            floor = constant_floor(b, lipschitz[i], scale)
        model, sigma = _remove_constant(model, i, rtol, floor)
        record["dropped"].append(width - model.layers[i].n_out)
        record["largest_dropped_sigma"].append(sigma)
        record["bound"] += sigma * b * lipschitz[i]
        if progress is not None:
            progress(f"remove constant directions, hidden space {i}")
    if rtol is not None:
        record["bound"] = None  # the old relative rank rule proves nothing about the output
    return model, record
