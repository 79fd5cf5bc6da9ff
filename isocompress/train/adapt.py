"""Adaptive topology while training (issue 14): restructure a live `isocompress.train.nn.IsotropicMLP` in place, together
with its torch optimiser's state, and a schedule (`Neuroadaptation`) for a plain training loop.

Every change acts on one hidden space i (the output of weight layer i, read by layer i+1) and is one map: new
coordinates z' = Pᵀz for a float64 matrix P (n × r) with orthonormal columns, or PPᵀ = I for growth
(docs/training.md, "Adaptive topology"):

- rotation (`rotate_hidden`, `diagonalise`): P = Q orthogonal, r = n;
- degeneration (`degenerate`): P spans the r = n − k strongest left singular vectors of [W_i, psi_i] (or the r
  strongest neurons), in the basis closest to the current neurons (`kept_basis`); the constant part
  b⊥ = b_i − PPᵀb_i is absorbed as o_i += |b⊥|², psi_{i+1} += W_{i+1} b⊥ (as `layers.remove_constant_directions`);
- growth (`grow`): P = [I_n, 0] (n × (n + k)): k zero rows in layer i, k small random columns in layer i+1.

Parameters map as W_i → PᵀW_i, b_i → Pᵀb_i, psi_i → Pᵀpsi_i, W_{i+1} → W_{i+1}P. Their gradients map the same way,
so optimiser state that is linear in gradients (SGD's momentum_buffer, Adam's exp_avg) maps exactly; elementwise
second moments (exp_avg_sq, ...) map by the diagonal rule v → (P∘P)ᵀv, exact for permutations, slices and growth,
an approximation for general rotations (measured in benchmarks/bench_adapt.py). Linear algebra in float64, cast back.

Each verb first decides (a `Plan`: the record and P), then applies it (`apply_plan`). With `distributed=True` (DDP) the
decision is made on one rank and broadcast, so every rank applies the same P (isocompress.train.distributed; imported
only then; docs/training.md, "Under DDP").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from isocompress.core.errors import IsocompressError
from isocompress.core.model import Layer
from isocompress.core.primitives import inverse_softplus, svd64
from isocompress.train.grow import direction_strengths

F64 = torch.float64
LOG = logging.getLogger("isocompress.train.adapt")

# Optimiser state keys by how they depend on gradients (torch.optim SGD, Adam, AdamW, RMSprop, Adagrad, NAdam, ...).
LINEAR_STATE = frozenset({"momentum_buffer", "exp_avg", "grad_avg"})
QUADRATIC_STATE = frozenset({"exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum"})


@dataclass(frozen=True)
class Change:
    """One restructuring of one hidden space. `strength` is the largest strength (singular value, or row norm for
    measure="neurons") of a removed direction (0 for growth and rotation): removal is exact when it is 0."""

    kind: str  # "grow", "degenerate", "rotate"
    hidden: int
    count: int
    width_before: int
    width_after: int
    strength: float = 0.0
    step: int | None = None

    def describe(self) -> str:
        where = "" if self.step is None else f"step {self.step}: "
        extra = f", largest removed strength {self.strength:.3g}" if self.kind == "degenerate" else ""
        return f"{where}{self.kind} hidden space {self.hidden} by {self.count}: width {self.width_before} → " \
               f"{self.width_after}{extra}"


# --- optimiser state ---------------------------------------------------------------------------------------------
def transform_state(state: dict, linear: Callable[[torch.Tensor], torch.Tensor],
                    quadratic: Callable[[torch.Tensor], torch.Tensor]) -> dict:
    """The state of one parameter after its change: linear keys through `linear`, second moments through `quadratic`,
    scalars (Adam's step) copied. An unknown tensor-valued key is refused rather than silently kept stale."""
    new = {}
    for key, value in state.items():
        if value is None or not torch.is_tensor(value):
            new[key] = value
        elif key in LINEAR_STATE or key in QUADRATIC_STATE:
            fn = linear if key in LINEAR_STATE else quadratic
            new[key] = fn(value.detach().to(dtype=F64, device="cpu")).to(dtype=value.dtype, device=value.device)
        elif value.dim() == 0:
            new[key] = value.clone()
        else:
            raise IsocompressError(
                f"optimiser state {key!r} of shape {tuple(value.shape)} has no known transformation; supported state: "
                f"{', '.join(sorted(LINEAR_STATE | QUADRATIC_STATE))} (SGD, Adam, AdamW, RMSprop, Adagrad, NAdam)")
    return new


def _replace_in_optimiser(optimiser, old: nn.Parameter, new: nn.Parameter, linear, quadratic) -> None:
    for group in optimiser.param_groups:
        for index, p in enumerate(group["params"]):
            if p is old:
                group["params"][index] = new
    if old in optimiser.state:
        optimiser.state[new] = transform_state(optimiser.state.pop(old), linear, quadratic)


def replace_parameter(module: nn.Module, name: str, value: torch.Tensor, optimiser=None,
                      linear: Callable | None = None, quadratic: Callable | None = None) -> nn.Parameter:
    """Swap `module.name` for a new Parameter holding `value` (old dtype, device, requires_grad) and move its optimiser
    state to it through `linear` / `quadratic` (the maps of first and second moments; default: the same map)."""
    old = getattr(module, name)
    new = nn.Parameter(value.detach().to(dtype=old.dtype, device=old.device), requires_grad=old.requires_grad)
    setattr(module, name, new)
    if optimiser is not None:
        _replace_in_optimiser(optimiser, old, new, linear, quadratic or linear)
    return new


def add_parameter(module: nn.Module, name: str, value: torch.Tensor, sibling: nn.Parameter, optimiser=None) -> None:
    """Register a new Parameter (e.g. a psi created by absorption) in `sibling`'s optimiser group, with zero moments
    and `sibling`'s step count (so that bias correction does not restart for it)."""
    new = nn.Parameter(value.detach().to(dtype=sibling.dtype, device=sibling.device), requires_grad=sibling.requires_grad)
    setattr(module, name, new)
    if optimiser is None:
        return
    for group in optimiser.param_groups:
        if any(p is sibling for p in group["params"]):
            group["params"].append(new)
            break
    if sibling in optimiser.state:
        zero = lambda t: torch.zeros(new.shape, dtype=F64)  # noqa: E731
        optimiser.state[new] = transform_state(optimiser.state[sibling], zero, zero)


def _rows(p: torch.Tensor, square: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """t → Pᵀt over the first axis (or (P∘P)ᵀt for second moments)."""
    m = p * p if square else p
    return lambda t: (m.T @ t.reshape(t.shape[0], -1)).reshape((m.shape[1],) + tuple(t.shape[1:]))


def _cols(p: torch.Tensor, square: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """t → tP over the last axis (or t(P∘P))."""
    m = p * p if square else p
    return lambda t: t @ m


# --- the one map every change is made of -------------------------------------------------------------------------
def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(dtype=F64, device="cpu")


def check_hidden(net, i: int) -> None:
    n_hidden = len(net.layers) - 1
    if not isinstance(i, int) or not 0 <= i < n_hidden:
        raise IsocompressError(
            f"hidden space {i} does not exist; this network (widths {'→'.join(map(str, net.widths))}) has hidden"
            f" spaces 0..{n_hidden - 1}")


@torch.no_grad()
def map_hidden(net, i: int, basis: torch.Tensor, optimiser=None, outgoing: torch.Tensor | None = None) -> None:
    """Change hidden space i of a live network to coordinates z' = Pᵀz (P = `basis`, n × r; PᵀP = I, or PPᵀ = I for
    growth), absorbing the constant part b⊥ = b − PPᵀb into o_i and psi_{i+1}; `outgoing` (m × k) fills the
    consumer's last k columns (growth). Parameters are replaced (new Parameter objects) and the optimiser's state moved to them."""
    check_hidden(net, i)
    producer, consumer = net.layers[i], net.layers[i + 1]
    p = basis.to(F64)
    bias = _f64(producer.bias)
    constant = bias - p @ (p.T @ bias)
    old_consumer = _f64(consumer.weight)
    new_consumer = old_consumer @ p
    if outgoing is not None:
        new_consumer[:, p.shape[1] - outgoing.shape[1]:] = outgoing.to(F64)
    for name in ("weight", "bias", "psi"):
        if getattr(producer, name) is not None:
            replace_parameter(producer, name, _rows(p)(_f64(getattr(producer, name))), optimiser, _rows(p),
                              _rows(p, True))
    replace_parameter(consumer, "weight", new_consumer, optimiser, _cols(p), _cols(p, True))
    energy = float(constant @ constant)
    if energy > 0:
        _add_to_o(producer.activation, energy, optimiser)
    extra_psi = old_consumer @ constant
    if bool((extra_psi != 0).any()):
        if consumer.psi is None:
            add_parameter(consumer, "psi", extra_psi, consumer.weight, optimiser)
        else:
            consumer.psi.add_(extra_psi.to(dtype=consumer.psi.dtype, device=consumer.psi.device))


def _add_to_o(activation, energy: float, optimiser) -> None:
    """o += energy, in whichever form o is stored. For a trainable o = softplus(raw) the raw parameter moves and its
    moments are rescaled by ∂o/∂raw' / ∂o/∂raw = sigmoid(raw')/sigmoid(raw) (exact for the current gradient)."""
    if not activation.trainable:
        activation.o_fixed.add_(torch.as_tensor(energy, dtype=activation.o_fixed.dtype))
        return
    raw = _f64(activation.raw_o)
    new_raw = inverse_softplus(F.softplus(raw) + energy)
    ratio = torch.sigmoid(new_raw) / torch.sigmoid(raw)
    replace_parameter(activation, "raw_o", new_raw, optimiser, lambda t: t * ratio, lambda t: t * ratio * ratio)


# --- the verbs (also methods of IsotropicMLP) --------------------------------------------------------------------
def _layer64(layer) -> Layer:
    """A float64 `model.Layer` view of a live layer (for the shared SVD maths in grow.py)."""
    psi = None if layer.psi is None else _f64(layer.psi)
    w = _f64(layer.weight)
    return Layer(weight=w, bias=_f64(layer.bias), n_in=int(w.shape[1]), psi=psi, o=torch.zeros((), dtype=F64))


@dataclass(frozen=True)
class Plan:
    """One decided change of one hidden space, not yet applied: its record, the map P (float64, CPU) and, for growth,
    the consumer's new columns. The same plan applied on every rank maps every rank's parameters and optimiser state
    the same way (docs/training.md, "Under DDP")."""

    change: Change
    basis: torch.Tensor
    outgoing: torch.Tensor | None = None


def apply_plan(net, plan: Plan, optimiser=None) -> Change:
    map_hidden(net, plan.change.hidden, plan.basis, optimiser, outgoing=plan.outgoing)
    return plan.change


def _carry_out(net, plans: Callable[[], list[Plan]], optimiser, distributed) -> list[Change]:
    """Decide (`plans()`: here, or under `distributed` on one rank and broadcast to all), then apply each plan."""
    return [apply_plan(net, plan, optimiser) for plan in decide(plans, distributed)]


def rotate_hidden(net, i: int, rotation: torch.Tensor, optimiser=None) -> Change:
    """Rotate hidden space i by an orthogonal R (W_i → RᵀW_i, ..., W_{i+1} → W_{i+1}R, as layers.rotate_hidden)."""
    check_hidden(net, i)
    n = net.widths[i + 1]
    if tuple(rotation.shape) != (n, n):
        raise IsocompressError(f"rotation for hidden space {i} must be {n}×{n}, got {tuple(rotation.shape)}")
    map_hidden(net, i, rotation, optimiser)
    return Change("rotate", i, 0, n, n)


def _diagonalise_plans(net, layer: int, full: bool) -> list[Plan]:
    u, _, vh = svd64(_f64(net.layers[layer].weight), full=True)
    n = net.widths[layer + 1]
    plans = [Plan(Change("rotate", layer, 0, n, n), u)]
    if full:
        m = net.widths[layer]
        plans.append(Plan(Change("rotate", layer - 1, 0, m, m), vh.T))
    return plans


def diagonalise(net, layer: int, optimiser=None, full: bool = False, distributed=None) -> list[Change]:
    """Left-partial diagonalisation of weight layer `layer` (rotate its output space to the left singular vectors of
    W, so row j becomes σ_j v_jᵀ, as layers.diagonalise_left); `full=True` also rotates its input space by V
    (1 ≤ layer ≤ L−2), so that W becomes diagonal (stored dense), as layers.diagonalise_full. `distributed`: the
    SVD on one rank, broadcast (docs/training.md, "Under DDP")."""
    n_layers = len(net.layers)
    lowest = 1 if full else 0
    if not isinstance(layer, int) or not lowest <= layer <= n_layers - 2:
        raise IsocompressError(f"layer {layer} cannot be {'fully ' if full else ''}diagonalised: use layers "
                               f"{lowest}..{n_layers - 2} of this {n_layers}-layer network")
    return _carry_out(net, lambda: _diagonalise_plans(net, layer, full), optimiser, distributed)


def _grow_plan(net, layer: int, k: int, scale: float, generator: torch.Generator | None) -> Plan:
    if not 0 <= scale < float("inf"):
        raise IsocompressError(f"the scale of the outgoing weights must be finite and ≥ 0, got {scale}")
    n = net.widths[layer + 1]
    m = net.widths[layer + 2]
    outgoing = torch.randn(m, k, dtype=F64, generator=generator) * scale
    basis = torch.cat([torch.eye(n, dtype=F64), torch.zeros(n, k, dtype=F64)], dim=1)
    return Plan(Change("grow", layer, k, n, n + k), basis, outgoing)


def grow(net, layer: int, k: int, optimiser=None, scale: float = 1e-3, generator: torch.Generator | None = None,
         distributed=None) -> Change:
    """Add k scaffold neurons to hidden space `layer` (zero incoming weights, bias and psi; outgoing weights
    ~ N(0, scale²), as grow.grow). The function is unchanged exactly; new moments are 0. `distributed`: the outgoing
    weights drawn on one rank, broadcast."""
    check_hidden(net, layer)
    if not isinstance(k, int) or k < 1:
        raise IsocompressError(f"the number of neurons to add must be an integer ≥ 1, got {k}")
    return _carry_out(net, lambda: [_grow_plan(net, layer, k, scale, generator)], optimiser, distributed)[0]


MEASURES = ("directions", "neurons")


def check_measure(measure: str) -> None:
    if measure not in MEASURES:
        raise IsocompressError(f"measure {measure!r}: use one of {', '.join(MEASURES)}")


def strengths(net, layer: int, measure: str = "directions") -> tuple[torch.Tensor, torch.Tensor]:
    """(U, s), strongest first. "directions": the left singular basis of [W, psi] of weight layer `layer` and each
    direction's singular value, 0 beyond the rank (grow.direction_strengths); s_j = 0 means direction j is constant.
    "neurons": U selects the neurons themselves (a permutation) and s_j is the norm of neuron j's row of [W, psi]; a
    neuron can be strong while lying in the span of others, so widths are not capped by the rank chain."""
    check_hidden(net, layer)
    check_measure(measure)
    if measure == "directions":
        return direction_strengths(_layer64(net.layers[layer]))
    dense = _layer64(net.layers[layer])
    rows = dense.weight if dense.psi is None else torch.cat([dense.weight, dense.psi[:, None]], dim=1)
    s, order = torch.sort(torch.linalg.vector_norm(rows, dim=1), descending=True, stable=True)
    return torch.eye(dense.n_out, dtype=F64)[:, order], s


def kept_basis(u: torch.Tensor, keep: int) -> torch.Tensor:
    """An orthonormal basis (n × keep) of the span of the `keep` strongest directions u[:, :keep], rotated within that
    span to be as close as possible to `keep` of the current coordinate axes (orthogonal Procrustes: the axes with
    the largest share in the span, R the polar factor of U_rᵀE). Same function as u[:, :keep] (a rotation inside the
    kept space is exact), but the kept neurons move as little as possible, which is what keeps the diagonal rule for
    second moments accurate: when the removed directions are whole neurons, P is a slice and everything is exact."""
    u_r = u[:, :keep]
    axes = torch.sort(torch.topk((u_r * u_r).sum(dim=1), keep).indices).values
    x, _, yh = svd64(u_r[axes, :].T, full=False)  # U_rᵀE = u_r[axes]ᵀ
    return u_r @ (x @ yh)


def _degenerate_plan(net, layer: int, k: int, u: torch.Tensor, s: torch.Tensor) -> Plan:
    n = net.widths[layer + 1]
    return Plan(Change("degenerate", layer, k, n, n - k, strength=float(s[n - k:].max())), kept_basis(u, n - k))


def degenerate(net, layer: int, k: int, optimiser=None, measure: str = "directions", distributed=None) -> Change:
    """Remove the k weakest directions of hidden space `layer`: keep the span of its n − k strongest directions
    (`strengths`; basis from `kept_basis`) and absorb each removed direction's constant bias into o and the next psi
    (as grow.remove_weakest_directions). Exact when the removed singular values are 0. measure="neurons" removes
    the k neurons of smallest incoming norm (exact when those rows are 0). `distributed`: the basis computed on one
    rank, broadcast."""
    check_hidden(net, layer)
    n = net.widths[layer + 1]
    if not isinstance(k, int) or not 1 <= k < n:
        raise IsocompressError(f"cannot remove {k} of the {n} directions of hidden space {layer}: remove 1..{n - 1}"
                               " (a hidden space keeps ≥ 1 direction)")
    check_measure(measure)
    plans = lambda: [_degenerate_plan(net, layer, k, *strengths(net, layer, measure))]  # noqa: E731
    return _carry_out(net, plans, optimiser, distributed)[0]


def _adapt_plans(net, i: int, threshold: float, scaffold: int, scale: float, generator, max_width: int | None,
                 measure: str) -> list[Plan]:
    """What `neuroadapt` does to hidden space i: grow, degenerate, or nothing (an empty list)."""
    u, s = strengths(net, i, measure)
    n = int(s.numel())
    excess = int((s < threshold).sum()) - scaffold
    if excess < 0 and (max_width is None or n < max_width):
        add = -excess if max_width is None else min(-excess, max_width - n)
        return [_grow_plan(net, i, add, scale, generator)]
    if excess > 0 and n > 1:
        return [_degenerate_plan(net, i, min(excess, n - 1), u, s)]
    return []


def neuroadapt(net, threshold: float, scaffold: int, optimiser=None, layers: Sequence[int] | None = None,
               scale: float = 1e-3, generator: torch.Generator | None = None, max_width: int | None = None,
               measure: str = "directions", distributed=None) -> list[Change]:
    """Auto-neuroadaptation of a live network (the rule of grow.neuroadapt): in each hidden space (or those in
    `layers`) keep `scaffold` directions (or neurons, measure="neurons") of strength below `threshold`, growing when
    there are fewer (up to `max_width`) and degenerating the weakest when there are more (keeping ≥ 1).
    `distributed` (True, or an `isocompress.train.distributed.RankSync`): each decision and basis is computed on one
    rank and broadcast, and every rank applies the same maps (docs/training.md, "Under DDP")."""
    if not isinstance(scaffold, int) or scaffold < 0:
        raise IsocompressError(f"scaffold must be an integer ≥ 0, got {scaffold}")
    if not threshold >= 0:
        raise IsocompressError(f"threshold must be ≥ 0, got {threshold}")
    changes = []
    for i in range(len(net.layers) - 1) if layers is None else layers:
        check_hidden(net, i)
        check_measure(measure)
        plans = lambda: _adapt_plans(net, i, threshold, scaffold, scale, generator, max_width, measure)  # noqa: E731,B023
        changes.extend(_carry_out(net, plans, optimiser, distributed))
    return changes


# --- one decision for every rank (torch.distributed; imported only by distributed runs) ---------------------------
KIND_CODES = {"grow": 1, "degenerate": 2, "rotate": 3}


def plans_to_tensors(plans: list[Plan]) -> list[torch.Tensor]:
    """Plans as float64 tensors for a broadcast: per plan a header (kind, hidden, count, widths, strength, whether
    outgoing columns follow), then P, then the outgoing columns."""
    tensors = []
    for plan in plans:
        c = plan.change
        header = [KIND_CODES[c.kind], c.hidden, c.count, c.width_before, c.width_after, c.strength,
                  plan.outgoing is not None]
        tensors += [torch.tensor(header, dtype=F64), plan.basis.to(F64)]
        tensors += [] if plan.outgoing is None else [plan.outgoing.to(F64)]
    return tensors


def plans_from_tensors(tensors: list[torch.Tensor]) -> list[Plan]:
    kinds = {code: kind for kind, code in KIND_CODES.items()}
    plans, rest = [], list(tensors)
    while rest:
        header, basis = rest.pop(0).tolist(), rest.pop(0)
        kind, hidden, count, before, after = (int(v) for v in header[:5])
        outgoing = rest.pop(0) if header[6] else None
        plans.append(Plan(Change(kinds[kind], hidden, count, before, after, header[5]), basis, outgoing))
    return plans


def decide(plans: Callable[[], list[Plan]], distributed=None) -> list[Plan]:
    """`plans()` computed here (single process), or, under `distributed`, on its source rank only and broadcast to
    every rank, so that every rank applies the same maps bit for bit."""
    if not distributed:
        return plans()
    from isocompress.train.distributed import resolve

    return plans_from_tensors(resolve(distributed).share(lambda: plans_to_tensors(plans())))


class Neuroadaptation:
    """A schedule for a plain training loop: call `step()` after each `optimiser.step()`; every `every` steps (from
    `start`, until `stop`) it runs `neuroadapt` on the live model with its optimiser and logs each change (logger
    "isocompress.train.adapt", and `history`).

    Under DDP pass the module inside the wrapper (`ddp.module`) and `distributed=True` (or a
    `isocompress.train.distributed.RankSync` naming the source rank and group): decisions and bases come from one
    rank, every rank maps its parameters and optimiser state the same way, and `step()` returns the same changes on
    every rank; re-wrap DDP whenever it returns any (`isocompress.train.distributed.rewrap`; docs/training.md,
    "Under DDP")."""

    def __init__(self, model, optimiser=None, every: int = 100, threshold: float = 1e-2, scaffold: int = 4,
                 layers: Sequence[int] | None = None, scale: float = 1e-3, max_width: int | None = None,
                 start: int = 0, stop: int | None = None, seed: int = 0, measure: str = "directions",
                 log: Callable[[str], None] | None = None, distributed=False):
        if not isinstance(every, int) or every < 1:
            raise IsocompressError(f"every must be an integer ≥ 1 (steps between restructurings), got {every}")
        if not hasattr(model, "layers") and hasattr(model, "module"):
            raise IsocompressError(
                f"Neuroadaptation needs the network itself, not its {type(model).__name__} wrapper: pass "
                "wrapper.module, and re-wrap after each change (docs/training.md, \"Under DDP\")")
        self.model, self.optimiser = model, optimiser
        self.every, self.threshold, self.scaffold, self.layers = every, threshold, scaffold, layers
        self.scale, self.max_width, self.start, self.stop = scale, max_width, start, stop
        check_measure(measure)
        self.measure = measure
        self.distributed = _resolve_distributed(distributed)
        self.generator = torch.Generator().manual_seed(seed)
        self.log = log or LOG.info
        self.steps = 0
        self.history: list[Change] = []

    def step(self) -> list[Change]:
        """Count one training step; restructure when due. Returns the changes made now (usually none)."""
        self.steps += 1
        due = self.steps >= self.start and (self.steps - self.start) % self.every == 0
        if not due or (self.stop is not None and self.steps > self.stop):
            return []
        changes = neuroadapt(self.model, self.threshold, self.scaffold, self.optimiser, self.layers, self.scale,
                             self.generator, self.max_width, self.measure, self.distributed)
        changes = [Change(c.kind, c.hidden, c.count, c.width_before, c.width_after, c.strength, self.steps)
                   for c in changes]
        for change in changes:
            self.log(change.describe())
        self.history.extend(changes)
        return changes


def _resolve_distributed(distributed):
    """None for a single process; otherwise the checked `RankSync` (this needs an initialised process group)."""
    if not distributed:
        return None
    from isocompress.train.distributed import resolve

    return resolve(distributed)
