"""Measuring a model against another: probe inputs and the output difference, in float64."""

from __future__ import annotations

import torch

from isocompress.core.layers import forward_float64
from isocompress.core.model import IsoMLP

PROBE_SCALES = (0.01, 1.0, 10.0, 1000.0)


def probe_inputs(shape: int | tuple[int, ...], per_scale: int = 256, scales=PROBE_SCALES, seed: int = 0) -> torch.Tensor:
    """Gaussian inputs of one input's `shape` (an MLP's n_0, or a model's input_shape) at several scales, including far
    outside any data (exactness must hold for every input)."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    gen = torch.Generator().manual_seed(seed)
    parts = [torch.randn(per_scale, *shape, dtype=torch.float64, generator=gen) * s for s in scales]
    return torch.cat(parts)


def sample_norms(x: torch.Tensor) -> torch.Tensor:
    """|x_i| of every sample (row) of a batch: the L2 norm over everything but the first axis (the whole input map of
    a CNN, the vector of an MLP)."""
    return torch.linalg.vector_norm(x.reshape(x.shape[0], -1), dim=1)


@torch.no_grad()
def output_difference(reference: IsoMLP, candidate: IsoMLP, x: torch.Tensor) -> dict:
    """max |Δy| (L2 over the output, worst input) and the same relative to max |y|, both in float64."""
    return difference(forward_float64(reference, x), forward_float64(candidate, x))


def difference(y: torch.Tensor, y2: torch.Tensor) -> dict:
    """output_difference from the two networks' outputs (float64) on the same inputs."""
    diff = sample_norms(y2 - y)
    scale = sample_norms(y).max().clamp_min(torch.finfo(torch.float64).tiny)
    return {"max_abs": float(diff.max()), "max_rel": float(diff.max() / scale), "n_inputs": int(y.shape[0]),
            "max_norm_reference": float(scale)}


def output_scale(model: IsoMLP, x: torch.Tensor) -> float:
    """The largest output norm |y| over the inputs x (the scale a relative max-error refers to)."""
    return float(sample_norms(forward_float64(model, x)).max())


def exact_rule_inputs(shape: int | tuple[int, ...], calibration: torch.Tensor | None) -> torch.Tensor:
    """The inputs the constant-direction rule of an exact shrink is set on: the probe inputs, plus the calibration
    data when given (exact.constants.remove_constant_directions_accounted)."""
    probes = probe_inputs(shape)
    return probes if calibration is None else torch.cat([probes, calibration.to(probes.dtype)])


def probe_description(calibration: torch.Tensor | None, probes: torch.Tensor) -> str:
    """report["probe"]["inputs"]: what the before/after comparison ran on."""
    return "calibration data" if calibration is not None else \
        f"{probes.shape[0]} Gaussian inputs at scales {list(PROBE_SCALES)}"
