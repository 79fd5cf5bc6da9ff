"""The in-memory isotropic network, MLP or CNN (docs/math.md, "Forward pass" and "Convolutional networks").

`Layer` is an immutable record of one weight layer's tensors and geometry; `IsoMLP` (also `IsoNet`) is a
`torch.nn.Module` built from a sequence of layers. A hidden space is C channels at P positions (an MLP is P = 1):
the activation acts on each position's channel vector. Transforms are pure functions `IsoMLP -> IsoMLP` (see
`isocompress.core.layers`); they never edit in place. State-dict keys (`layers.{i}.weight|bias|psi|o`) are
isocompress's file format.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from isocompress.core.config import ModelConfig
from isocompress.core.errors import IsocompressError
from isocompress.core.geometry import Geometry, pooled_window_geometry
from isocompress.core.primitives import SIGMAS, diag_matmul, diag_to_dense, isotropic

DENSE = Geometry()


@dataclass(frozen=True)
class Layer:
    """One weight layer: z = W ⋆ pool(h) + b (+ Ψ ⋆ pool(g_prev)). `o` is the intrinsic length and `sigma` the radial
    function of the activation after it (o None for the output layer). `weight` is C_out × C_in × kernel (C_out × C_in
    for a dense layer), or for a pointwise layer possibly its k = min(C_out, C_in) diagonal; `psi` is C_out × kernel
    (a vector for a dense layer): the psi kernel, a convolution of the previous activation's g map."""

    weight: torch.Tensor
    bias: torch.Tensor
    n_in: int
    psi: torch.Tensor | None = None
    o: torch.Tensor | None = None
    geometry: Geometry = DENSE
    sigma: str = "tanh"

    @property
    def kind(self) -> str:
        return "dense" if self.weight.dim() >= 2 else "diag"

    @property
    def n_out(self) -> int:
        return int(self.bias.shape[0])

    @property
    def is_output(self) -> bool:
        return self.o is None

    def dense_weight(self) -> torch.Tensor:
        """C_out × C_in × kernel (C_out × C_in for a dense layer)."""
        if self.kind == "dense":
            return self.weight
        return diag_to_dense(self.weight, self.n_out, self.n_in).reshape(self.n_out, self.n_in,
                                                                       *self.geometry.kernel)

    def matrix(self) -> torch.Tensor:
        """The reshaped kernel M = W.reshape(C_out, C_in·k): rotations of the output channels act on its rows."""
        return self.dense_weight().reshape(self.n_out, -1)

    def psi_matrix(self) -> torch.Tensor | None:
        """Ψ reshaped C_out × k (a column for a dense layer), or None."""
        return None if self.psi is None else self.psi.reshape(self.n_out, -1)

    def as_dense(self) -> "Layer":
        return self if self.kind == "dense" else replace(self, weight=self.dense_weight())

    def num_params(self) -> int:
        count = self.weight.numel() + self.bias.numel()
        count += 0 if self.psi is None else self.psi.numel()
        count += 0 if self.o is None else 1
        return count

    def flops(self) -> int:
        """Floating-point operations of the layer's linear maps per input (2 per multiply-add: weight and psi, at every
        output position); pooling, the bias and the activation add O(C·P) more, not counted."""
        return 2 * (self.weight.numel() + (0 if self.psi is None else self.psi.numel())) * self.geometry.out_positions

    def record(self, index: int) -> dict:
        """The layer's row in report.json's "layers" (and `inspect`): kind, channels, geometry, params, FLOPs."""
        return {"index": index, "kind": self.kind, "shape": [self.n_out, self.n_in],
                "geometry": self.geometry.describe(), "kernel": list(self.geometry.kernel),
                "out_spatial": list(self.geometry.out_spatial), "params": self.num_params(), "flops": self.flops(),
                "psi": self.psi is not None, "o": None if self.o is None else float(self.o),
                "activation": None if self.o is None else self.sigma}

    def cast(self, dtype: torch.dtype) -> "Layer":
        def c(t):
            return None if t is None else t.to(dtype)

        return replace(self, weight=c(self.weight), bias=c(self.bias), psi=c(self.psi), o=c(self.o))

    def apply_weight(self, h: torch.Tensor) -> torch.Tensor:
        """W ⋆ h for an input that is already pooled (vectors ..., C_in; maps N × C_in × spatial)."""
        if not self.geometry.kernel:
            if self.kind == "dense":
                return h @ self.weight.T
            return diag_matmul(self.weight, h, self.n_out)
        return self._conv(h, self.dense_weight())

    def pre_activation(self, h: torch.Tensor, g_prev: torch.Tensor | None) -> torch.Tensor:
        """z = W ⋆ pool(h) + b + Ψ ⋆ pool(g_prev): the layer's output before the activation."""
        geometry = self.geometry
        if geometry.pool is not None:
            h = pool_map(h, geometry)
            g_prev = None if g_prev is None else pool_map(g_prev, geometry)
        z = self.apply_weight(h) + self.bias.reshape(-1, *([1] * len(geometry.out_spatial)))
        return z if self.psi is None else z + self._psi_term(g_prev)

    def _psi_term(self, g: torch.Tensor) -> torch.Tensor:
        if not self.geometry.kernel:
            return self.psi * g
        return self._conv(g, self.psi.unsqueeze(1))

    def _conv(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        geometry = self.geometry
        conv = F.conv1d if len(geometry.kernel) == 1 else F.conv2d
        if len(geometry.kernel) not in (1, 2):
            raise IsocompressError(f"{len(geometry.kernel)}-D convolutions are not supported (1-D and 2-D are)")
        lead = h.shape[:-1 - len(geometry.kernel)]
        flat = h.reshape(-1, *h.shape[len(lead):])
        out = conv(flat, weight, stride=geometry.stride, padding=geometry.padding, dilation=geometry.dilation)
        out = out.reshape(*lead, *out.shape[1:])
        return out.flatten(-1 - len(geometry.kernel)) if geometry.flatten else out


def pool_map(h: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """Average pooling of an N × C × spatial map (global: the mean over every position, giving N × C)."""
    pool, spatial = geometry.pool, geometry.in_spatial
    d = len(spatial)
    if pool.is_global:
        return h.mean(dim=tuple(range(-d, 0)))
    kernel, stride, padding = pooled_window_geometry(pool, spatial)
    lead = h.shape[:-1 - d]
    flat = h.reshape(-1, *h.shape[len(lead):])
    avg = F.avg_pool1d if d == 1 else F.avg_pool2d
    out = avg(flat, kernel, stride, padding, count_include_pad=True)
    return out.reshape(*lead, *out.shape[1:])


def dense_layer(weight, bias, psi=None, o=None) -> Layer:
    """Convenience constructor from array-likes (float64)."""

    def t(x):
        return None if x is None else torch.as_tensor(x, dtype=torch.float64)

    w = t(weight)
    return Layer(weight=w, bias=t(bias), n_in=int(w.shape[1]), psi=t(psi), o=None if o is None else t(o).reshape(()))


class IsoMLP(nn.Module):
    """An isotropic network (MLP or CNN). Its tensors are buffers, so `state_dict()` gives isocompress's format."""

    def __init__(self, layers: Sequence[Layer]):
        super().__init__()
        layers = tuple(layers)
        validate_layers(layers)
        self._meta = [(layer.n_in, layer.geometry, layer.sigma) for layer in layers]
        # Registered as "layers" so that state_dict keys read layers.{i}.weight; `self.layers` stays the property.
        slots = nn.ModuleList()
        for layer in layers:
            slot = nn.Module()
            for name in ("weight", "bias", "psi", "o"):
                value = getattr(layer, name)
                if value is not None:
                    slot.register_buffer(name, value.detach().contiguous())
            slots.append(slot)
        self._modules["layers"] = slots  # add_module would refuse: the name is taken by the property

    # --- structure -----------------------------------------------------------------------------------------------
    @property
    def layers(self) -> tuple[Layer, ...]:
        return tuple(
            Layer(weight=slot.weight, bias=slot.bias, n_in=n_in, psi=getattr(slot, "psi", None),
                  o=getattr(slot, "o", None), geometry=geometry, sigma=sigma)
            for slot, (n_in, geometry, sigma) in zip(self._modules["layers"], self._meta)
        )

    @property
    def widths(self) -> tuple[int, ...]:
        """Channels of every space: input, hidden spaces, output (the widths of an MLP)."""
        layers = self.layers
        return (layers[0].n_in,) + tuple(layer.n_out for layer in layers)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One input's shape: (n_0,) for an MLP, (C, L) or (C, H, W) for a CNN."""
        n_in, geometry, _ = self._meta[0]
        return (n_in, *geometry.in_spatial)

    @property
    def output_shape(self) -> tuple[int, ...]:
        layer = self.layers[-1]
        return (layer.n_out, *layer.geometry.out_spatial)

    @property
    def is_mlp(self) -> bool:
        """Every space is a vector (one position): the architecture of isocompress's first version."""
        return all(geometry == DENSE for _, geometry, _ in self._meta)

    @property
    def config(self) -> ModelConfig:
        layers = self.layers
        if self.is_mlp and all(layer.sigma == "tanh" for layer in layers):
            return ModelConfig(widths=self.widths, kinds=tuple(layer.kind for layer in layers),
                               has_psi=tuple(layer.psi is not None for layer in layers))
        return ModelConfig(widths=self.widths, kinds=tuple(layer.kind for layer in layers),
                           has_psi=tuple(layer.psi is not None for layer in layers), version=2,
                           geometry=tuple(layer.geometry.to_dict() for layer in layers),
                           activations=tuple(layer.sigma for layer in layers[:-1]))

    @property
    def dtype(self) -> torch.dtype:
        return self._modules["layers"][0].weight.dtype

    def num_params(self) -> int:
        return sum(layer.num_params() for layer in self.layers)

    def flops(self) -> int:
        """FLOPs of one forward pass per input (Layer.flops: 2 per multiply-add of the linear maps)."""
        return sum(layer.flops() for layer in self.layers)

    def cast(self, dtype: torch.dtype) -> "IsoMLP":
        """A copy with every tensor in `dtype` (the model itself is unchanged)."""
        return IsoMLP([layer.cast(dtype) for layer in self.layers])

    def with_layers(self, changes: dict[int, Layer]) -> "IsoMLP":
        layers = list(self.layers)
        for index, layer in changes.items():
            layers[index] = layer
        return IsoMLP(layers)

    # --- forward (docs/math.md) ---------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y for inputs x (..., n_0) of an MLP, (N, *input_shape) of a CNN, of any floating dtype: computed in the
        model's dtype, returned in x's."""
        if not x.is_floating_point():
            raise IsocompressError(f"model input has dtype {x.dtype}; give a floating-point tensor (float32 or float64)")
        shape = self.input_shape
        if tuple(x.shape[-len(shape):]) != shape or (len(shape) > 1 and x.dim() != len(shape) + 1):
            expected = f"(..., {shape[0]})" if len(shape) == 1 else f"(N, {', '.join(map(str, shape))})"
            raise IsocompressError(f"model input has shape {tuple(x.shape)}; expected {expected}")
        dtype = self.dtype
        return self.forward_with_hidden(x if x.dtype == dtype else x.to(dtype))[0].to(x.dtype)

    def forward_with_hidden(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Returns (y, pre-activations z_l of each hidden layer, gains g_l of each hidden layer)."""
        h = x
        g_prev = None
        zs: list[torch.Tensor] = []
        gs: list[torch.Tensor] = []
        for layer in self.layers:
            z = layer.pre_activation(h, g_prev)
            if layer.is_output:
                return z, zs, gs
            zs.append(z)
            h, g_prev = isotropic(z, layer.o, layer.sigma, channel_axis(layer.geometry.out_spatial))
            gs.append(g_prev)
        raise AssertionError("validated models end with an output layer")

    def extra_repr(self) -> str:
        kinds = ",".join(layer.kind for layer in self.layers)
        shape = "" if self.is_mlp else f"input={list(self.input_shape)}, "
        return f"{shape}widths={list(self.widths)}, kinds=[{kinds}], params={self.num_params()}"


IsoNet = IsoMLP  # the same class: "MLP" is its history, a CNN is one too


def channel_axis(spatial: tuple[int, ...]) -> int:
    """The channel axis of a space with this spatial shape: -1 for a vector, -(1 + d) for a d-dimensional map."""
    return -1 - len(spatial)


def positions_of(z: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
    """A space's values as one row per (input, position): (N·P) × C. For vectors, z itself (rows = inputs)."""
    if not spatial:
        return z.reshape(-1, z.shape[-1])
    return z.movedim(channel_axis(spatial), -1).reshape(-1, z.shape[channel_axis(spatial)])


def validate_layers(layers: Sequence[Layer], where: str = "model") -> None:
    """Shapes chain, kinds, psi placement, o (any sign: m = sqrt(|o + |z|²|)) only on hidden layers, finite values. Raises IsocompressError."""
    if not layers:
        raise IsocompressError(f"{where}: has no layers")
    for i, layer in enumerate(layers):
        _validate_layer(i, layer, layers, where)


def _validate_layer(i: int, layer: Layer, layers: Sequence[Layer], where: str) -> None:
    last = i == len(layers) - 1
    if layer.bias.dim() != 1:
        raise IsocompressError(f"{where}: layer {i} bias has shape {tuple(layer.bias.shape)}; expected a vector")
    _validate_weight(i, layer, where)
    if i > 0 and layer.n_in != layers[i - 1].n_out:
        raise IsocompressError(
            f"{where}: layer {i} takes {layer.n_in} inputs but layer {i - 1} gives {layers[i - 1].n_out}"
        )
    if i > 0 and layer.geometry.in_spatial != layers[i - 1].geometry.out_spatial:
        raise IsocompressError(
            f"{where}: layer {i} reads a map of spatial shape {list(layer.geometry.in_spatial)} but layer {i - 1} gives"
            f" {list(layers[i - 1].geometry.out_spatial)}")
    _validate_psi(i, layer, where)
    if last and layer.o is not None:
        raise IsocompressError(f"{where}: the output layer {i} has an intrinsic length o; only hidden layers have one")
    if not last:
        if layer.o is None:
            raise IsocompressError(f"{where}: hidden layer {i} has no intrinsic length o")
        if layer.o.numel() != 1:
            raise IsocompressError(f"{where}: layer {i} intrinsic length o must be a scalar")
        if layer.sigma not in SIGMAS:
            raise IsocompressError(f"{where}: layer {i} activation {layer.sigma!r} is not one of {', '.join(SIGMAS)}")
    for name in ("weight", "bias", "psi", "o"):
        t = getattr(layer, name)
        if t is not None and t.device.type != "meta" and not bool(torch.isfinite(t).all()):
            raise IsocompressError(f"{where}: layer {i} {name} contains NaN or Inf; fix the checkpoint (retrain or re-export)")


def _validate_weight(i: int, layer: Layer, where: str) -> None:
    kernel = layer.geometry.kernel
    if len(kernel) > 2:
        raise IsocompressError(f"{where}: layer {i} has a {len(kernel)}-D kernel; 1-D and 2-D convolutions are supported")
    if layer.weight.dim() >= 2:
        expected = (layer.n_out, layer.n_in, *kernel)
        if tuple(layer.weight.shape) != expected:
            raise IsocompressError(
                f"{where}: layer {i} weight has shape {tuple(layer.weight.shape)}; its bias implies {layer.n_out} outputs,"
                f" its input has {layer.n_in} channels" + (f" and its kernel is {list(kernel)}" if kernel else "")
            )
    elif layer.weight.dim() == 1:
        if not layer.geometry.pointwise:
            raise IsocompressError(f"{where}: layer {i} is a diagonal but its kernel {list(kernel)} is not 1×1")
        if layer.weight.shape[0] != min(layer.n_out, layer.n_in):
            raise IsocompressError(
                f"{where}: layer {i} diagonal weight has {layer.weight.shape[0]} entries; expected min({layer.n_out},"
                f" {layer.n_in})"
            )
    else:
        raise IsocompressError(f"{where}: layer {i} weight has {layer.weight.dim()} dimensions; expected 1 or 2")


def _validate_psi(i: int, layer: Layer, where: str) -> None:
    if layer.psi is None:
        return
    if i == 0:
        raise IsocompressError(f"{where}: layer 0 has psi; psi needs a previous activation (layers 1 and up)")
    expected = (layer.n_out, *layer.geometry.kernel)
    if tuple(layer.psi.shape) != expected:
        raise IsocompressError(f"{where}: layer {i} psi has shape {tuple(layer.psi.shape)}; expected {expected}")


def random_model(
    widths: Iterable[int],
    *,
    psi: bool = False,
    o: float | tuple[float, float] = 0.0,
    seed: int = 0,
    bias_scale: float = 0.5,
    weight_scale: float = 1.0,
) -> IsoMLP:
    """A random float64 model for tests and benchmarks. `o` a number or a (low, high) range; psi on layers ≥ 1."""
    widths = list(widths)
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        last = i == len(widths) - 2
        w = torch.randn(n_out, n_in, dtype=torch.float64, generator=gen) * weight_scale / n_in**0.5
        b = torch.randn(n_out, dtype=torch.float64, generator=gen) * bias_scale
        p = torch.randn(n_out, dtype=torch.float64, generator=gen) * 0.5 if (psi and i > 0) else None
        if last:
            ov = None
        elif isinstance(o, tuple):
            ov = torch.empty((), dtype=torch.float64).uniform_(o[0], o[1], generator=gen)
        else:
            ov = torch.tensor(float(o), dtype=torch.float64)
        layers.append(Layer(weight=w, bias=b, n_in=n_in, psi=p, o=ov))
    return IsoMLP(layers)


def random_cnn(input_shape: Sequence[int], layers: Sequence[dict], *, psi: bool = False,
               o: float | tuple[float, float] = 0.0, sigma: str = "tanh", seed: int = 0, bias_scale: float = 0.5,
               weight_scale: float = 1.0) -> IsoMLP:
    """A random float64 network for tests and benchmarks. `layers`: one dict per weight layer with "channels" and
    optionally "kernel", "stride", "padding", "dilation" (an int or per-axis list), "pool" (None, "global", or a
    kernel: int/list, optionally with "pool_stride"/"pool_padding") and "flatten" (True: the kernel covers the whole
    map); the last dict is the output layer. A layer without "kernel" on a map is 1×1; on a vector, dense."""
    gen = torch.Generator().manual_seed(seed)
    channels, spatial = int(input_shape[0]), tuple(int(s) for s in input_shape[1:])
    out = []
    for i, spec in enumerate(layers):
        geometry = _spec_geometry(spec, spatial)
        n_out, taps = int(spec["channels"]), geometry.taps
        w = torch.randn(n_out, channels, *geometry.kernel, dtype=torch.float64, generator=gen)
        w = w * weight_scale / math.sqrt(channels * taps)
        b = torch.randn(n_out, dtype=torch.float64, generator=gen) * bias_scale
        p = (torch.randn(n_out, *geometry.kernel, dtype=torch.float64, generator=gen) * 0.5
             if (psi and i > 0) else None)
        last = i == len(layers) - 1
        ov = None if last else (torch.empty((), dtype=torch.float64).uniform_(o[0], o[1], generator=gen)
                                if isinstance(o, tuple) else torch.tensor(float(o), dtype=torch.float64))
        out.append(Layer(weight=w, bias=b, n_in=channels, psi=p, o=ov, geometry=geometry, sigma=sigma))
        channels, spatial = n_out, geometry.out_spatial
    return IsoMLP(out)


def _spec_geometry(spec: dict, spatial: tuple[int, ...]) -> Geometry:
    from isocompress.core.geometry import Pool

    pool = spec.get("pool")
    if pool == "global":
        pool = Pool()
    elif pool is not None:
        k = (pool,) * len(spatial) if isinstance(pool, int) else tuple(pool)
        pool = Pool(kernel=k, stride=tuple(spec.get("pool_stride", ())) if not isinstance(spec.get("pool_stride"), int)
                    else (spec["pool_stride"],) * len(spatial), padding=spec.get("pool_padding", ()) or ())
    pooled = spatial if pool is None else pool.out_spatial(spatial)
    if spec.get("flatten"):
        return Geometry(in_spatial=spatial, kernel=pooled, pool=pool, flatten=True)
    kernel = spec.get("kernel", 1 if pooled else None)
    if kernel is None:
        return Geometry(in_spatial=spatial, pool=pool)
    kernel = (kernel,) * len(pooled) if isinstance(kernel, int) else tuple(kernel)
    return Geometry(in_spatial=spatial, kernel=kernel, stride=_axes(spec.get("stride", 1), pooled),
                    padding=_axes(spec.get("padding", 0), pooled), dilation=_axes(spec.get("dilation", 1), pooled),
                    pool=pool)


def _axes(value, spatial) -> tuple[int, ...]:
    return (value,) * len(spatial) if isinstance(value, int) else tuple(value)
