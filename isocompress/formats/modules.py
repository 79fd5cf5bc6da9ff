"""`from_module`: an isotropic network from a live torch module, by running it (docs/math.md, "Importing a live module").

The module is copied, cast to float64 and put in eval mode (the user's module is never changed). Its forward pass on
the example input is traced with hooks on the standard linear modules — Conv1d, Conv2d, Linear, eval-mode BatchNorm,
AvgPool, AdaptiveAvgPool, Flatten — which must run once each, one after another. Whatever runs between two of them is
*probed* as a function: its input replaced by test maps (forward hooks), its result caught at the next linear module
(forward pre-hooks). It must depend on that input alone (a chain, no skip connection) and be one of: nothing, a
flatten, or an isotropic activation over the channel axis (recognised by its behaviour, `isocompress.formats.probe`),
possibly followed by a flatten, a global mean or an average pooling. So the author's `IsotropicConvolution`, the
reference `IsotropicTanhMLP` (its parameters in the reference layout, its activation modules probed) and a user's own
activation class load alike; MaxPool, groups > 1, an elementwise activation, or anything else that breaks the
channel-rotation symmetry is refused in one line naming the module and why.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from isocompress.core.errors import IsocompressError
from isocompress.core.geometry import Geometry, Pool
from isocompress.core.model import IsoMLP, Layer
from isocompress.formats.probe import Fitted, NotIsotropic, fit_activation, isotropic_reference

F64 = torch.float64
CONVS = (nn.Conv1d, nn.Conv2d)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
LINEAR_MODULES = CONVS + NORMS + POOLS + (nn.Linear, nn.Flatten)
PASSIVE = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d)  # identities in eval mode
REFUSED = {
    (nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d):
        "max pooling picks per channel, which breaks the channel-rotation symmetry",
    (nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d):
        "a normalisation with statistics of the input breaks the channel-rotation symmetry",
    (nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.Upsample):
        "only Conv1d/Conv2d, pooling and Linear maps are supported between activations",
}
O_SNAP = 1e-12  # a probed |o| below this is the probe's rounding of o = 0


@dataclass
class Call:
    name: str
    module: nn.Module
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]


class _Caught(Exception):
    def __init__(self, value):
        super().__init__("caught")
        self.value = value


def from_module(module: nn.Module, example_input: torch.Tensor, notify=None) -> IsoMLP:
    """The isotropic network `module` computes, as a float64 `IsoMLP` that `isocompress.save` writes and every command
    reads. `example_input`: one batch of inputs of the module's own shape (N × …). `notify`: told each note (e.g. a
    folded BatchNorm); default: nothing. Raises IsocompressError naming the module and what is unsupported."""
    if isinstance(module, IsoMLP):
        return module.cast(F64)
    if callable(getattr(module, "to_isomlp", None)):  # isocompress.train.nn.IsotropicMLP and its kin
        return module.to_isomlp().cast(F64)
    if not isinstance(module, nn.Module):
        raise IsocompressError(f"from_module needs a torch.nn.Module, got {type(module).__name__}")
    x = _example(example_input)
    net = copy.deepcopy(module).to(F64).eval()
    notes: list[str] = []
    if _is_reference_mlp(net):
        model = _reference_mlp(net, x, notes)
    else:
        model = _traced(net, x, notes)
    for text in notes:
        (notify or (lambda _: None))(text)
    return model


def _example(example_input) -> torch.Tensor:
    if not isinstance(example_input, torch.Tensor) or not example_input.is_floating_point():
        raise IsocompressError("from_module needs an example input: a floating-point tensor of one batch (N × …)")
    if example_input.dim() < 2 or example_input.shape[0] < 1:
        raise IsocompressError(f"the example input has shape {tuple(example_input.shape)}; give a batch N × …")
    return example_input.detach().to(F64)


# --- tracing the chain of linear modules ------------------------------------------------------------------------------
def trace(net: nn.Module, x: torch.Tensor) -> list[Call]:
    """The linear modules (and refused or elementwise ones) called by one forward pass, in order."""
    calls: list[Call] = []
    handles = []
    for name, sub in net.named_modules():
        if sub is net or (not isinstance(sub, LINEAR_MODULES + _refused_types()) and list(sub.children())):
            continue
        handles.append(sub.register_forward_hook(_recorder(calls, name)))
    try:
        with torch.no_grad():
            net(x)
    except IsocompressError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's forward raised: one line with its message
        raise IsocompressError(f"the module's forward pass on the example input failed ({type(exc).__name__}: "
                               f"{str(exc)[:160]}); give an example input of the module's own shape") from None
    finally:
        for h in handles:
            h.remove()
    return calls


def _recorder(calls: list[Call], name: str):
    def hook(module, args, output):
        shape_in = tuple(args[0].shape) if args and isinstance(args[0], torch.Tensor) else ()
        shape_out = tuple(output.shape) if isinstance(output, torch.Tensor) else ()
        calls.append(Call(name, module, shape_in, shape_out))
    return hook


def _refused_types() -> tuple:
    return tuple(t for types in REFUSED for t in types)


def _check_calls(calls: list[Call]) -> list[Call]:
    """The linear calls, after refusing unsupported modules and modules called more than once."""
    for call in calls:
        for types, why in REFUSED.items():
            if isinstance(call.module, types):
                raise IsocompressError(f"module {call.name!r} ({type(call.module).__name__}): {why}")
    linear = [c for c in calls if isinstance(c.module, LINEAR_MODULES)]
    names = [c.name for c in linear]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise IsocompressError(f"module {repeated[0]!r} is called more than once in a forward pass; isocompress needs"
                               " a chain in which each layer runs once")
    if not linear:
        raise IsocompressError("the module has no Conv1d, Conv2d or Linear layer that isocompress can read (a module"
                               " computing with raw parameters needs the reference IsotropicTanhMLP layout)")
    for call in linear:
        _check_module(call)
    return linear


def _check_module(call: Call) -> None:
    m, where = call.module, f"module {call.name!r} ({type(call.module).__name__})"
    if isinstance(m, CONVS):
        if m.groups != 1:
            raise IsocompressError(f"{where}: groups = {m.groups} > 1 breaks the channel-rotation symmetry (a rotation"
                                   " must act on all channels alike); use groups = 1")
        if m.padding_mode != "zeros":
            raise IsocompressError(f"{where}: padding_mode {m.padding_mode!r}; only zero padding commutes with the"
                                   " channel rotations isocompress uses")
        if isinstance(m.padding, str) and m.padding != "valid" and any(
                (d * (k - 1)) % 2 for k, d in zip(m.kernel_size, m.dilation)):
            raise IsocompressError(f"{where}: padding='same' with an even kernel pads unevenly; give explicit padding")
    if isinstance(m, NORMS) and (m.training or not m.track_running_stats or m.running_mean is None):
        raise IsocompressError(f"{where}: BatchNorm with batch statistics; isocompress folds eval-mode BatchNorm with"
                               " running statistics only")
    if isinstance(m, (nn.AvgPool1d, nn.AvgPool2d)):
        if m.ceil_mode or getattr(m, "divisor_override", None) is not None or (
                not m.count_include_pad and any(_pair(m.padding, 1))):
            raise IsocompressError(f"{where}: ceil_mode, divisor_override or count_include_pad=False with padding"
                                   " are not supported; use the defaults")
    if isinstance(m, nn.Linear) and len(call.in_shape) > 2:
        raise IsocompressError(f"{where}: a Linear applied to a map of shape {call.in_shape[1:]} acts on its last axis,"
                               " not on the channels; flatten first")
    if isinstance(m, nn.Flatten) and (m.start_dim != 1 or m.end_dim != -1):
        raise IsocompressError(f"{where}: only Flatten(start_dim=1) is supported")


def _pair(value, n: int) -> tuple[int, ...]:
    return (value,) * n if isinstance(value, int) else tuple(value)


# --- probing what runs between the linear modules ---------------------------------------------------------------------
def run_with(net: nn.Module, x: torch.Tensor, replace: nn.Module | None, value: torch.Tensor | None,
             catch: nn.Module | None) -> torch.Tensor:
    """The forward pass with `replace`'s output replaced by `value`, returning what `catch` receives (or the
    network's output when `catch` is None)."""
    handles = []
    if replace is not None:
        handles.append(replace.register_forward_hook(lambda m, a, out: value))
    if catch is not None:
        def pre(module, args):
            raise _Caught(args[0])
        handles.append(catch.register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            out = net(x)
    except _Caught as caught:
        return caught.value
    finally:
        for h in handles:
            h.remove()
    if catch is not None:
        raise IsocompressError("a layer was not reached when the one before it was changed: the network is not a"
                               " chain of layers")
    return out


def classify_gap(phi, shape: tuple[int, ...], where: str, seed: int = 0) -> tuple[Fitted | None, str, Pool | None]:
    """(activation or None, "same" | "flatten" | "mean" | "pool", code pooling) for a gap φ of maps of `shape`
    (N × C × spatial, or N × C). Raises IsocompressError naming `where` when φ is none of the supported forms."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(*shape, dtype=F64, generator=gen)
    out = phi(z)
    tail = _tail_op(z, out)
    if tail is not None and torch.allclose(_apply_tail(z, tail, out.shape), out, rtol=1e-12, atol=1e-14):
        return None, tail, _code_pool(z.shape, out.shape) if tail == "pool" else None
    if tail is None:
        raise IsocompressError(f"{where} maps a map of shape {tuple(z.shape[1:])} to {tuple(out.shape[1:])}: not an"
                               " activation, a flatten, a mean or an average pooling")
    fitted = _fit_on_constant_maps(phi, z.shape, tail, where)
    expected = _apply_tail(isotropic_reference(fitted, z, 1), tail, out.shape)
    if not torch.allclose(expected, out, rtol=1e-9, atol=1e-12):
        raise IsocompressError(f"{where} is not an isotropic activation acting on each position's channel vector"
                               f" (it matches σ = {fitted.sigma}, o = {fitted.o:.4g} on single vectors, not on maps)")
    return fitted, tail, _code_pool(z.shape, out.shape) if tail == "pool" else None


def _tail_op(z: torch.Tensor, out: torch.Tensor) -> str | None:
    if tuple(out.shape) == tuple(z.shape):
        return "same"
    if z.dim() > 2 and out.numel() == z.numel() and out.dim() == 2:
        return "flatten"
    if z.dim() > 2 and tuple(out.shape) == tuple(z.shape[:2]):
        return "mean"
    if z.dim() > 2 and out.dim() == z.dim() and tuple(out.shape[:2]) == tuple(z.shape[:2]) and \
            all(a % b == 0 for a, b in zip(z.shape[2:], out.shape[2:])):
        return "pool"
    return None


def _apply_tail(h: torch.Tensor, tail: str, shape) -> torch.Tensor:
    if tail == "same":
        return h
    if tail == "flatten":
        return h.reshape(h.shape[0], -1)
    if tail == "mean":
        return h.mean(dim=tuple(range(2, h.dim())))
    kernel = tuple(a // b for a, b in zip(h.shape[2:], shape[2:]))
    avg = torch.nn.functional.avg_pool1d if h.dim() == 3 else torch.nn.functional.avg_pool2d
    return avg(h, kernel, kernel)


def _code_pool(z_shape, out_shape) -> Pool:
    kernel = tuple(a // b for a, b in zip(z_shape[2:], out_shape[2:]))
    return Pool(kernel=kernel, stride=kernel)


def _fit_on_constant_maps(phi, shape, tail: str, where: str) -> Fitted:
    """σ and o from maps that hold one channel vector at every position (a flatten, mean or pooling after the
    activation then gives f of that vector back)."""
    channels, positions = shape[1], math.prod(shape[2:])

    def act(v: torch.Tensor) -> torch.Tensor:
        maps = v.reshape(*v.shape, *([1] * (len(shape) - 2))).expand(v.shape[0], channels, *shape[2:]).contiguous()
        out = phi(maps)
        if tail == "flatten":
            return out.reshape(v.shape[0], channels, positions)[..., 0]
        return out if out.dim() == 2 else out.reshape(v.shape[0], channels, -1)[..., 0]

    try:
        fitted = fit_activation(act, channels)
    except NotIsotropic as exc:
        raise IsocompressError(f"{where} is not an isotropic activation: {exc}") from None
    return _snapped(fitted)


def _snapped(fitted: Fitted) -> Fitted:
    return Fitted(fitted.sigma, 0.0 if abs(fitted.o) < O_SNAP else fitted.o, fitted.identity_below)


# --- the chain, gap by gap ---------------------------------------------------------------------------------------------
class CodePool(nn.Module):
    """A pooling done in the forward's code (x.mean(...), F.avg_pool2d(x, 2)): a pseudo-module of a layer."""

    def __init__(self, pool: Pool):
        super().__init__()
        self.pool = pool


def _traced(net: nn.Module, x: torch.Tensor, notes: list[str]) -> IsoMLP:
    """The layers of a traced chain: the linear calls up to each activation form one weight layer."""
    calls = trace(net, x)
    linear = _check_calls(calls)
    input_shape = _input_shape(net, x, linear[0])
    groups, ops = [], []
    for k, call in enumerate(linear):
        ops.append(call)
        nxt = linear[k + 1] if k + 1 < len(linear) else None
        fitted, after = _gap(net, x, calls, call, nxt, notes)
        if fitted is not None:
            groups.append((ops, fitted))
            ops = []
        ops += after
    groups.append((ops, None))
    return IsoMLP(_layers_of(groups, input_shape, notes))


def _gap(net, x, calls: list[Call], src: Call, dst: Call | None,
         notes: list[str]) -> tuple[Fitted | None, list[Call]]:
    """The activation after `src` (or None) and the flattens and poolings done in code after it, as pseudo-calls."""
    where = _gap_name(calls, src, dst)
    phi = gap_function(net, x, src, dst)
    _check_chain(net, x, src, dst, phi, where)
    fitted, tail, code_pool = classify_gap(phi, (3, *src.out_shape[1:]), where)
    note = None if fitted is None else fitted.identity_note(f"the activation after {src.name!r}")
    if note is not None:
        notes.append(note)
    if dst is None and (fitted is not None or tail not in ("same", "flatten")):
        raise IsocompressError(f"{where} acts on the last layer's output; isocompress needs the network to end with its"
                               " last Linear or Conv layer (the logits)")
    if tail == "flatten" and dst is not None:
        return fitted, [Call("(flatten in code)", nn.Flatten(), src.out_shape, ())]
    if tail in ("mean", "pool"):
        return fitted, [Call("(pooling in code)", CodePool(code_pool if tail == "pool" else Pool()), src.out_shape, ())]
    return fitted, []


def gap_function(net: nn.Module, x: torch.Tensor, src: Call, dst: Call | None):
    """What runs between `src`'s output and `dst`'s input (None: the network output), as a function of the first."""
    return lambda value: run_with(net, x, src.module, value, None if dst is None else dst.module)


def _gap_name(calls: list[Call], src: Call, dst: Call | None) -> str:
    """'what runs between 'conv1' and 'conv2' (act1: MyIso)': the modules called in between, named for messages."""
    i = calls.index(src)
    j = calls.index(dst) if dst is not None else len(calls)
    between = [f"{c.name}: {type(c.module).__name__}" for c in calls[i + 1:j]]
    target = f"{src.name!r} and {dst.name!r}" if dst is not None else f"{src.name!r} and the output"
    return f"what runs between {target}" + (f" ({', '.join(between)})" if between else "")


def _check_chain(net, x, src: Call, dst: Call | None, phi, where: str) -> None:
    """The gap must depend on src's output alone: the same value with another network input gives the same result."""
    gen = torch.Generator().manual_seed(7)
    value = torch.randn(x.shape[0], *src.out_shape[1:], dtype=F64, generator=gen)
    other = x + torch.randn(x.shape, dtype=F64, generator=gen) * float(x.abs().max().clamp_min(1.0))
    first = phi(value)
    second = run_with(net, other, src.module, value, None if dst is None else dst.module)
    if not torch.allclose(first, second, rtol=1e-12, atol=1e-14):
        raise IsocompressError(f"{where} depends on more than the output of {src.name!r} (a skip connection, a psi term"
                               " or another branch); isocompress reads chains of layers")


def _input_shape(net, x: torch.Tensor, first: Call) -> tuple[int, ...]:
    """The first layer's input shape, which must be the network input itself, possibly reshaped (e.g. N × 40 signals
    read as N × 1 × 40 maps)."""
    probe = torch.randn(x.shape, dtype=F64, generator=torch.Generator().manual_seed(3))
    seen = run_with(net, probe, None, None, first.module)
    if seen.numel() != probe.numel() or not torch.equal(seen.reshape(probe.shape), probe):
        raise IsocompressError(f"the module changes its input before its first layer {first.name!r} (a normalisation or"
                               " another transform); apply it to the data instead, or start the module at that layer")
    return tuple(seen.shape[1:])


# --- one layer from its modules -------------------------------------------------------------------------------------
@dataclass
class Parts:
    pool: Pool | None = None
    flatten: bool = False
    weight: Call | None = None
    before: list = None  # BatchNorm calls before the weight
    after: list = None  # BatchNorm calls after it


def _layers_of(groups: list[tuple[list[Call], Fitted | None]], input_shape: tuple[int, ...], notes: list[str]):
    layers, shape = [], input_shape
    for ops, fitted in groups:
        parts = _parts(ops, shape)
        layer = _layer(parts, shape, fitted, notes)
        layers.append(layer)
        shape = (layer.n_out, *layer.geometry.out_spatial)
    return layers


def _parts(ops: list[Call], shape: tuple[int, ...]) -> Parts:
    parts = Parts(before=[], after=[])
    spatial = tuple(shape[1:])
    for op in ops:
        m, where = op.module, f"module {op.name!r} ({type(op.module).__name__})"
        if isinstance(m, POOLS + (CodePool,)):
            if parts.weight is not None or parts.pool is not None or parts.flatten:
                raise IsocompressError(f"{where}: a pooling must come right after an activation (one per layer)")
            parts.pool = _pool_of(m, spatial, where)
        elif isinstance(m, nn.Flatten):
            parts.flatten = parts.flatten or parts.weight is None
        elif isinstance(m, NORMS):
            (parts.after if parts.weight is not None else parts.before).append(op)
        elif parts.weight is not None:
            raise IsocompressError(f"{where} follows {parts.weight.name!r} with no activation between them; multiply"
                                   " the two linear maps out first")
        else:
            parts.weight = op
    if parts.weight is None:
        raise IsocompressError(f"the modules {[op.name for op in ops]} between two activations hold no Conv or Linear")
    return parts


def _pool_of(m: nn.Module, spatial: tuple[int, ...], where: str) -> Pool:
    if isinstance(m, CodePool):
        return m.pool
    d = len(spatial)
    if isinstance(m, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)):
        out = _pair(m.output_size, d)
        if any(o is None or s % o for s, o in zip(spatial, out)):
            raise IsocompressError(f"{where}: output size {list(out)} does not divide the map {list(spatial)}; use a"
                                   " plain AvgPool")
        kernel = tuple(s // o for s, o in zip(spatial, out))
        return Pool(kernel=kernel, stride=kernel)
    kernel = _pair(m.kernel_size, d)
    return Pool(kernel=kernel, stride=_pair(m.stride or m.kernel_size, d), padding=_pair(m.padding, d))


def _layer(parts: Parts, shape: tuple[int, ...], fitted: Fitted | None, notes: list[str]) -> Layer:
    call, m = parts.weight, parts.weight.module
    where = f"module {call.name!r} ({type(m).__name__})"
    spatial = tuple(shape[1:])
    pooled = spatial if parts.pool is None else parts.pool.out_spatial(spatial)
    weight = m.weight.detach().to(F64)
    bias = torch.zeros(weight.shape[0], dtype=F64) if m.bias is None else m.bias.detach().to(F64)
    if isinstance(m, nn.Linear):
        geometry, weight = _linear_geometry(parts, spatial, pooled, weight, shape[0], where)
    else:
        geometry = _conv_geometry(m, spatial, parts.pool, pooled, where)
    weight, bias = _fold_norms(parts, weight, bias, geometry, where, notes)
    o = None if fitted is None else torch.tensor(fitted.o, dtype=F64)
    return Layer(weight=weight, bias=bias, n_in=int(shape[0]), o=o, geometry=geometry,
                 sigma="tanh" if fitted is None else fitted.sigma)


def _linear_geometry(parts: Parts, spatial, pooled, weight: torch.Tensor, channels: int, where: str):
    if pooled and not parts.flatten:
        raise IsocompressError(f"{where}: a Linear reads a map of shape {list(pooled)}; flatten it first")
    if not pooled:
        return Geometry(in_spatial=spatial, pool=parts.pool if spatial else None), weight
    if weight.shape[1] != channels * math.prod(pooled):
        raise IsocompressError(f"{where}: takes {weight.shape[1]} features; the flattened map has"
                               f" {channels * math.prod(pooled)}")
    geometry = Geometry(in_spatial=spatial, kernel=pooled, pool=parts.pool, flatten=True)
    return geometry, weight.reshape(weight.shape[0], channels, *pooled)


def _conv_geometry(m, spatial, pool, pooled, where: str) -> Geometry:
    if len(pooled) != len(m.kernel_size):
        raise IsocompressError(f"{where}: a {len(m.kernel_size)}-D convolution reads a map of shape {list(pooled)}")
    d = len(pooled)
    if isinstance(m.padding, str):  # 'valid' or 'same' (odd total padding checked in _check_module)
        padding = (0,) * d if m.padding == "valid" else tuple(dl * (k - 1) // 2 for k, dl in zip(m.kernel_size,
                                                                                                   m.dilation))
    else:
        padding = tuple(m.padding)
    return Geometry(in_spatial=spatial, kernel=tuple(m.kernel_size), stride=tuple(m.stride), padding=padding,
                    dilation=tuple(m.dilation), pool=pool)


def _norm_affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchNorm in eval mode as y = s·x + t per channel."""
    var, mean = bn.running_var.detach().to(F64), bn.running_mean.detach().to(F64)
    gamma = torch.ones_like(var) if bn.weight is None else bn.weight.detach().to(F64)
    beta = torch.zeros_like(var) if bn.bias is None else bn.bias.detach().to(F64)
    s = gamma / torch.sqrt(var + bn.eps)
    return s, beta - mean * s


def _fold_norms(parts: Parts, weight, bias, geometry: Geometry, where: str, notes: list[str]):
    """Eval-mode BatchNorm folded into the weight: after it, rows scaled and the bias mapped; before it, columns
    scaled and the shift pushed through the weight (only without zero padding, where borders would not see it)."""
    for call in parts.before:
        if any(geometry.padding) or (geometry.pool is not None and any(geometry.pool.padding)):
            raise IsocompressError(f"module {call.name!r}: a BatchNorm before a zero-padded layer ({where}) cannot be"
                                   " folded (the padded border does not see its shift); put it after the layer")
        s, t = _norm_affine(call.module)
        shift = weight.reshape(weight.shape[0], weight.shape[1], -1).sum(dim=2) @ t
        weight = weight * s.reshape(1, -1, *([1] * (weight.dim() - 2)))
        bias = bias + shift
        notes.append(f"folded BatchNorm {call.name!r} into the layer after it ({where})")
    for call in parts.after:
        s, t = _norm_affine(call.module)
        weight = weight * s.reshape(-1, *([1] * (weight.dim() - 1)))
        bias = s * bias + t
        notes.append(f"folded BatchNorm {call.name!r} into the layer before it ({where})")
    return weight, bias


# --- the reference IsotropicTanhMLP: parameters in its layout, activations probed ----------------------------------
def _is_reference_mlp(net: nn.Module) -> bool:
    from isocompress.formats import io

    keys = set(net.state_dict())
    return bool(keys) and all(io.REF_KEY.match(k) for k in keys) and hasattr(net, "activation")


def _reference_mlp(net: nn.Module, x: torch.Tensor, notes: list[str]) -> IsoMLP:
    """Its weights, biases and psi from its state_dict; each o from its activation module's behaviour, so neither
    `positive_intrinsic_length` nor how the flag is stored matters."""
    from dataclasses import replace

    from isocompress.formats import io

    tensors = {k: v.detach().to(F64) for k, v in net.state_dict().items()}
    model = io.model_from_tensors(tensors, None, "module", ref_intrinsic_length="raw")
    layers = list(model.layers)
    for i, act in enumerate(net.activation):
        fitted = _probe_activation_module(act, layers[i].n_out, f"activation {i} ({type(act).__name__})")
        layers[i] = replace(layers[i], o=torch.tensor(fitted.o, dtype=F64), sigma=fitted.sigma)
    notes.append("read a reference IsotropicTanhMLP: its intrinsic lengths o probed from its activation modules")
    return IsoMLP(layers)


def _probe_activation_module(act: nn.Module, channels: int, where: str) -> Fitted:
    """An activation module called on N × C vectors. One that returns a pair of a gain (N × 1) and a vector (N × C) is
    read by what the pair holds: (gain, z) with z its own input, as the reference code returns, means gain·z;
    (h, gain) means h."""
    def f(v: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = act(v)
        return _activation_value(out, v, where)

    try:
        fitted = fit_activation(f, channels)
    except NotIsotropic as exc:
        raise IsocompressError(f"{where} is not an isotropic activation: {exc}") from None
    return _snapped(fitted)


def _activation_value(out, v: torch.Tensor, where: str) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out):
        full = [t for t in out if tuple(t.shape) == tuple(v.shape)]
        gain = [t for t in out if tuple(t.shape) == (*v.shape[:-1], 1)]
        if len(full) == 1 and len(gain) == 1:
            return gain[0] * full[0] if torch.equal(full[0], v) else full[0]
    raise IsocompressError(f"{where} returns {type(out).__name__}; expected a tensor, or a (gain, z) pair")
