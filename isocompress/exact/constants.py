"""Which directions are constant: the proven output-relative rule of the exact shrink (docs/bounds.md, "Constant
directions"), and the removal of every constant direction of a model under it.
"""

from __future__ import annotations

import math

import torch

from isocompress.core import threads
from isocompress.core.layers import F64, _remove_constant, as_float64, forward_float64, varying_matrix
from isocompress.core.model import DENSE, IsoMLP, Layer
from isocompress.core.primitives import spectral_norm_upper

EXACT_RTOL = 1e-10  # drop a direction only if its proven effect on the output is ≤ this × the output scale
GAIN_LIPSCHITZ = 0.34343  # ≥ sup_m |g'(m)| for tanh (bounds.SLOPE_MAX): g(m(z)) is this-Lipschitz in z
LOG1P_GAIN_LIPSCHITZ = 0.5  # = sup_m |g'(m)| for g = log1p(m)/m, reached as m → 0 (docs/bounds.md, "log1p")
DEFAULT_PROBE_SCALES = (0.01, 1.0, 10.0, 1000.0)  # the inputs the tolerance is set on when the caller gives none


def activation_constants(o: float, sigma: str = "tanh") -> tuple[float, float, float]:
    """(Lipschitz constant of f, Lipschitz constant of g, sup |f|) in z for intrinsic length o (docs/bounds.md,
    "Constant directions"). tanh, o ≥ 0: (1, G', 1). tanh, o < 0, m = sqrt(|o + |z|²|): the radial slope of f is at
    most 1 + 2|o|/3 and its tangential one g ≤ 1, |∇g| = |g'(m)|·|z|/m ≤ G' + (2/3)·sqrt|o| (|g'(m)|/m ≤ 2/3), and
    |f| ≤ sqrt(1 + |o|). log1p, o ≥ 0: (1, 1/2, ∞): f is unbounded (|f| ≤ log(1 + m)), so `activation_sup` bounds
    it from the reachable |z| instead."""
    if sigma == "log1p":
        if o < 0:
            raise ValueError("log1p activations with o < 0 are not supported")
        return 1.0, LOG1P_GAIN_LIPSCHITZ, math.inf
    if o >= 0:
        return 1.0, GAIN_LIPSCHITZ, 1.0
    return 1.0 + 2.0 * abs(o) / 3.0, GAIN_LIPSCHITZ + (2.0 / 3.0) * math.sqrt(abs(o)), math.sqrt(1.0 + abs(o))


def lipschitz_after(norms: list[tuple[float, float]], o: list[float | None],
                    sigmas: list[str] | None = None) -> list[float]:
    """after[i] = L_{i+1} = ∏_{k ≥ i+1} chain_factor(norms[k], o[k − 1]): a Lipschitz constant of z_i ↦ y, for every
    hidden space i at once (suffix products; `norms` and `o` per weight layer, `layer_norms` and its o; on maps, the
    whole map's norm, docs/bounds.md "Convolutional layers")."""
    sigmas = sigmas or ["tanh"] * len(norms)
    after, running = [1.0] * len(norms), 1.0
    for k in range(len(norms) - 1, 0, -1):
        running *= chain_factor(norms[k], o[k - 1], sigmas[k - 1])
        after[k - 1] = running
    return after


def layer_norms(layer: Layer) -> tuple[float, float]:
    """Upper bounds on the operator norms of one layer's weight and psi maps: (‖W‖₂, |psi|) for a dense layer; for a
    convolution (with its pooling), sqrt(overlap)·‖pool‖ times ‖M‖₂ and ‖Ψ‖₂ of the reshaped kernels."""
    spread = layer.geometry.input_op_norm()
    w = float(layer.weight.abs().max()) if layer.kind == "diag" else spectral_norm_upper(layer.matrix())
    return w * spread, psi_norm(layer) * spread


def reachable_step(layer: Layer, basis: torch.Tensor | None, with_image: bool = False):
    """One layer of the chain's norms on reachable subspaces (docs/bounds.md §6, "Reachable subspaces"): `basis` is
    an orthonormal basis of V_{k−1}, the subspace every value of the hidden space layer k reads lies in (None: the
    whole space, or a layer on maps). Returns ((a bound on ‖W_k‖₂ on V_{k−1}, |psi_k|), a basis of V_k, or None
    when V_k may be all of hidden space k). O(n_out·n_in·r) for r = dim V_{k−1}, instead of O(n³). `with_image`:
    W_k Q_{k−1} (W_k itself without a basis) as a third element (a streamed forward in reduced coordinates)."""
    if layer.geometry != DENSE:
        return (layer_norms(layer), None) + ((None,) if with_image else ())
    norms, next_basis, image = _reachable_step(layer, basis)
    return (norms, next_basis) + ((image,) if with_image else ())


def _reachable_step(layer: Layer, basis: torch.Tensor | None):
    psi = psi_norm(layer)
    if basis is None:
        image, w = layer.dense_weight(), layer_norms(layer)[0]
    else:
        with threads.for_matrix(layer.n_out, layer.n_in):
            image = layer.apply_weight(basis.T).T  # W_k Q_{k−1}: n_out × r
        w = restricted_norm(image, layer)
    generators = image.shape[1] + 1 + (layer.psi is not None)
    if layer.is_output or generators >= layer.n_out:
        return (w, psi), None, image
    columns = [image, layer.bias[:, None]] + ([] if layer.psi is None else [layer.psi[:, None]])
    with threads.for_matrix(layer.n_out, generators):
        # Householder QR, no rank truncation: Q's columns span every generator (V_k = W_k V_{k−1} + span(b_k, psi_k))
        return (w, psi), torch.linalg.qr(torch.cat(columns, dim=1), mode="reduced")[0], image


def restricted_norm(image: torch.Tensor, layer: Layer) -> float:
    """‖W Q‖₂ (rounded up as spectral_norm_upper) plus the float64 allowance of §6 "Reachable subspaces" for the
    product W Q and the basis Q: 2·(n_in + r)·eps·sqrt(r)·‖W‖_F."""
    r = image.shape[1]
    eps = torch.finfo(F64).eps
    frobenius = float(torch.linalg.vector_norm(layer.weight))
    return spectral_norm_upper(image) + 2.0 * (layer.n_in + r) * eps * math.sqrt(r) * frobenius


def reachable_norms(layers) -> list[tuple[float, float]]:
    """`layer_norms` of every layer with each dense weight's norm taken on the reachable subspace of its input
    (`reachable_step`): the same or smaller, and still a valid Lipschitz chain (docs/bounds.md §6)."""
    out, basis = [], None
    for layer in layers:
        norms, basis = reachable_step(layer, basis)
        out.append(norms)
    return out


def is_constant_space(producer: Layer) -> bool:
    """Whether a hidden space's varying matrix [M, Ψ] is exactly zero (every σ = 0): one direction is still kept,
    which need not lie in the reachable subspace, so the chain after it falls back to whole-space norms (§6)."""
    return not bool(varying_matrix(producer.as_dense()).abs().max() > 0)


def psi_norm(layer: Layer) -> float:
    """‖Ψ‖₂ of a layer's reshaped psi kernel (|psi| for a dense layer's vector; 0 without psi)."""
    if layer.psi is None:
        return 0.0
    if layer.psi.dim() == 1:
        return torch.linalg.vector_norm(layer.psi).item()
    return spectral_norm_upper(layer.psi_matrix())


def chain_factor(norms: tuple[float, float], o_before: float, sigma: str = "tanh") -> float:
    """‖W_k‖₂·L_f + |psi_k|·L_g: how much weight layer k can amplify a change of the pre-activation before it (whose
    activation has intrinsic length `o_before`)."""
    lip_f, lip_g, _ = activation_constants(o_before, sigma)
    return norms[0] * lip_f + norms[1] * lip_g


def activation_sup(model: IsoMLP, input_radius: float) -> list[float]:
    """For every hidden space, a bound on |h_p|, one position's activation, for |x| ≤ input_radius: sup|f| where it
    is finite (tanh); for log1p, log(1 + m_max) with |z_p| ≤ ‖M‖₂·|window of h| + |b| + ‖Ψ‖₂·|window of g| carried
    from the input (a window of k taps of a map whose positions are ≤ s has norm ≤ sqrt(k)·s, and ≤ the map's norm)."""
    sups, h_window = [], float(input_radius)
    layers = model.layers
    for i, layer in enumerate(layers[:-1]):
        o = float(layer.o)
        sup_f = activation_constants(o, layer.sigma)[2]
        if math.isfinite(sup_f):
            sups.append(sup_f)
        else:
            w, p = layer_norms(layer)
            spread = layer.geometry.input_op_norm()
            z_max = w / spread * h_window + float(torch.linalg.vector_norm(layer.bias))
            z_max += p / spread * math.sqrt(layer.geometry.taps) if layer.psi is not None else 0.0
            sups.append(math.log1p(math.sqrt(max(o, 0.0) + z_max * z_max)))
        nxt = layers[i + 1].geometry
        h_window = sups[-1] * math.sqrt(min(nxt.taps, nxt.in_positions) if nxt.kernel else nxt.in_positions)
    return sups


def input_bound(model: IsoMLP, i: int, input_radius: float, sups: list[float] | None = None) -> float:
    """A bound on the norm of what weight layer i reads, the windows of [pool(h); pool(g)] stacked over its output
    positions: ‖pool‖·sqrt(overlap)·|[h; g]| with |x| ≤ R for i = 0, and after, |h_p| ≤ `activation_sup`, g ≤ 1 at
    each of the P positions (for a dense layer: |[h; g]| itself)."""
    layer = model.layers[i]
    spread = layer.geometry.input_op_norm()
    if i == 0:
        return float(input_radius) * spread
    sup_h = (activation_sup(model, input_radius) if sups is None else sups)[i - 1]
    whole = math.sqrt(layer.geometry.in_positions) * (math.hypot(sup_h, 1.0) if layer.psi is not None else sup_h)
    return whole * spread


def layer_input_bound(i: int, input_radius: float, o_before: float | None, has_psi: bool) -> float:
    """`input_bound` of a dense tanh layer from its scalars alone (the streamed shrink, which holds one layer)."""
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
    x = torch.cat([torch.randn(64, *model.input_shape, dtype=F64, generator=gen) * s for s in DEFAULT_PROBE_SCALES])
    y = forward_float64(model, x)
    return float(x.flatten(1).norm(dim=1).max()), float(y.flatten(1).norm(dim=1).max())


def remove_all_constant_directions(model: IsoMLP, rtol: float | None = None, progress=None,
                                   input_radius: float | None = None, output_scale: float | None = None) -> IsoMLP:
    """Remove constant directions in every hidden space, first to last (each removal can add psi to the next layer,
    which is why the order matters). The widths become the rank chain r_1 ≤ n_0, r_{l+1} ≤ r_l + 1.
    What counts as constant: see `remove_constant_directions_accounted` (`rtol` instead: the old numerical rank)."""
    return remove_constant_directions_accounted(model, rtol, progress, input_radius, output_scale)[0]


def remove_constant_directions_accounted(model: IsoMLP, rtol: float | None = None, progress=None,
                                         input_radius: float | None = None,
                                         output_scale: float | None = None) -> tuple[IsoMLP, dict]:
    """`remove_all_constant_directions` and what it dropped. A direction of hidden space i with singular value σ in
    [M_i, Ψ_i] moves z_i by at most σ·|[h; g]| (on maps, σ times the norm of the windows read), and so y by at most
    σ·B_i·L_{i+1} (B_i = input_bound,
    L_{i+1} = lipschitz_after). It is dropped only if that is ≤ EXACT_RTOL × output_scale (the largest |y| on
    the inputs; |x| ≤ input_radius). Returns (model, record): record["bound"] = Σ_i σ_i,dropped·B_i·L_{i+1}, a proven
    bound on |y − y_shrunk| for |x| ≤ input_radius (docs/bounds.md, "Constant directions")."""
    model = as_float64(model)
    if input_radius is None or output_scale is None:
        default_r, default_y = default_scales(model)
        input_radius = default_r if input_radius is None else input_radius
        output_scale = default_y if output_scale is None else output_scale
    scale = max(float(output_scale), torch.finfo(F64).tiny)
    layers = model.layers
    norms, o = reachable_norms(layers), [None if layer.o is None else float(layer.o) for layer in layers]
    lipschitz = lipschitz_after(norms, o, [layer.sigma for layer in layers])
    sups = activation_sup(model, input_radius)
    record = constant_record(rtol, scale, input_radius)
    for i in range(len(layers) - 1):
        width = model.layers[i].n_out
        floor = None
        b = input_bound(model, i, input_radius, sups)
        if rtol is None and i + 2 < len(layers) and is_constant_space(model.layers[i]):
            norms[i + 2:] = [layer_norms(layer) for layer in layers[i + 2:]]  # §6: whole-space norms after it
            lipschitz = lipschitz_after(norms, o, [layer.sigma for layer in layers])
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
