"""The exact shrink of a whole model: remove every constant direction, then store every other layer diagonal
(the paper's "50%" form). The same function, up to the proven EXACT_RTOL-relative change of the constant rule.
"""

from __future__ import annotations

from typing import Callable

import torch

from isocompress.core.layers import as_float64, diagonal_savings, diagonalisable_layers, diagonalise_full
from isocompress.core.measure import output_scale, sample_norms
from isocompress.core.model import IsoMLP
from isocompress.exact.constants import remove_constant_directions_accounted


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


# --- pure verbs on models ----------------------------------------------------------------------------------------
EXACT_PROBE_RTOL = 1e-8  # an exact run whose probe error exceeds this × max |y| fails (the bound is ~1e-10×)


def shrink_exact(model: IsoMLP, progress: Callable[[str], None] | None = None) -> IsoMLP:
    """Remove every constant direction, then store every other layer diagonal. The same function up to a proven
    ≤ EXACT_RTOL-relative change on the default probe domain (see `shrink_exact_accounted`)."""
    return shrink_exact_accounted(model, progress=progress)[0]


def shrink_exact_accounted(model: IsoMLP, progress: Callable[[str], None] | None = None,
                           x: torch.Tensor | None = None) -> tuple[IsoMLP, dict]:
    """`shrink_exact` and the record of what it dropped (layers.remove_constant_directions_accounted): the
    tolerance, the output scale and input radius it is relative to (those of x when given), and the proven bound."""
    model = as_float64(model)
    radius = scale = None
    if x is not None:
        radius = float(sample_norms(x.to(torch.float64)).max())
        scale = output_scale(model, x)
    model, record = remove_constant_directions_accounted(model, progress=progress, input_radius=radius,
                                                         output_scale=scale)
    return alternate_diagonalise(model, progress=progress), record


def exact_steps(model: IsoMLP) -> int:
    """How many progress steps `shrink_exact` reports (for a progress bar's total)."""
    return (len(model.layers) - 1) + len(choose_alternating_layers(model))
