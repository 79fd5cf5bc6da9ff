"""Trainable isotropic networks (issue 6): `IsotropicTanh` and `IsotropicMLP`.

`IsotropicMLP` computes exactly the forward pass of `isocompress.core.model.IsoMLP` (docs/math.md, "Forward pass") with
`nn.Parameter`s, so it can be trained with any torch optimiser; `to_isomlp()` / `save(path)` hand it to the rest of
isocompress, and `from_isomlp(model)` / `load(path)` bring any isocompress model (diagonal layers included) back
for further training. `diagonalise`, `grow`, `degenerate` and `neuroadapt` restructure a live network in place and carry
a torch optimiser's state through the change (issue 14, `isocompress.train.adapt`, docs/training.md).

A trainable intrinsic length is stored as a raw parameter with o = softplus(raw): o stays > 0 and its gradient never
vanishes the way it does for o = raw² at raw = 0. A stored o = 0 loaded as trainable becomes o = softplus(-40) ≈ 4e-18
(added to |z|², invisible in float64 unless |z| < 1e-8). "fixed" and "none" keep o as an exact buffer.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from isocompress.core.errors import IsocompressError
from isocompress.core.model import IsoMLP, Layer
from isocompress.core.primitives import RAW_FOR_ZERO, inverse_softplus, isotropic_tanh  # noqa: F401 (re-exported)
from isocompress.formats import io
from isocompress.train import adapt

INTRINSIC_LENGTH_MODES = ("none", "fixed", "trainable")


class IsotropicTanh(nn.Module):
    """f(z) = tanh(m)/m · z, m = sqrt(|o + |z|²|) over the last axis. o fixed (a buffer) or trainable (softplus)."""

    def __init__(self, o: float | torch.Tensor = 0.0, trainable: bool = False, dtype: torch.dtype = torch.float32):
        super().__init__()
        o = torch.as_tensor(o, dtype=torch.float64).reshape(())
        if not bool(torch.isfinite(o)):
            raise IsocompressError(f"intrinsic length o = {float(o):g} must be finite")
        if trainable and bool(o < 0):
            raise IsocompressError(
                f"intrinsic length o = {float(o):g} is negative; a trainable o is softplus(raw) > 0, so keep this one"
                " fixed (intrinsic_length='fixed')"
            )
        self.trainable = trainable
        if trainable:
            self.raw_o = nn.Parameter(inverse_softplus(o).to(dtype))
        else:
            self.register_buffer("o_fixed", o.to(dtype))

    @property
    def o(self) -> torch.Tensor:
        return F.softplus(self.raw_o) if self.trainable else self.o_fixed

    def activate(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, g): the output and the gain g = tanh(m)/m of shape (..., 1) (psi terms of the next layer need g)."""
        return isotropic_tanh(z, self.o)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.activate(z)[0]

    def extra_repr(self) -> str:
        return f"o={float(self.o.detach()):.4g}, trainable={self.trainable}"


class IsotropicLayer(nn.Module):
    """One weight layer z = W h + b (+ psi·g_prev), followed by its activation unless it is the output layer."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, psi: torch.Tensor | None,
                 activation: IsotropicTanh | None):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)
        self.psi = None if psi is None else nn.Parameter(psi)
        self.activation = activation

    def pre_activation(self, h: torch.Tensor, g_prev: torch.Tensor | None) -> torch.Tensor:
        z = h @ self.weight.T + self.bias
        if self.psi is not None:
            z = z + self.psi * g_prev
        return z


class IsotropicMLP(nn.Module):
    """A trainable isotropic MLP with widths (n_0, …, n_L).

    psi: give every layer after the first a psi vector (initialised to 0). intrinsic_length: "none" (o = 0),
    "fixed" (o = o_init, not trained) or "trainable" (o = softplus(raw), starting at o_init).
    """

    def __init__(self, widths: Sequence[int], psi: bool = False, intrinsic_length: str = "none",
                 o_init: float = 1.0, seed: int | None = None, weight_scale: float = 1.0,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        widths = [int(w) for w in widths]
        if len(widths) < 2 or min(widths) < 1:
            raise IsocompressError(f"widths {widths} must list at least an input and an output width, all ≥ 1")
        if intrinsic_length not in INTRINSIC_LENGTH_MODES:
            raise IsocompressError(f"intrinsic_length {intrinsic_length!r}: use one of {', '.join(INTRINSIC_LENGTH_MODES)}")
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        o_value = 0.0 if intrinsic_length == "none" else o_init
        layers = []
        for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
            weight = torch.randn(n_out, n_in, generator=gen, dtype=torch.float64) * (weight_scale / math.sqrt(n_in))
            bias = torch.zeros(n_out, dtype=torch.float64)
            p = torch.zeros(n_out, dtype=torch.float64) if (psi and i > 0) else None
            hidden = i < len(widths) - 2
            act = IsotropicTanh(o_value, trainable=intrinsic_length == "trainable", dtype=dtype) if hidden else None
            layers.append(IsotropicLayer(weight.to(dtype), bias.to(dtype), None if p is None else p.to(dtype), act))
        self.layers = nn.ModuleList(layers)

    # --- forward (identical to IsoMLP.forward) -------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, g_prev = x, None
        for layer in self.layers:
            z = layer.pre_activation(h, g_prev)
            if layer.activation is None:
                return z
            h, g_prev = layer.activation.activate(z)
        raise AssertionError("the last layer has no activation")

    @property
    def widths(self) -> tuple[int, ...]:
        return (self.layers[0].weight.shape[1],) + tuple(layer.weight.shape[0] for layer in self.layers)

    # --- live restructuring with the optimiser (issue 14; isocompress.train.adapt, docs/training.md) -------------------
    def diagonalise(self, layer: int, optimiser=None, full: bool = False, distributed=None) -> list:
        """Rotate weight layer `layer`'s output space to its left singular basis (full=True: its input space too),
        in place; same function; the optimiser's state is rotated with the parameters."""
        return adapt.diagonalise(self, layer, optimiser, full=full, distributed=distributed)

    def grow(self, layer: int, k: int, optimiser=None, scale: float = 1e-3,
             generator: torch.Generator | None = None, distributed=None):
        """Add k scaffold neurons to the output of weight layer `layer`, in place; exactly the same function."""
        return adapt.grow(self, layer, k, optimiser, scale=scale, generator=generator, distributed=distributed)

    def degenerate(self, layer: int, k: int, optimiser=None, measure: str = "directions", distributed=None):
        """Remove the k weakest directions (or neurons) of the output of weight layer `layer`, in place (psi-aware
        absorption; exact when their strengths are 0)."""
        return adapt.degenerate(self, layer, k, optimiser, measure, distributed=distributed)

    def neuroadapt(self, threshold: float, scaffold: int, optimiser=None, layers: Sequence[int] | None = None,
                   scale: float = 1e-3, generator: torch.Generator | None = None, max_width: int | None = None,
                   measure: str = "directions", distributed=None) -> list:
        """Keep `scaffold` directions (or neurons) below `threshold` in each hidden space (grow or degenerate).
        `distributed=True` under DDP: decided on one rank, applied the same way on all (docs/training.md)."""
        return adapt.neuroadapt(self, threshold, scaffold, optimiser, layers, scale=scale, generator=generator,
                                max_width=max_width, measure=measure, distributed=distributed)

    # --- conversion to and from isocompress models -----------------------------------------------------------------
    @torch.no_grad()
    def to_isomlp(self) -> IsoMLP:
        """A float64 `IsoMLP` with the same function (a copy; training this module further does not change it)."""

        def f64(t):
            return None if t is None else t.detach().to(torch.float64).clone()

        return IsoMLP([
            Layer(
                weight=f64(layer.weight),
                bias=f64(layer.bias),
                n_in=int(layer.weight.shape[1]),
                psi=f64(layer.psi),
                o=None if layer.activation is None else f64(layer.activation.o).reshape(()),
            )
            for layer in self.layers
        ])

    def isocompress_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors of isocompress's checkpoint format (`layers.{i}.weight|bias|psi|o`), in this module's dtype."""
        dtype = self.layers[0].weight.dtype
        return {key: value.to(dtype) for key, value in self.to_isomlp().state_dict().items()}

    def save(self, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
        """Write isocompress's `.pt` or `.safetensors` format in one call (atomically); dtype defaults to this
        module's parameter dtype."""
        return io.save(self.to_isomlp(), path, dtype=dtype or self.layers[0].weight.dtype)

    @classmethod
    def from_isomlp(cls, model: IsoMLP, intrinsic_length: str = "fixed", psi: bool | None = None,
                    dtype: torch.dtype = torch.float32) -> "IsotropicMLP":
        """A trainable copy of any isocompress model; diagonal layers are densified. intrinsic_length "fixed" keeps
        o exactly, "trainable" trains it (o = 0 becomes ≈ 4e-18), "none" is refused unless every o is 0. psi=None
        keeps the model's psi placement; psi=True adds zero psi vectors to every layer after the first."""
        if intrinsic_length not in INTRINSIC_LENGTH_MODES:
            raise IsocompressError(f"intrinsic_length {intrinsic_length!r}: use one of {', '.join(INTRINSIC_LENGTH_MODES)}")
        layers = model.layers
        if intrinsic_length == "none" and any(float(layer.o) != 0 for layer in layers[:-1]):
            raise IsocompressError("intrinsic_length='none' needs o = 0 in every hidden layer; use 'fixed' or 'trainable'")
        net = cls.__new__(cls)
        nn.Module.__init__(net)
        net.layers = nn.ModuleList([_trainable_layer(i, layer, intrinsic_length, psi, dtype) for i, layer in enumerate(layers)])
        return net

    @classmethod
    def load(cls, path: str | os.PathLike, intrinsic_length: str = "fixed", psi: bool | None = None,
             dtype: torch.dtype = torch.float32) -> "IsotropicMLP":
        """Load any checkpoint isocompress reads (`isocompress.formats.io.load`) for further training."""
        return cls.from_isomlp(io.load(path), intrinsic_length=intrinsic_length, psi=psi, dtype=dtype)


def _trainable_layer(i: int, layer: Layer, intrinsic_length: str, psi: bool | None, dtype) -> IsotropicLayer:
    dense = layer.as_dense()
    p = dense.psi
    if p is None and psi and i > 0:
        p = torch.zeros(dense.n_out, dtype=torch.float64)
    act = None
    if not dense.is_output:
        act = IsotropicTanh(dense.o, trainable=intrinsic_length == "trainable", dtype=dtype)
    return IsotropicLayer(
        dense.weight.detach().to(dtype).clone(),
        dense.bias.detach().to(dtype).clone(),
        None if p is None else p.detach().to(dtype).clone(),
        act,
    )
