"""Lossy pruning to a parameter budget (or an error limit) with three kinds of error bound (issue 4).

Pipeline: exact removal of constant directions (float64) → rounds of {rotate every hidden space to its scoring basis,
score every direction, remove the cheapest directions per stored parameter saved} → alternating full
diagonalisation (exact). A removed direction j of hidden space i is replaced by a constant c_j and absorbed exactly as
in `layers.remove_constant_directions`: o_i += c_j², psi_{i+1} += W_{i+1}[:, j] c_j (docs/math.md, "Neurodegeneration").

The work is done on the *embedded* form (`State`): the full-width network in the current bases, a mask of removed
coordinates and their constants; `materialize` turns it into the compact model, `bounds.certified_bound` reads it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from types import SimpleNamespace

import torch

from isocompress.bounds import branch
from isocompress.bounds import certified as bounds
from isocompress.bounds import local as local_bounds
from isocompress.core import threads
from isocompress.core.errors import BudgetUnreachable, CheckFailed, IsocompressError
from isocompress.core.geometry import Geometry
from isocompress.core.layers import as_float64
from isocompress.core.measure import output_scale, probe_inputs, sample_norms
from isocompress.core.model import DENSE, IsoMLP, Layer, channel_axis, positions_of
from isocompress.core.parsing import radius_fraction
from isocompress.core.primitives import contract_channels, rotate_columns, rotate_rows
from isocompress.core.progress import progress_bar
from isocompress.exact.constants import remove_constant_directions_accounted
from isocompress.exact.shrink import alternate_diagonalise, choose_alternating_layers

F64 = torch.float64
ROUND_FRACTION = 0.25  # each round removes about this share of the parameters still over budget
FINAL_ROUND_SHARE = 0.02  # ... and everything left once the excess is below this share of the original size
ROUNDING_ALLOWANCE = 1e-10  # float64 rounding of the exact steps, relative to a bound on |y| (docs/bounds.md, §5)
DOWNSTREAM_WEIGHT = 0.0  # exponent of the downstream Lipschitz product in the data-free cost (0: the paper's plain σ)


@dataclass
class State:
    layers: list[Layer]  # full width, dense, float64: the exact network in the current bases
    removed: list[torch.Tensor]  # per hidden space: bool mask of removed coordinates
    consts: list[torch.Tensor]  # per hidden space: the constants replacing the removed coordinates
    scores: list[list[float]]  # per hidden space: score of each removed direction, in removal order
    constant_bound: float = 0.0  # D: proven bound on what the exact step before pruning dropped (issue 13)

    @classmethod
    def of(cls, model: IsoMLP, constant_bound: float = 0.0) -> "State":
        layers = [layer.as_dense() for layer in as_float64(model).layers]
        hidden = [layer.n_out for layer in layers[:-1]]
        return cls(layers, [torch.zeros(n, dtype=torch.bool) for n in hidden],
                   [torch.zeros(n, dtype=F64) for n in hidden], [[] for _ in hidden], constant_bound)

    def copy(self) -> "State":
        return State(list(self.layers), [m.clone() for m in self.removed], [c.clone() for c in self.consts],
                     [list(s) for s in self.scores], self.constant_bound)

    def kept(self, i: int) -> torch.Tensor:
        return (~self.removed[i]).nonzero().flatten()


def materialize(state: State) -> IsoMLP:
    """The compact model: kept rows/columns only; constants absorbed into o and the next layer's psi."""
    out = []
    n_hidden = len(state.removed)
    for l, layer in enumerate(state.layers):
        rows = state.kept(l) if l < n_hidden else torch.arange(layer.n_out)
        w = layer.weight[rows]
        psi = None if layer.psi is None else layer.psi[rows]
        cols = torch.arange(layer.n_in)
        if l > 0:
            gone = state.removed[l - 1]
            cols = state.kept(l - 1)
            if bool(gone.any()):
                extra = contract_channels(w[:, gone], state.consts[l - 1][gone])
                psi = extra if psi is None else psi + extra
        o = None
        if l < n_hidden:
            c = state.consts[l][state.removed[l]]
            o = layer.o + c @ c
        out.append(replace(layer, weight=w[:, cols], bias=layer.bias[rows], n_in=int(cols.numel()), psi=psi, o=o))
    return IsoMLP(out)


def rotate_kept(state: State, i: int, q: torch.Tensor) -> None:
    """Rotate the kept block of hidden space i by the orthogonal q (exact, docs/math.md "Symmetry"); removed coordinates
    stay put."""
    idx = state.kept(i)
    r = torch.eye(state.layers[i].n_out, dtype=F64)
    r[idx[:, None], idx] = q
    prod, cons = state.layers[i], state.layers[i + 1]
    state.layers[i] = replace(prod, weight=rotate_rows(r.T, prod.weight), bias=r.T @ prod.bias,
                              psi=None if prod.psi is None else rotate_rows(r.T, prod.psi))
    state.layers[i + 1] = replace(cons, weight=rotate_columns(cons.weight, r))


# --- parameter arithmetic of the final stored form ------------------------------------------------------------------
def stored_params(widths: list[int], has_psi: list[bool], geometries: list[Geometry] | None = None) -> int:
    """num_params() of the model after alternating diagonalisation, from its widths (and layer geometries) alone."""
    geometries = geometries or [DENSE] * (len(widths) - 1)
    shapes = [SimpleNamespace(n_in=a, n_out=b, geometry=g) for a, b, g in zip(widths[:-1], widths[1:], geometries)]
    diag = set(choose_alternating_layers(SimpleNamespace(layers=shapes)))
    total = 0
    for l, s in enumerate(shapes):
        taps = s.geometry.taps
        total += (min(s.n_in, s.n_out) if l in diag else s.n_in * s.n_out * taps) + s.n_out
        total += s.n_out * taps if has_psi[l] else 0
        total += 1 if l < len(shapes) - 1 else 0
    return total


def _shape(state: State) -> tuple[list[int], list[bool], list[Geometry]]:
    widths = [state.layers[0].n_in] + [int((~m).sum()) for m in state.removed] + [state.layers[-1].n_out]
    psi = [layer.psi is not None or (l > 0 and bool(state.removed[l - 1].any())) for l, layer in enumerate(state.layers)]
    return widths, psi, [layer.geometry for layer in state.layers]


def current_params(state: State) -> int:
    return stored_params(*_shape(state))


def smallest_params(state: State) -> int:
    """Every hidden space keeps one direction; every layer after the first may carry psi."""
    widths, _, geometries = _shape(state)
    n = len(widths) - 1
    return stored_params([widths[0]] + [1] * (n - 1) + [widths[-1]], [False] + [True] * (n - 1), geometries)


def savings(state: State) -> list[int]:
    """Stored parameters saved by removing one more direction from each hidden space."""
    widths, psi, geometries = _shape(state)
    now = stored_params(widths, psi, geometries)
    out = []
    for i in range(len(state.removed)):
        w2 = list(widths)
        w2[i + 1] -= 1
        p2 = list(psi)
        p2[i + 1] = True
        out.append(max(now - stored_params(w2, p2, geometries), 1))
    return out


# --- scoring bases ------------------------------------------------------------------------------------------------
def rotate_principal(state: State, x: torch.Tensor) -> None:
    """Data-aware basis: principal axes of each hidden space's pre-activations on the calibration data (on maps, every
    position of every input is one sample of the channel vector)."""
    with torch.no_grad():
        _, zs, _ = materialize(state).forward_with_hidden(x)
    for i, z in enumerate(zs):
        z = positions_of(z, state.layers[i].geometry.out_spatial)
        centred = z - z.mean(0)
        with threads.for_matrix(*centred.shape):
            _, vecs = torch.linalg.eigh(centred.T @ centred)
        rotate_kept(state, i, vecs.flip(-1))


def data_aware_costs(state: State, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """First-order output error of replacing each direction by its calibration mean μ_j:
    cost_j² = mean_x Σ_k (Σ_p ∂y_k/∂z_{j,p} (z_{j,p} − μ_j))², p over positions (one for an MLP, where this is
    mean_x |∂y/∂z_j|² (z_j − μ_j)²). Returns (costs, means) per hidden space."""
    x = x.detach().clone().requires_grad_(True)
    y, zs, _ = materialize(state).forward_with_hidden(x)
    y = y.reshape(y.shape[0], -1)
    spatials = [layer.geometry.out_spatial for layer in state.layers[:-1]]
    means = [positions_of(z.detach(), sp).mean(0) for z, sp in zip(zs, spatials)]
    offsets = [z.detach() - mu.reshape(-1, *([1] * len(sp))) for z, mu, sp in zip(zs, means, spatials)]
    sq = [torch.zeros(z.shape[0], z.shape[channel_axis(sp)], dtype=z.dtype) for z, sp in zip(zs, spatials)]
    for k in range(y.shape[1]):
        grads = torch.autograd.grad(y[:, k].sum(), zs, retain_graph=k < y.shape[1] - 1)
        for s, g, d, sp in zip(sq, grads, offsets, spatials):
            s += ((g * d).sum(dim=tuple(range(-len(sp), 0))) if sp else g * d) ** 2
    return [s.mean(0).sqrt() for s in sq], means


def rotate_singular(state: State) -> None:
    """Data-free basis: left singular vectors of each hidden space's producing layer (the paper's rule)."""
    compact = materialize(state)
    for i in range(len(state.removed)):
        matrix = compact.layers[i].matrix()
        with threads.for_matrix(*matrix.shape):
            u, _, _ = torch.linalg.svd(matrix, full_matrices=True)
        rotate_kept(state, i, u)


def data_free_costs(state: State, radius: float | None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """cost_j = (σ_j ρ + |psi_j| δg) × (Π_{l>i} ‖W_l‖₂)^DOWNSTREAM_WEIGHT: the certified bound's introduced error of
    direction j (docs/bounds.md, eq. 3). Weighting by the downstream Lipschitz product (weight 1) over-protected early
    layers on a trained digits model (3% budget: 36% accuracy against 95% unweighted), so it is off by default.
    Constants: bias + psi·(mid gain) (the paper's rule, made psi-aware).

    radius None (no input domain): `scale_free_costs`, no radius enters, so a probe set far outside any data cannot
    make every layer look saturated (issue 10: widths collapsed to 1 at a 2% budget)."""
    compact = materialize(state)
    layers = compact.layers
    if radius is None:
        return scale_free_costs(layers, len(state.removed))
    balls = bounds.reachable_balls(list(layers), radius)
    norms = [bounds.spectral_norm(layer.matrix()) for layer in layers]
    costs, consts = [], []
    for i in range(len(state.removed)):
        layer = layers[i]
        if i == 0:
            rho, g_mid, g_half = radius, 0.0, 0.0
        else:
            rho, g_mid, g_half = balls[i - 1].h_radius, balls[i - 1].g_mid, balls[i - 1].g_half
        spread = layer.geometry.input_op_norm()
        cost = torch.linalg.vector_norm(layer.matrix(), dim=1) * rho * spread
        const = layer.bias.clone()
        if layer.psi is not None:
            psi = layer.psi_matrix()
            cost = cost + torch.linalg.vector_norm(psi, dim=1) * largest(g_half) * spread
            const = const + psi.sum(dim=1) * average(g_mid)
        costs.append(cost * math.prod(norms[i + 1:]) ** DOWNSTREAM_WEIGHT)
        consts.append(const)
    return costs, consts


def scale_free_costs(layers: list[Layer], n_hidden: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """No input domain (docs/bounds.md, §7): in the left-singular basis of its producing layer, direction j of hidden
    space i costs σ_j + |psi_j| g(√o_{i−1})/2 (the half-width of the range of z_j = σ_j v_j·h + b_j + psi_j g over
    |h| < 1, g ∈ (0, g(√o_{i−1})]) and is replaced by the paper's constant b*_j = b_j (psi_j g dropped: exact in the
    saturated limit |h| → 1, g → 0 that σ_j · 1 describes). The first hidden space's input is taken at unit scale, as
    the paper's rule does (σ_j alone). On maps every position is taken at unit scale (|x_p|, |h_p| ≤ 1, as the paper's
    rule takes the vector): σ_j and |Ψ_j| (rows of the reshaped kernels) are scaled by the proven bound on the whole
    map of the direction's pre-activation, `unit_map_norm` — which ranks the channels of every layer on one scale (with
    sqrt(k) per position alone, a first conv's directions looked cheapest and were cut to 1–4 channels at a 20%
    budget: benchmarks/bench_cnn.py)."""
    costs, consts = [], []
    for i in range(n_hidden):
        layer = layers[i]
        scale = unit_map_norm(layer.geometry)
        cost = torch.linalg.vector_norm(layer.matrix(), dim=1) * scale  # rows are σ_j v_jᵀ
        if layer.psi is not None and i > 0:
            gain = bounds.gain(math.sqrt(max(float(layers[i - 1].o), 0.0)))
            cost = cost + torch.linalg.vector_norm(layer.psi_matrix(), dim=1) * scale * gain / 2.0
        costs.append(cost)
        consts.append(layer.bias.clone())
    return costs, consts


def unit_map_norm(geometry) -> float:
    """The proven bound on the whole map of one direction's pre-activation per unit of σ_j when every position the layer
    reads has norm ≤ 1: ‖pool‖·sqrt(overlap)·sqrt(P_in) (docs/bounds.md §6b). 1 for a dense layer on vectors."""
    return geometry.input_op_norm() * math.sqrt(max(geometry.in_positions, 1))


def largest(value) -> float:
    """The largest entry of a per-position quantity (a float for vectors, a tensor for maps)."""
    return float(value.max()) if isinstance(value, torch.Tensor) else float(value)


def average(value) -> float:
    return float(value.mean()) if isinstance(value, torch.Tensor) else float(value)


def score_round(state: State, basis: str, x: torch.Tensor | None, radius: float | None):
    if basis == "data-aware":
        rotate_principal(state, x)
        return data_aware_costs(state, x)
    rotate_singular(state)
    return data_free_costs(state, radius)


# --- selection and removal ----------------------------------------------------------------------------------------
def select(state: State, costs: list[torch.Tensor], goal: int) -> list[tuple[int, int, float]]:
    """Cheapest (hidden space, compact index, cost) removals by squared error cost per stored parameter saved, until
    about `goal` parameters are saved. Every hidden space keeps its most costly direction."""
    saved = savings(state)
    candidates = []
    for i, cost in enumerate(costs):
        keep = int(cost.argmax())
        candidates += [(float(c) ** 2 / saved[i], i, j, float(c)) for j, c in enumerate(cost.tolist()) if j != keep]
    candidates.sort()
    chosen, total = [], 0
    for _, i, j, c in candidates:
        if total >= goal:
            break
        chosen.append((i, j, c))
        total += saved[i]
    return chosen


def remove(state: State, chosen, consts: list[torch.Tensor]) -> None:
    for i in range(len(state.removed)):
        picks = [(j, c) for (h, j, c) in chosen if h == i]
        if not picks:
            continue
        idx = state.kept(i)
        for j, c in picks:
            state.consts[i][idx[j]] = consts[i][j]
            state.scores[i].append(c)
        state.removed[i][idx[[j for j, _ in picks]]] = True


def prune_round(state: State, basis: str, x, radius: float, goal: int) -> int:
    costs, consts = score_round(state, basis, x, radius)
    chosen = select(state, costs, goal)
    remove(state, chosen, consts)
    return len(chosen)


def prune_to_target(state: State, target: int, basis: str, x, radius: float, step=None) -> State:
    total = current_params(state)
    while current_params(state) > target:
        excess = current_params(state) - target
        # near the target one direction per round, rescored each time: a round's estimated savings drift as widths
        # shrink, and a batch overshot the budget by up to 20% on small models (issue 10)
        goal = 1 if excess <= FINAL_ROUND_SHARE * total else max(int(ROUND_FRACTION * excess), 1)
        trial = state.copy()
        while prune_round(trial, basis, x, radius, goal) and current_params(trial) < target and goal > 1:
            # the round's per-direction savings are estimated one direction at a time; where removing many at once
            # saves far more (a layer turning diagonal), it lands below the budget: retry it smaller
            trial, goal = state.copy(), goal // 2
        if current_params(trial) == current_params(state):
            break
        state = trial
        if step is not None:
            step(f"{current_params(state):,} parameters", current_params(state))
    return state


def prune_to_error(state: State, limit: float, basis: str, x, radius: float, step=None) -> State:
    """As far as possible with the certified bound ≤ limit."""
    return prune_while(state, lambda trial: certify(trial, radius) <= limit, basis, x, radius, step)


def deployed_rounding(state: State, options, domain) -> float:
    """The deployed files' proven rounding term (docs/bounds.md §5b) of the model `state` holds; 0 where none is
    derived. `domain`: (radius, centres, eps) of deployed_term."""
    model = alternate_diagonalise(materialize(state))
    return deployed_term(model, getattr(options, "precision", None), *domain).get("bound") or 0.0


def check_error_reachable(state: State, options, radius: float, domain) -> float:
    """A --max-error below the certified error of the exactly shrunk model's files is an input error, before any
    pruning: that error is the least any pruned model can have. Returns the files' rounding term of that model."""
    rounding = deployed_rounding(state, options, domain)
    reachable = certify(state, radius) + state.constant_bound + rounding
    if reachable > options.max_error:
        files = (f", {rounding:.3g} of it the deployed files' proven rounding term (docs/bounds.md §5b; float64 files:"
                 " --dtype float64)") if rounding else ""
        raise IsocompressError(
            f"--max-error {options.max_error:.4g} cannot be met: the smallest certified error reachable is"
            f" {reachable:.4g} (the exactly shrunk model, |x| ≤ {radius:.4g}{files}); give --max-error"
            f" {reachable:.3g} or more")
    return rounding


def check_max_error(certified: dict, options) -> None:
    """The promise of --max-error, kept: a pruned model whose certified bound (deployed files included) ends above
    the limit is an error, not a result (prune_to_deployed_error retries; this is its last word)."""
    value = certified.get("max_abs")
    if options.max_error is not None and value is not None and value > options.max_error:
        raise IsocompressError(f"--max-error {options.max_error:.4g} could not be met: the pruned model is certified"
                               f" to {value:.4g} (deployed files included); give a larger --max-error or --dtype"
                               " float64")


def prune_to_deployed_error(state: State, options, basis: str, x, domain, step=None, margin=None) -> State:
    """--max-error bounds the deployed files (docs/bounds.md §5b): prune to the limit less their rounding term, taken
    from the exact-shrunk model (`margin`, if already computed) and, where the pruned model's came out larger, from
    that one (each retry starts from the same state). `domain`: (radius, centres, eps) of deployed_term."""
    limit = max(options.max_error - state.constant_bound, 0.0)
    margin = deployed_rounding(state, options, domain) if margin is None else margin
    for _ in range(4):
        pruned = prune_to_error(state, max(limit - margin, 0.0), basis, x, domain[0], step)
        final = deployed_rounding(pruned, options, domain)
        if final <= margin:  # certified ≤ limit − margin, so certified + final ≤ limit
            return pruned
        margin = final
    return pruned


def prune_while(state: State, acceptable, basis: str, x, radius, step=None) -> State:
    """Prune in rounds as long as `acceptable(state)` holds: rounds that overshoot are retried at half the size."""
    goal = max(int(ROUND_FRACTION * current_params(state)), 1)
    while goal >= 1 and current_params(state) > smallest_params(state):
        trial = state.copy()
        if prune_round(trial, basis, x, radius, goal) == 0:
            break
        if acceptable(trial):
            state = trial
            if step is not None:
                step(f"{current_params(state):,} parameters", current_params(state))
        else:
            goal //= 2
    return state


def certify(state: State, radius: float) -> float:
    raw = bounds.certified_bound(state.layers, state.removed, state.consts, radius)["bound"]
    return raw + rounding_allowance(state)


def rounding_allowance(state: State) -> float:
    """A float64 allowance for the exact steps, relative to |y| ≤ ‖W_L‖ + |b_L| + |psi_L| (hidden |h| < 1; on maps,
    |y| ≤ ‖W_L‖·sqrt(P_in) + |b_L|·sqrt(P_out) + ‖Ψ_L‖·sqrt(P_in), since |h_p| < 1 and g ≤ 1 at each position)."""
    last = state.layers[-1]
    inside, outside = math.sqrt(last.geometry.in_positions), math.sqrt(last.geometry.out_positions)
    return ROUNDING_ALLOWANCE * (bounds.op_norm(last) * inside + bounds.vec_norm(last.bias) * outside
                                 + bounds.psi_op_norm(last) * inside)


TANH_ONLY = ("no certified bound computed: the certified bounds are derived for tanh activations (docs/bounds.md);"
             " this network has a log1p activation")
LOCAL_MLP_ONLY = ("no local certificates: they are computed for MLPs (vectors) with tanh activations; for this network"
                  " the global certified bound over |x| ≤ R and the measured errors are reported")


def certifiable(model: IsoMLP) -> bool:
    """Whether the global certified bound applies: every hidden activation is tanh (docs/bounds.md, §3)."""
    return all(layer.sigma == "tanh" for layer in model.layers[:-1])


def locally_certifiable(model: IsoMLP) -> bool:
    """Whether local certificates apply: a tanh MLP (their residues are derived for vectors, docs/bounds.md §8)."""
    return certifiable(model) and bounds.is_vector_network(list(model.layers))


# --- the entry point ----------------------------------------------------------------------------------------------
NO_DOMAIN = ("no certified bound computed: it needs an input domain (give --input-radius R, or --calibration FILE for"
             " |x| ≤ its largest norm); --certify-radius with calibration data gives local certificates")


def resolve_basis(basis: str, calibration) -> str:
    if basis == "auto":
        return "data-aware" if calibration is not None else "data-free"
    if basis == "data-aware" and calibration is None:
        raise IsocompressError("--basis data-aware needs --calibration FILE (inputs to compute principal axes on)")
    return basis


def resolve_radius(options, calibration) -> tuple[float | None, str]:
    """The global bound's domain |x| ≤ R: --input-radius, else the largest calibration norm, else none (issue 10: a
    radius made up from probe inputs made every layer look saturated and its bound useless)."""
    if options.input_radius is not None:
        return float(options.input_radius), "--input-radius"
    if calibration is not None:
        return float(sample_norms(calibration).max()), "largest calibration-input norm"
    return None, "none"


def resolve_certify_radius(options, centres, points: str = "certified points") -> tuple[float | None, str]:
    """The primary ε of the local certificates (the first of `resolve_certify_radii`) and where it came from."""
    radii = resolve_certify_radii(options, centres, points)
    return (radii[0][0], radii[0][1]) if radii else (None, "none")


def resolve_certify_radii(options, centres, points: str = "certified points") -> list[tuple[float, str, object]]:
    """(ε, where it came from, the value as given) for each radius of --certify-radius, in the order given (default
    DEFAULT_RADIUS_FRACTION): an absolute radius as it is, a percentage of the centres' median norm. A median norm of
    0 (all-zero points) makes every percentage 0: an input error naming the fix, never a made-up ε."""
    if centres is None:
        return []
    spec = options.certify_radius
    default = f"{100 * local_bounds.DEFAULT_RADIUS_FRACTION:g}%"
    specs = spec if isinstance(spec, tuple) else (default if spec is None else spec,)
    median = float(sample_norms(centres).median())
    out = []
    for given in specs:
        fraction = radius_fraction(given)
        if fraction is None:
            out.append((float(given), "--certify-radius", given))
            continue
        if not median > 0:
            raise IsocompressError(
                f"--certify-radius {given}{' (the default)' if spec is None else ''} is a share of the median input"
                f" norm of the {points}, which is 0 (all-zero or mostly zero points): no ball to certify; give"
                " --certify-radius EPS as an absolute radius (e.g. 0.1)")
        source = f"{given} of the median input norm of the certified points ({median:.4g})"
        out.append((fraction * median, source, given))
    return out


def resolve_target(budget: float, original_params: int, smallest: int) -> int:
    target = int(math.floor(budget * original_params)) if budget <= 1 else int(budget)
    if target < smallest:
        raise BudgetUnreachable(
            f"--budget {budget:g} ({target:,} parameters) is unreachable: the smallest reachable size is {smallest:,}"
            f" parameters ({smallest / original_params:.4%}); use --budget {smallest} or more")
    return target


def local_certificates(state: State, centres: torch.Tensor, eps: float, extra: float = 0.0) -> dict:
    """Proven per-point bounds and top-1 certificates (isocompress.bounds.local, docs/bounds.md §8); `extra` is added
    to the allowance (the deployed files' rounding term, §5b)."""
    # allowance: rounding, plus D (the exact step's drop, proven over these balls too: exact_step): β grows by it and
    # each margin shrinks by 2D, so the certificates compare with the original network, not the exact-shrunk one.
    return local_bounds.local_bounds(state.layers, state.removed, state.consts, centres, eps,
                                     allowance=rounding_allowance(state) + state.constant_bound + extra)


def certified_fraction(state: State, centres: torch.Tensor, eps: float) -> float:
    return float(local_certificates(state, centres, eps)["top1"].double().mean())


def prune_to_certified(state: State, limit: float, basis: str, x, radius, centres, eps: float, step=None) -> State:
    """As far as possible with the certified top-1 fraction at radius ε ≥ limit (issue 10, --min-certified-top1)."""
    return prune_while(state, lambda trial: certified_fraction(trial, centres, eps) >= limit, basis, x, radius, step)


def prune_to_budget(original: IsoMLP, options, calibration=None, labels=None, progress: bool = False,
                    search_restarts: int = 48, search_steps: int = 150, certify_data=None, test_data=None,
                    test_labels=None):
    """Prune to `options.budget` (fraction ≤ 1 or count > 1), as far as `options.max_error` (certified) allows, or
    as far as `options.min_certified_top1` (local certificates) allows. Returns (pruned model, report dict)."""
    started = time.perf_counter()
    original = as_float64(original)
    basis = resolve_basis(options.basis, calibration)
    x = None if calibration is None else calibration.to(F64)
    radius, radius_source = resolve_radius(options, x) if certifiable(original) else (None, TANH_ONLY)
    centres = certify_data.to(F64) if certify_data is not None and locally_certifiable(original) else x
    centres = centres if locally_certifiable(original) else None
    points = "certify data" if certify_data is not None else "calibration data"
    radii = resolve_certify_radii(options, centres, points)
    eps, eps_source = (radii[0][0], radii[0][1]) if radii else (None, "none")
    goal_check(options, radius, centres, original)
    # D is proven over the largest ball of the curve, so it covers every ε (each entry's allowance uses it)
    exact, constant = exact_step(original, x, radius, centres, max((r[0] for r in radii), default=None))
    state = State.of(exact, constant_bound=constant["bound"] or 0.0)
    if options.min_certified_top1 is not None:
        start = certified_fraction(state, centres, eps)
        if start < options.min_certified_top1:
            raise IsocompressError(
                f"--min-certified-top1 {options.min_certified_top1:.2%} cannot be met: even the exactly shrunk model"
                f" (nothing pruned) is certified for only {start:.2%} of the points at ε = {eps:.4g}; lower the limit"
                " or --certify-radius")
    exact_params = current_params(state)
    target, rounding = None, None
    if options.budget is not None:
        target = resolve_target(options.budget, original.num_params(), smallest_params(state))
    elif options.max_error is not None:
        rounding = check_error_reachable(state, options, radius, (radius, centres, eps))
    floor = target if target is not None else smallest_params(state)  # the bar's total: parameters that can go
    with progress_bar(max(exact_params - floor, 0), "prune", enabled=progress, unit="parameter") as bar:
        step = lambda name, left: bar(name, exact_params - left)  # noqa: E731  (removed so far)
        if options.budget is not None:
            state = prune_to_target(state, target, basis, x, radius, step)
        elif options.max_error is not None:
            state = prune_to_deployed_error(state, options, basis, x, (radius, centres, eps), step, rounding)
        else:
            state = prune_to_certified(state, options.min_certified_top1, basis, x, radius, centres, eps, step)
    pruned = alternate_diagonalise(materialize(state))
    probes = x if x is not None else probe_inputs(original.input_shape, per_scale=64)
    report = build_report(original, pruned, state, basis, radius, radius_source, probes, labels,
                          search_restarts, search_steps, calibrated=x is not None)
    account_constant_directions(report, constant)
    effort = getattr(options, "certify_effort", branch.DEFAULT_EFFORT)
    local_sections(report, state, (original, pruned), options, (radius, centres, radii), eps_source,
                   certify_data is not None, (effort, branch.EFFORTS[effort].time_share * (time.perf_counter() - started)))
    check_max_error(report["certified"], options)
    if test_data is not None:
        report["test"] = test_report(original, pruned, test_data, test_labels)
        report["empirical"]["inputs"] = report["empirical"]["inputs"].replace("; give --test-data", "")
    report.update(params_original=original.num_params(), params_exact=exact_params, target=target,
                  seconds=round(time.perf_counter() - started, 3))
    return pruned, report


def exact_step(original: IsoMLP, x, radius, centres, eps) -> tuple[IsoMLP, dict]:
    """The exact shrink, with the proven bound D on what it dropped (layers.remove_constant_directions_accounted) over
    every input a certificate here speaks of: |x| ≤ radius, and the balls |x − c_i| ≤ ε of the local certificates."""
    probes = x if x is not None else probe_inputs(original.input_shape, per_scale=64)
    reach = [] if radius is None else [radius]
    if centres is not None and eps is not None:
        reach.append(float(sample_norms(centres).max()) + eps)
    return remove_constant_directions_accounted(original, input_radius=max(reach) if reach else None,
                                                output_scale=output_scale(original, probes))


def account_constant_directions(report: dict, constant: dict) -> None:
    """The certified bound covers the exact step too (issue 13): the bounds above compare the pruned network with the
    exact-shrunk one, which differs from the original by at most constant["bound"] (layers.
    remove_constant_directions_accounted; docs/bounds.md, "Constant directions"). By the triangle inequality the sum
    bounds |y_pruned − y_original|. A search that finds more than the certified value is a failed run, not a report."""
    report["constant_directions"] = constant
    cert = report["certified"]
    if cert.get("max_abs") is None:  # no domain: nothing certified, nothing to add to
        return
    cert["constant_directions"] = constant["bound"]
    cert["max_abs"] += constant["bound"]
    adversarial = report["adversarial"]["max_abs"]
    if adversarial > 0 and cert["max_abs"] > 0:
        report["tightness"] = cert["max_abs"] / adversarial
    if adversarial > cert["max_abs"]:
        raise CheckFailed(f"the adversarial search found |Δy| = {adversarial:.6g} above the certified bound"
                          f" {cert['max_abs']:.6g}; the certificate is not sound for this model — nothing was written;"
                          " please report this model")


def local_sections(report: dict, state: State, networks, options, domain, eps_source: str, certify_data: bool,
                   work: tuple[str, float] = (branch.DEFAULT_EFFORT, math.inf)) -> None:
    """report["deployed"] (the files' rounding term, docs/bounds.md §5b), the global certificate covering it, and
    report["local"] with the curve over every ε, each β_i including the files' term on its ball. `work`: the
    certify effort and the seconds its refinement may take (per ε)."""
    (radius, centres, radii), pruned = domain, networks[1]
    eps = radii[0][0] if radii else None
    report["deployed"] = deployed_term(pruned, getattr(options, "precision", None), radius, centres,
                                       max((r[0] for r in radii), default=None))
    report["local"] = add_deployed(report, local_section(state, centres, eps, eps_source, certify_data, networks,
                                                         extra=local_extra(report, pruned, centres, eps),
                                                         effort=work[0], time_budget=work[1]))
    if len(radii) > 1 and report["local"].get("computed", True):
        report["local"]["curve"] = local_curve(state, centres, radii, report["local"], networks,
                                               lambda e: local_extra(report, pruned, centres, e), work)


def deployed_term(pruned: IsoMLP, precision: str | None, radius, centres, eps) -> dict:
    """The rounding/quantisation term of the deployed files (bounds.deployed, docs/bounds.md §5b) over every input a
    certificate here speaks of (|x| ≤ radius and the balls |x − c_i| ≤ ε), and the plan the files are written with."""
    from isocompress.bounds import deployed

    reach = [] if radius is None else [radius]
    if centres is not None and eps is not None:
        reach.append(float(sample_norms(centres).max()) + eps)
    if precision is None or not deployed.supported(pruned):
        why = ("no rounding term: it is derived for tanh MLPs" if precision is not None
               else "no rounding term for files written with --dtype float16/bfloat16")
        return {"bound": None, "plan": None, "note": why}
    norm = max(reach) if reach else None
    plan = deployed.choose_plan(pruned, precision, norm)
    if norm is None:
        return {"bound": None, "plan": plan.describe(), "note": "no input domain: no rounding term"}
    out = deployed.deployed_bound(pruned, plan, norm)
    return {**out, "covers": deployed.COVERS[precision]}


def local_extra(report: dict, pruned: IsoMLP, centres, eps):
    """The deployed files' term on each local ball: bounds.deployed.local_deployed_bound (≤ the global term)."""
    from isocompress.bounds import deployed
    from isocompress.core.precision import Plan

    dep = report["deployed"]
    if dep.get("bound") is None or centres is None:
        return dep.get("bound") or 0.0
    return deployed.local_deployed_bound(pruned, Plan.from_record(dep["plan"]), centres, eps)


def add_deployed(report: dict, local: dict) -> dict:
    """The global certificate covers the deployed files: β of the float64 network plus the rounding term (the
    triangle inequality; docs/bounds.md §5b). The float64 network's own value stays, named as such. The local
    certificates (computed with the term in their allowance) say which network they cover. Returns `local`."""
    dep = report["deployed"]
    if local.get("bounds") is not None:
        local.update(covers=dep.get("covers", "the float64 pruned network"), deployed_rounding=local.pop("extra", None))
    add_deployed_global(report["certified"], dep)
    return local


def add_deployed_global(cert: dict, dep: dict) -> None:
    if cert.get("max_abs") is None or dep.get("bound") is None:
        cert["covers"] = "the float64 pruned network" if cert.get("max_abs") is not None else None
        return
    cert["float64_network"] = cert["max_abs"]
    cert["deployed_rounding"] = dep["bound"]
    cert["max_abs"] = cert["max_abs"] + dep["bound"]
    cert["covers"] = dep["covers"]


def goal_check(options, radius, centres, model: IsoMLP) -> None:
    if options.max_error is not None and not certifiable(model):
        raise IsocompressError(f"--max-error needs a certified bound; {TANH_ONLY.removeprefix('no certified bound computed: ')}:"
                               " give --budget instead")
    if getattr(options, "min_certified_top1", None) is not None and not locally_certifiable(model):
        raise IsocompressError(f"--min-certified-top1 needs local certificates; {LOCAL_MLP_ONLY.removeprefix('no local certificates: ')}:"
                               " give --budget or --max-error instead")
    if options.max_error is not None and radius is None:
        raise IsocompressError("--max-error needs an input domain for its certified bound: give --calibration FILE"
                               " (|x| ≤ its largest norm) or --input-radius R")
    if getattr(options, "min_certified_top1", None) is not None and centres is None:
        raise IsocompressError("--min-certified-top1 needs points to certify: give --calibration FILE or"
                               " --certify-data FILE")


def local_section(state: State, centres, eps, eps_source: str, certify_data: bool, networks,
                  extra: float = 0.0, effort: str = branch.DEFAULT_EFFORT, time_budget: float = math.inf) -> dict:
    """report["pruning"]["local"]: the certificates, or one line saying why none were computed. `extra`: the deployed
    files' rounding term, added to every β_i (and taken twice off every top-1 margin)."""
    if centres is not None:
        return local_report(state, centres, eps, eps_source, "certify data" if certify_data else "calibration data",
                            networks=networks, extra=extra, effort=effort, time_budget=time_budget)
    if not locally_certifiable(networks[0]):
        return {"computed": False, "note": LOCAL_MLP_ONLY}
    return {"computed": False, "note": "no local certificates: give --calibration FILE or --certify-data FILE (points"
            " to certify around) and optionally --certify-radius EPS"}


def local_report(state: State, centres: torch.Tensor, eps: float, eps_source: str, points: str,
                 networks=None, extra: float = 0.0, effort: str = branch.DEFAULT_EFFORT,
                 time_budget: float = math.inf) -> dict:
    """report.json["pruning"]["local"]: the certificates and, for classifiers with `networks` = (original, pruned),
    the three-way verdict per point: certified, refuted (a verified counterexample) or undecided — the undecided
    refined by branch and bound over the ball at `effort` (docs/bounds.md §8.6), with their remaining gaps."""
    started = time.perf_counter()
    out = local_certificates(state, centres, eps, extra)
    classifier = state.layers[-1].n_out >= 2
    verdict = {}
    if classifier and networks is not None:
        level = branch.EFFORTS[effort]
        verdict = refutation_report(state, centres, eps, out["top1"], *networks, effort=level)
        deadline = started + time_budget
        verdict.update(refinement_report(state, centres, eps, out, verdict, level, deadline, extra))
    bound = out["bound"]
    top1 = out["top1"].tolist() if classifier else None
    report = {
        "radius": eps,
        "radius_source": eps_source,
        "points": points,
        "n_points": int(len(centres)),
        "certified_top1": float(out["top1"].double().mean()) if classifier else None,
        "certify_effort": effort,
        "n_certified": int(out["top1"].sum()) if classifier else None,
        "bounds": [float(b) for b in bound],
        "top1_certified": top1,
        "summary": {"bound_max": float(bound.max()), "bound_median": float(bound.median()),
                    "bound_mean": float(bound.mean())},
        "method": "per-point forms c + Aδ + w of both networks and of their difference (docs/bounds.md §8)",
    }
    if isinstance(extra, torch.Tensor):  # the deployed files' term per point (docs/bounds.md §5b), inside "bounds"
        report["extra"] = {"max": float(extra.max()), "median": float(extra.median())}
    elif extra:
        report["extra"] = {"max": float(extra), "median": float(extra)}
    report.update(verdict)
    report["seconds"] = round(time.perf_counter() - started, 3)
    return report


def local_curve(state: State, centres: torch.Tensor, radii: list, primary: dict, networks,
                extra_of=None, work: tuple[str, float] = (branch.DEFAULT_EFFORT, math.inf)) -> list[dict]:
    """report["pruning"]["local"]["curve"]: for each ε of --certify-radius, in the order given, the verdict counts
    and shares of `local_report` at that ε alone (the first entry is `primary`, the report at the first ε).
    `extra_of(ε)`: the deployed files' term on the balls of radius ε (docs/bounds.md §5b)."""
    median = float(sample_norms(centres).median())
    curve = []
    for k, (eps, source, given) in enumerate(radii):
        one = primary if k == 0 else local_report(state, centres, eps, source, primary["points"], networks=networks,
                                                  extra=0.0 if extra_of is None else extra_of(eps),
                                                  effort=work[0], time_budget=work[1])
        curve.append(curve_entry(one, given, median))
    return curve


def curve_entry(local: dict, given, median: float) -> dict:
    """One ε of the curve: the radius (absolute, relative to the median norm, as given), the counts and shares."""
    n = local["n_points"]
    entry = {"radius": local["radius"], "radius_given": given,
             "radius_relative": local["radius"] / median if median > 0 else None,
             "radius_source": local["radius_source"], "n_points": n}
    for verdict, count in (("certified", "n_certified"), ("refuted", "n_refuted"), ("undecided", "n_undecided")):
        value = local.get(count)
        entry[count] = value
        entry[f"{verdict}_fraction"] = None if value is None else value / n
    entry.update(bound_median=local["summary"]["bound_median"], bound_max=local["summary"]["bound_max"],
                 seconds=local["seconds"])
    return entry


COUNTEREXAMPLES_SHOWN = 16  # report.json keeps the inputs of this many counterexamples (all are verified)


def refutation_report(state: State, centres: torch.Tensor, eps: float, certified: torch.Tensor, original: IsoMLP,
                      pruned: IsoMLP, effort: branch.Effort = branch.EFFORTS[branch.DEFAULT_EFFORT]) -> dict:
    """The disagreement search on the points that are not certified (docs/bounds.md §8.5): searched on the exact-shrunk
    network (the original to within D, and smaller), every counterexample verified on the original and the pruned."""
    started = time.perf_counter()
    todo = (~certified).nonzero()[:, 0]
    refuted = torch.zeros(len(centres), dtype=torch.bool)
    shown = []
    if len(todo):
        found = local_bounds.disagreement_search(IsoMLP(state.layers), pruned, centres[todo].to(F64), eps,
                                                 starts=effort.search_starts, steps=effort.search_steps,
                                                 verify=(original, pruned))
        refuted[todo] = found["refuted"]
        for j in found["refuted"].nonzero()[:, 0][:COUNTEREXAMPLES_SHOWN].tolist():
            shown.append({"point": int(todo[j]), "original_class": int(found["classes"][j, 0]),
                          "pruned_class": int(found["classes"][j, 1]), "distance": float(found["distance"][j]),
                          "x": [float(v) for v in found["counterexample"][j]]})
    check_verdicts(certified, refuted)
    n, n_refuted = len(centres), int(refuted.sum())
    n_undecided = n - int(certified.sum()) - n_refuted
    return {
        "refuted": refuted.tolist(), "n_refuted": n_refuted, "refuted_fraction": n_refuted / n,
        "n_undecided": n_undecided, "undecided_fraction": n_undecided / n,
        "counterexamples": shown,
        "refutation": {
            "starts": effort.search_starts, "steps": effort.search_steps,
            "bisection_steps": local_bounds.BISECT_STEPS, "points_searched": int(len(todo)),
            "seconds": round(time.perf_counter() - started, 3),
            "note": "refuted: a point x with |x − x_i| ≤ ε where the pruned network's top-1 differs from the"
                    " original's, found by projected gradient descent (the starts × steps above, on the points not"
                    " certified) and verified by a float64 forward of both networks — a proof that top-1 is NOT"
                    " unchanged on that ball, so no sound certificate can claim it; undecided: neither certified nor"
                    f" refuted. The first {COUNTEREXAMPLES_SHOWN} counterexamples are listed (docs/bounds.md §8.5)"},
    }


def refinement_report(state: State, centres: torch.Tensor, eps: float, out: dict, verdict: dict,
                      effort: branch.Effort, deadline: float = math.inf, extra=0.0) -> dict:
    """Branch and bound over the balls left undecided (docs/bounds.md §8.6), at most effort.pieces_per_point × the
    number of points piece bounds: certified ones join out["top1"], every refined β replaces out["bound"] where smaller
    (both in place), and the verdict counts are recomputed; the undecided keep their remaining gap."""
    started = time.perf_counter()
    if "refuted" not in verdict:  # no search ran: no point is known undecided
        return {}
    refuted = torch.tensor(verdict["refuted"], dtype=torch.bool)
    todo = (~out["top1"] & ~refuted).nonzero()[:, 0]
    budget = int(effort.pieces_per_point * len(centres))
    gap = torch.zeros(len(centres), dtype=F64)
    pieces, newly = 0, 0
    if len(todo) and budget > 0 and effort.directions > 0:
        margin = torch.minimum(out["margin_original"], out["margin_pruned"])[todo]
        got = branch.refine(state.layers, state.removed, state.consts, centres[todo].to(F64), eps,
                            out["top_class"][todo], out["linear"][todo], out["bound"][todo], margin, effort, budget,
                            allowance=rounding_allowance(state) + state.constant_bound + largest_term(extra),
                            deadline=deadline)
        out["top1"][todo] = got["certified"]
        out["bound"][todo] = torch.minimum(out["bound"][todo], got["bound"])
        gap[todo] = got["gap"]
        pieces, newly = int(got["pieces"].sum()), int(got["certified"].sum())
    elif len(todo):
        gap[todo] = (-torch.minimum(out["margin_original"], out["margin_pruned"])[todo]).clamp_min(0.0)
    check_verdicts(out["top1"], refuted)
    n = len(centres)
    undecided = ~out["top1"] & ~refuted
    return {"n_undecided": int(undecided.sum()), "undecided_fraction": int(undecided.sum()) / n,
            "undecided_gaps": [{"point": int(i), "gap": float(gap[i])} for i in undecided.nonzero()[:, 0].tolist()],
            "refinement": {
                "effort": effort.name, "directions": effort.directions, "piece_budget": budget, "pieces": pieces,
                "stopped_by_time": pieces < budget and len(todo) > newly and time.perf_counter() >= deadline,
                "certified_by_refinement": newly, "seconds": round(time.perf_counter() - started, 3),
                "note": "branch and bound over the ball (docs/bounds.md §8.6): the undecided balls split along the"
                        " top singular directions of the two networks' Jacobians at the centre into pieces, each"
                        " bounded as the ball is; gap: how far the worst piece's certified top-1 margin lower bound"
                        " is below 0 (inf: a piece's centre has another top-1 class)"}}


def largest_term(extra) -> float:
    """The deployed files' term on the refined balls, as one allowance: its largest value over the points."""
    return float(extra.max()) if isinstance(extra, torch.Tensor) and extra.numel() else float(extra or 0.0)


def check_verdicts(certified: torch.Tensor, refuted: torch.Tensor) -> None:
    """A point both certified and refuted would be a proof and a counterexample of the same claim: a soundness bug."""
    both = (certified & refuted).nonzero()[:, 0]
    if len(both):
        raise CheckFailed(f"internal error: {len(both)} point(s) (first: {int(both[0])}) are certified unchanged and"
                          " have a verified counterexample; the local certificate is not sound for this model —"
                          " nothing was written; please report this model")


def test_report(original: IsoMLP, pruned: IsoMLP, x: torch.Tensor, labels) -> dict:
    with torch.no_grad():
        y, y2 = original(x.to(F64)), pruned(x.to(F64))
    return {"inputs": "test data (held out: not used for pruning)", **bounds.empirical_errors(y, y2, labels)}


def build_report(original, pruned, state, basis, radius, radius_source, probes, labels, restarts, steps,
                 calibrated: bool) -> dict:
    with torch.no_grad():
        y, y2 = original(probes), pruned(probes)
    empirical = bounds.empirical_errors(y, y2, labels if calibrated else None)
    if not calibrated:
        inputs = f"{len(probes)} Gaussian probe inputs (no data given: not a measure of accuracy)"
    elif basis == "data-aware":
        inputs = "calibration data (the data-aware basis was fitted to it: not a held-out measure; give --test-data)"
    else:
        inputs = "calibration data"
    report = {"basis": basis, "radius": radius, "radius_source": radius_source,
              "empirical": {"inputs": inputs, **empirical}}
    if radius is None:
        note = NO_DOMAIN if radius_source == "none" else radius_source  # TANH_ONLY: no bound for this network
        report.update(certified={"max_abs": None, "computed": False, "note": note},
                      adversarial={"max_abs": None, "computed": False, "note": note}, tightness=None,
                      layers=layer_details(state, None, probes))
        return report
    errors = sample_norms(y2 - y)
    inside = sample_norms(probes) <= radius * (1 + 1e-12)
    report["empirical"]["inputs_outside_radius"] = int((~inside).sum())
    worst = probes[inside][errors[inside].argsort(descending=True)[:8]]
    # search against the exact-shrunk network (the same function to ~1e-14, much cheaper); the reported value is
    # measured against the original at the winning point
    search = bounds.adversarial_search(IsoMLP(state.layers), pruned, radius, starts=worst, restarts=restarts,
                                       steps=steps, verify=original)
    in_domain_max = float(errors[inside].max()) if bool(inside.any()) else 0.0
    adversarial = max(search["max_abs"], in_domain_max)
    cert = bounds.certified_bound(state.layers, state.removed, state.consts, radius)
    certified = cert["bound"] + rounding_allowance(state)
    report.update(
        certified={"max_abs": certified, "rounding_allowance": rounding_allowance(state),
                   "method": cert.get("method", "chain"), "chain_bound": cert.get("chain_bound", cert["bound"])},
        adversarial={**search, "max_abs": adversarial},
        tightness=certified / adversarial if cert["bound"] > 0 and adversarial > 0 else None,  # None: nothing lossy
        layers=layer_details(state, cert, probes))
    return report


def layer_details(state: State, cert: dict | None, x: torch.Tensor) -> list[dict]:
    with torch.no_grad():
        _, zs, _ = IsoMLP(state.layers).forward_with_hidden(x)
    out = []
    for i, mask in enumerate(state.removed):
        spatial = state.layers[i].geometry.out_spatial
        c = state.consts[i][mask].reshape(-1, *([1] * len(spatial)))
        e = sample_norms(zs[i][:, mask] - c) if bool(mask.any()) else torch.zeros(1)
        out.append({
            "hidden_space": i,
            "width_exact": int(mask.numel()),
            "width_after": int((~mask).sum()),
            "removed": int(mask.sum()),
            "scores": [round(s, 6) for s in state.scores[i]],
            "introduced_certified": None if cert is None else cert["introduced"][i],
            "introduced_empirical_max": float(e.max()),
            "error_bound_after": None if cert is None else cert["after_layer"][i],
        })
    return out
