"""Measuring a model against another: probe inputs and the output difference, in float64."""

from __future__ import annotations

import torch

from isocompress.core.layers import forward_float64
from isocompress.core.model import IsoMLP

PROBE_SCALES = (0.01, 1.0, 10.0, 1000.0)


def probe_inputs(n_in: int, per_scale: int = 256, scales=PROBE_SCALES, seed: int = 0) -> torch.Tensor:
    """Gaussian inputs at several scales, including far outside any data (exactness must hold for every input)."""
    gen = torch.Generator().manual_seed(seed)
    parts = [torch.randn(per_scale, n_in, dtype=torch.float64, generator=gen) * s for s in scales]
    return torch.cat(parts)


@torch.no_grad()
def output_difference(reference: IsoMLP, candidate: IsoMLP, x: torch.Tensor) -> dict:
    """max |Δy| (L2 over the output, worst input) and the same relative to max |y|, both in float64."""
    return difference(forward_float64(reference, x), forward_float64(candidate, x))


def difference(y: torch.Tensor, y2: torch.Tensor) -> dict:
    """output_difference from the two networks' outputs (float64) on the same inputs."""
    diff = torch.linalg.vector_norm(y2 - y, dim=-1)
    scale = torch.linalg.vector_norm(y, dim=-1).max().clamp_min(torch.finfo(torch.float64).tiny)
    return {"max_abs": float(diff.max()), "max_rel": float(diff.max() / scale), "n_inputs": int(y.shape[0]),
            "max_norm_reference": float(scale)}


def output_scale(model: IsoMLP, x: torch.Tensor) -> float:
    """The largest output norm |y| over the inputs x (the scale a relative max-error refers to)."""
    return float(torch.linalg.vector_norm(forward_float64(model, x), dim=-1).max())


def exact_rule_inputs(n_in: int, calibration: torch.Tensor | None) -> torch.Tensor:
    """The inputs the constant-direction rule of an exact shrink is set on: the probe inputs, plus the calibration
    data when given (layers.remove_constant_directions_accounted)."""
    probes = probe_inputs(n_in)
    return probes if calibration is None else torch.cat([probes, calibration.to(probes.dtype)])


def probe_description(calibration: torch.Tensor | None, probes: torch.Tensor) -> str:
    """report["probe"]["inputs"]: what the before/after comparison ran on."""
    return "calibration data" if calibration is not None else \
        f"{probes.shape[0]} Gaussian inputs at scales {list(PROBE_SCALES)}"
