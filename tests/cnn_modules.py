"""Independent re-implementations, for tests, of the isotropic modules users have: the paper author's
`IsotropicConvolution` (a conv, then σ(|x|)/|x| · x over the channel axis with the identity inside |x| < ε; tanh or
log1p; no intrinsic length), the reference `IsotropicTanhMLP` (raw parameters, activations that return (gain, z)), and
a user's own activation class with a trainable intrinsic length. Written from their documented behaviour."""

from __future__ import annotations

import math

import torch
from torch import nn


class AuthorActivation(nn.Module):
    """σ(|x|)/|x| · x over dim 1, the identity inside |x| < ε (the author's conv code)."""

    def __init__(self, sigma: str = "tanh", epsilon: float = 1e-3):
        super().__init__()
        self.sigma, self.epsilon = sigma, epsilon

    def forward(self, x):
        r = torch.linalg.vector_norm(x, dim=1, keepdim=True)
        s = torch.tanh(r) if self.sigma == "tanh" else torch.log1p(r)
        return torch.where(r < self.epsilon, x, s / r.clamp_min(self.epsilon) * x)


class IsotropicConvolution(nn.Module):
    """A Conv (1-D or 2-D) followed by the author's activation; state_dict keys conv.weight, conv.bias."""

    def __init__(self, c_in, c_out, kernel, stride=1, padding=0, dilation=1, groups=1, activation="tanh", dims=2):
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv1d
        self.conv = conv(c_in, c_out, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups)
        self.activation = AuthorActivation(activation)

    def forward(self, x):
        return self.activation(self.conv(x))


class TrainableIso(nn.Module):
    """A user's own isotropic tanh with a trainable intrinsic length o = softplus(raw), over dim 1."""

    def __init__(self, o: float = 0.3):
        super().__init__()
        self.raw = nn.Parameter(torch.tensor(math.log(math.expm1(o))))

    def forward(self, z):
        o = torch.nn.functional.softplus(self.raw)
        m = torch.sqrt(o + (z * z).sum(dim=1, keepdim=True))
        return torch.tanh(m) / m * z


class RefActivation(nn.Module):
    """The reference code's activation: o = exp(intrinsic_length) or the raw value by its `positive` flag; returns
    (gain, z)."""

    def __init__(self, o: float, positive: bool):
        super().__init__()
        self.positive = positive
        self.intrinsic_length = nn.Parameter(torch.tensor(math.log(o) if positive else o))

    def forward(self, x, dims=(-1,)):
        o = torch.exp(self.intrinsic_length) if self.positive else self.intrinsic_length
        m = torch.sqrt(torch.abs(o + (x * x).sum(dim=dims, keepdim=True)))
        return torch.tanh(m) / m.clamp(min=1e-3), x


class RefMLP(nn.Module):
    """The reference IsotropicTanhMLP's parameter layout and forward (with psi)."""

    def __init__(self, widths, o=0.1, positive=True, psi=True, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.weight_parameters = nn.ParameterList(
            [nn.Parameter(torch.randn(b, a, generator=gen) / a ** 0.5) for a, b in zip(widths[:-1], widths[1:])])
        self.bias_parameters = nn.ParameterList([nn.Parameter(torch.randn(b, generator=gen) * 0.3) for b in widths[1:]])
        self.psi_parameters = nn.ParameterList(
            [nn.Parameter(torch.randn(b, generator=gen) * 0.3) for b in widths[2:]]) if psi else None
        self.activation = nn.ModuleList([RefActivation(o, positive) for _ in widths[1:-1]])

    def forward(self, x):
        h, g = x, None
        for i, (w, b) in enumerate(zip(self.weight_parameters, self.bias_parameters)):
            z = h @ w.T + b
            if i > 0 and self.psi_parameters is not None:
                z = z + self.psi_parameters[i - 1] * g
            if i == len(self.activation):
                return z
            g, z = self.activation[i](z)
            h = g * z
