"""Which directions are constant: the proven output-relative rule of the exact shrink (docs/bounds.md, "Constant
directions"), and the removal of every constant direction of a model under it.
"""

from __future__ import annotations

import math

import torch

from isocompress.core.layers import F64, _remove_constant, as_float64, forward_float64
from isocompress.core.model import IsoMLP, Layer
from isocompress.core.primitives import spectral_norm_upper

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
