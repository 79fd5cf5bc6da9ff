"""The in-memory isotropic MLP (docs/math.md, "Forward pass").

`Layer` is an immutable record of one weight layer's tensors; `IsoMLP` is a `torch.nn.Module` built from a sequence
of layers. Transforms are pure functions `IsoMLP -> IsoMLP` (see `isocompress.core.layers`); they never edit in place.
State-dict keys (`layers.{i}.weight|bias|psi|o`) are isocompress's file format.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Sequence

import torch
from torch import nn

from isocompress.core.config import ModelConfig
from isocompress.core.errors import IsocompressError
from isocompress.core.primitives import diag_matmul, diag_to_dense, isotropic_tanh


@dataclass(frozen=True)
class Layer:
    """One weight layer: z = W h + b (+ psi·g_prev). `o` is the intrinsic length of the activation after it
    (None for the output layer). A "diag" weight is the k = min(n_out, n_in) diagonal of an n_out × n_in matrix."""

    weight: torch.Tensor
    bias: torch.Tensor
    n_in: int
    psi: torch.Tensor | None = None
    o: torch.Tensor | None = None

    @property
    def kind(self) -> str:
        return "dense" if self.weight.dim() == 2 else "diag"

    @property
    def n_out(self) -> int:
        return int(self.bias.shape[0])

    @property
    def is_output(self) -> bool:
        return self.o is None

    def dense_weight(self) -> torch.Tensor:
        if self.kind == "dense":
            return self.weight
        return diag_to_dense(self.weight, self.n_out, self.n_in)

    def as_dense(self) -> "Layer":
        return self if self.kind == "dense" else replace(self, weight=self.dense_weight())

    def num_params(self) -> int:
        count = self.weight.numel() + self.bias.numel()
        count += 0 if self.psi is None else self.psi.numel()
        count += 0 if self.o is None else 1
        return count

    def flops(self) -> int:
        """Floating-point operations of the layer's linear maps per input (2 per multiply-add: weight and psi); the
        bias and the activation add O(n_out) more, not counted."""
        return 2 * (self.weight.numel() + (0 if self.psi is None else self.psi.numel()))

    def cast(self, dtype: torch.dtype) -> "Layer":
        def c(t):
            return None if t is None else t.to(dtype)

        return replace(self, weight=c(self.weight), bias=c(self.bias), psi=c(self.psi), o=c(self.o))

    def apply_weight(self, h: torch.Tensor) -> torch.Tensor:
        if self.kind == "dense":
            return h @ self.weight.T
        return diag_matmul(self.weight, h, self.n_out)


def dense_layer(weight, bias, psi=None, o=None) -> Layer:
    """Convenience constructor from array-likes (float64)."""

    def t(x):
        return None if x is None else torch.as_tensor(x, dtype=torch.float64)

    w = t(weight)
    return Layer(weight=w, bias=t(bias), n_in=int(w.shape[1]), psi=t(psi), o=None if o is None else t(o).reshape(()))


class IsoMLP(nn.Module):
    """An isotropic MLP. Its tensors are buffers, so `state_dict()` gives isocompress's format."""

    def __init__(self, layers: Sequence[Layer]):
        super().__init__()
        layers = tuple(layers)
        validate_layers(layers)
        self._n_in = [layer.n_in for layer in layers]
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
            Layer(
                weight=slot.weight,
                bias=slot.bias,
                n_in=n_in,
                psi=getattr(slot, "psi", None),
                o=getattr(slot, "o", None),
            )
            for slot, n_in in zip(self._modules["layers"], self._n_in)
        )

    @property
    def widths(self) -> tuple[int, ...]:
        layers = self.layers
        return (layers[0].n_in,) + tuple(layer.n_out for layer in layers)

    @property
    def config(self) -> ModelConfig:
        layers = self.layers
        return ModelConfig(
            widths=self.widths,
            kinds=tuple(layer.kind for layer in layers),
            has_psi=tuple(layer.psi is not None for layer in layers),
        )

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
        """y for inputs x (..., n_0) of any floating dtype: computed in the model's dtype, returned in x's."""
        if not x.is_floating_point():
            raise IsocompressError(f"model input has dtype {x.dtype}; give a floating-point tensor (float32 or float64)")
        if x.shape[-1:] != (self._n_in[0],):
            raise IsocompressError(f"model input has shape {tuple(x.shape)}; expected (..., {self._n_in[0]})")
        dtype = self.dtype
        return self.forward_with_hidden(x if x.dtype == dtype else x.to(dtype))[0].to(x.dtype)

    def forward_with_hidden(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Returns (y, pre-activations z_l of each hidden layer, gains g_l of each hidden layer)."""
        h = x
        g_prev = None
        zs: list[torch.Tensor] = []
        gs: list[torch.Tensor] = []
        for layer in self.layers:
            z = layer.apply_weight(h) + layer.bias
            if layer.psi is not None:
                z = z + layer.psi * g_prev
            if layer.is_output:
                return z, zs, gs
            zs.append(z)
            h, g_prev = isotropic_tanh(z, layer.o)
            gs.append(g_prev)
        raise AssertionError("validated models end with an output layer")

    def extra_repr(self) -> str:
        kinds = ",".join(layer.kind for layer in self.layers)
        return f"widths={list(self.widths)}, kinds=[{kinds}], params={self.num_params()}"


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
    if layer.weight.dim() == 2:
        if tuple(layer.weight.shape) != (layer.n_out, layer.n_in):
            raise IsocompressError(
                f"{where}: layer {i} weight has shape {tuple(layer.weight.shape)}; its bias implies {layer.n_out} outputs"
                f" and its input is {layer.n_in} wide"
            )
    elif layer.weight.dim() == 1:
        if layer.weight.shape[0] != min(layer.n_out, layer.n_in):
            raise IsocompressError(
                f"{where}: layer {i} diagonal weight has {layer.weight.shape[0]} entries; expected min({layer.n_out},"
                f" {layer.n_in})"
            )
    else:
        raise IsocompressError(f"{where}: layer {i} weight has {layer.weight.dim()} dimensions; expected 1 or 2")
    if i > 0 and layer.n_in != layers[i - 1].n_out:
        raise IsocompressError(
            f"{where}: layer {i} takes {layer.n_in} inputs but layer {i - 1} gives {layers[i - 1].n_out}"
        )
    if layer.psi is not None:
        if i == 0:
            raise IsocompressError(f"{where}: layer 0 has psi; psi needs a previous activation (layers 1 and up)")
        if tuple(layer.psi.shape) != (layer.n_out,):
            raise IsocompressError(f"{where}: layer {i} psi has shape {tuple(layer.psi.shape)}; expected ({layer.n_out},)")
    if last and layer.o is not None:
        raise IsocompressError(f"{where}: the output layer {i} has an intrinsic length o; only hidden layers have one")
    if not last:
        if layer.o is None:
            raise IsocompressError(f"{where}: hidden layer {i} has no intrinsic length o")
        if layer.o.numel() != 1:
            raise IsocompressError(f"{where}: layer {i} intrinsic length o must be a scalar")
    for name in ("weight", "bias", "psi", "o"):
        t = getattr(layer, name)
        if t is not None and not bool(torch.isfinite(t).all()):
            raise IsocompressError(f"{where}: layer {i} {name} contains NaN or Inf; fix the checkpoint (retrain or re-export)")


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
