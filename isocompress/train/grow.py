"""Neurogenesis and auto-neuroadaptation (issue 6): pure functions `IsoMLP -> IsoMLP` on one hidden space.

Hidden space i (0-based) is the output of weight layer i (the producer), read by layer i+1 (the consumer).

`grow` adds k scaffold neurons with zero incoming weights, zero bias and zero psi: their pre-activation is 0 for every
input, so |z|² and g are unchanged and their output g·0 = 0, which makes their (small, random) outgoing weights
contribute nothing. The function is unchanged exactly; the outgoing weights are what lets gradients reach the
scaffolds (dL/dz_j = g · W_next[:, j]ᵀ dL/dz_next), since all-zero scaffolds would never train.

`neuroadapt` keeps a given number of "scaffold" directions, those whose singular value is below a threshold: it grows
when there are too few and removes the smallest when there are too many, replacing each removed direction by its
constant bias value (absorbed into o and the consumer's psi as in `layers.remove_constant_directions`).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from isocompress.core.errors import IsocompressError
from isocompress.core.layers import as_float64, rotate_hidden, varying_matrix
from isocompress.core.model import IsoMLP, Layer
from isocompress.core.primitives import contract_channels, svd64

F64 = torch.float64


def hidden_spaces(model: IsoMLP) -> range:
    return range(len(model.layers) - 1)


def check_hidden_space(model: IsoMLP, i: int, option: str = "hidden space") -> None:
    n_hidden = len(model.layers) - 1
    if not 0 <= i < n_hidden:
        raise IsocompressError(
            f"{option} {i} does not exist; this model (widths {'→'.join(map(str, model.widths))}) has hidden"
            f" spaces 0..{n_hidden - 1}"
        )


def grow(model: IsoMLP, hidden_index: int, k: int, scale: float = 1e-3, seed: int = 0) -> IsoMLP:
    """Add k scaffold neurons to hidden space `hidden_index`; outgoing weights ~ N(0, scale²). Same function."""
    model = as_float64(model)
    check_hidden_space(model, hidden_index)
    if k < 1:
        raise IsocompressError(f"the number of neurons to add must be ≥ 1, got {k}")
    if not scale >= 0 or scale == float("inf"):
        raise IsocompressError(f"the scale of the outgoing weights must be finite and ≥ 0, got {scale}")
    producer = model.layers[hidden_index].as_dense()
    consumer = model.layers[hidden_index + 1].as_dense()
    gen = torch.Generator().manual_seed(seed)
    outgoing = torch.randn(consumer.n_out, k, *consumer.weight.shape[2:], dtype=F64, generator=gen) * scale
    return model.with_layers({
        hidden_index: _append_zero_rows(producer, k),
        hidden_index + 1: replace(consumer, weight=torch.cat([consumer.weight, outgoing], dim=1),
                                  n_in=consumer.n_in + k),
    })


def _append_zero_rows(layer: Layer, k: int) -> Layer:
    def pad(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else torch.cat([t, t.new_zeros((k,) + tuple(t.shape[1:]))])

    return replace(layer, weight=pad(layer.weight), bias=pad(layer.bias), psi=pad(layer.psi))


def direction_strengths(layer: Layer) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, s): the left-partial SVD basis of a producing layer and the singular value of each of its n_out directions
    (descending; zeros where n_out exceeds the rank). With psi the SVD is of [W, psi], since psi also makes a
    direction vary; a direction with s = 0 is then constant for every input."""
    u, s, _ = svd64(varying_matrix(layer), full=True)
    padded = torch.zeros(layer.n_out, dtype=F64)
    padded[: s.numel()] = s[: layer.n_out]
    return u, padded


def count_scaffold(model: IsoMLP, hidden_index: int, threshold: float) -> int:
    """How many directions of hidden space `hidden_index` have singular value below `threshold`."""
    model = as_float64(model)
    check_hidden_space(model, hidden_index)
    _, s = direction_strengths(model.layers[hidden_index])
    return int((s < threshold).sum())


def remove_weakest_directions(model: IsoMLP, hidden_index: int, count: int) -> IsoMLP:
    """Rotate hidden space `hidden_index` to its left-partial SVD basis and remove its `count` weakest directions,
    each replaced by its constant bias value c_j: o += c_j², psi_next += W_next[:, j] c_j. Exact when their singular
    values are 0; otherwise the pre-activation error of direction j is at most σ_j · |(h_prev, g_prev)|."""
    model = as_float64(model)
    check_hidden_space(model, hidden_index)
    n = model.layers[hidden_index].n_out
    if not 0 <= count < n:
        raise IsocompressError(f"cannot remove {count} of the {n} directions of hidden space {hidden_index}; keep ≥ 1")
    if count == 0:
        return model
    u, _ = direction_strengths(model.layers[hidden_index])
    rotated = rotate_hidden(model, hidden_index, u)
    producer, consumer = rotated.layers[hidden_index], rotated.layers[hidden_index + 1]
    keep = n - count
    constant = producer.bias[keep:]
    kept_producer = replace(
        producer,
        weight=producer.weight[:keep],
        bias=producer.bias[:keep],
        psi=None if producer.psi is None else producer.psi[:keep],
        o=producer.o + constant @ constant,
    )
    extra_psi = contract_channels(consumer.weight[:, keep:], constant)
    new_consumer = replace(consumer, weight=consumer.weight[:, :keep], n_in=keep)
    if consumer.psi is not None or bool(extra_psi.abs().max() > 0):
        base = torch.zeros_like(extra_psi) if consumer.psi is None else consumer.psi
        new_consumer = replace(new_consumer, psi=base + extra_psi)
    return rotated.with_layers({hidden_index: kept_producer, hidden_index + 1: new_consumer})


def neuroadapt(model: IsoMLP, threshold: float, target_scaffold: int, hidden_index: int | None = None,
               scale: float = 1e-3, seed: int = 0) -> IsoMLP:
    """Auto-neuroadaptation (the paper's rule): in each hidden space (or only `hidden_index`), keep exactly
    `target_scaffold` directions with singular value below `threshold`: grow scaffold neurons when there are fewer,
    remove the weakest directions when there are more. Growing is exact; removing is exact for singular value 0
    and otherwise changes the function by at most what the removed singular values allow."""
    if target_scaffold < 0:
        raise IsocompressError(f"target_scaffold must be ≥ 0, got {target_scaffold}")
    if not threshold >= 0:
        raise IsocompressError(f"threshold must be ≥ 0, got {threshold}")
    model = as_float64(model)
    spaces = hidden_spaces(model) if hidden_index is None else [hidden_index]
    for i in spaces:
        check_hidden_space(model, i)
        excess = count_scaffold(model, i, threshold) - target_scaffold
        if excess < 0:
            model = grow(model, i, -excess, scale=scale, seed=seed + i)
        elif excess > 0:
            # Keep ≥ 1 direction: a hidden space cannot be empty.
            model = remove_weakest_directions(model, i, min(excess, model.layers[i].n_out - 1))
    return model
