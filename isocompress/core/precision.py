"""Facts about the deployed precisions (docs/bounds.md §5, "Floating point", and §5b): what each `--precision` stores
and computes in, unit roundoffs, the γ_n of forward error analysis, the assumed accuracy of the runtimes' tanh, and
per-output-channel symmetric int8 quantisation. Pure functions, no model objects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from isocompress.core.errors import IsocompressError

PRECISIONS = ("float32", "float16", "int8-weights", "int8")
DEFAULT_PRECISION = "float32"
INT8_NOT_YET = ("--precision int8 (static activation quantisation, QDQ) is not available yet; use int8-weights (int8"
                " weights with float32 activations, certified) or float16")

# Unit roundoff u (round to nearest) and the smallest positive subnormal of each IEEE dtype: an underflowing
# operation errs by at most half the subnormal spacing (gradual underflow; runtimes' defaults do not flush to zero).
UNIT_ROUNDOFF = {"float32": 2.0 ** -24, "float16": 2.0 ** -11, "float64": 2.0 ** -53}
UNDERFLOW = {"float32": 2.0 ** -150, "float16": 2.0 ** -25, "float64": 2.0 ** -1075}
FLOAT_MAX = {"float32": float(np.finfo(np.float32).max), "float16": float(np.finfo(np.float16).max)}
# Assumed relative error of the runtimes' tanh (onnxruntime's MLAS rational approximation, torch's vectorised tanh),
# measured ≤ 3.2e-7 (float32, onnxruntime 1.32) and ≤ one float16 ulp after rounding (float16): the bound assumes
# 16× the float32 measurement and 2 float16 ulps; tests/test_deployed.py re-measures both on a dense grid.
TANH_REL = {"float32": 5e-6, "float16": 2.0 ** -9, "float64": 1e-14}
INT8_MAX = 127
NP = {"float32": np.float32, "float16": np.float16, "float64": np.float64}


def parse_precision(name: str | None, where: str = "--precision") -> str:
    """The precision name (None: float32); int8 is refused in one line (not available yet)."""
    if name is None:
        return DEFAULT_PRECISION
    if name not in PRECISIONS:
        raise IsocompressError(f"{where} {name!r} is not one of {', '.join(PRECISIONS)}")
    if name == "int8":
        raise IsocompressError(INT8_NOT_YET)
    return name


def gamma(n: int, u: float) -> float:
    """γ_n = n·u/(1 − n·u) (Higham, "Accuracy and Stability of Numerical Algorithms", §3.1): a sum of n terms or an
    n-term dot product computed in any order, with any mix of FMA, errs by ≤ γ_n·Σ|a_i b_i|. Inf where n·u ≥ 1."""
    nu = n * u
    return nu / (1.0 - nu) if nu < 1.0 else math.inf


@dataclass(frozen=True)
class Plan:
    """What one precision stores and computes in. `weights`: the dense weight matrices ("float32", "float16" or
    "int8": per-output-channel symmetric int8 with float32 scales); `others`: diagonal layers, biases, psi and o;
    `compute`: the arithmetic of the ONNX graph (and of isocompress's reload of the safetensors in float32)."""

    precision: str
    weights: str
    others: str
    compute: str
    compute_reason: str = ""

    @classmethod
    def from_record(cls, record: dict) -> Plan:
        return cls(record["precision"], record["dense_weights"], record["diagonals_biases_psi_o"], record["compute"],
                   record.get("compute_reason", ""))

    def describe(self) -> dict:
        return {"precision": self.precision, "dense_weights": self.weights, "diagonals_biases_psi_o": self.others,
                "compute": self.compute, "compute_reason": self.compute_reason}


def plan_for(precision: str, compute16_ok: bool = False, reason: str = "") -> Plan:
    """The storage and compute dtypes of a precision. float16 computes in float16 only where `compute16_ok` (the
    range check of bounds.deployed passed); otherwise the float16 weights are cast to float32 at the graph's edges."""
    precision = parse_precision(precision)
    if precision == "float32":
        return Plan(precision, "float32", "float32", "float32")
    if precision == "float16":
        if compute16_ok:
            return Plan(precision, "float16", "float16", "float16", reason or "onnxruntime's CPU provider runs"
                        " Gemm, Tanh, ReduceL2, Sqrt, Div and Mul in float16, and no value can overflow float16")
        return Plan(precision, "float16", "float32", "float32", reason)
    return Plan(precision, "int8", "float32", "float32", "DequantizeLinear gives float32 weights; activations stay"
                " float32 (weight-only)")


def round_to(t: torch.Tensor, dtype: str) -> torch.Tensor:
    """t rounded to `dtype` (round to nearest, as every cast here), returned in float64."""
    return torch.from_numpy(t.detach().cpu().numpy().astype(NP[dtype]).astype(np.float64))


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel (row; for a kernel, per output channel) symmetric int8: q = round(W/s) ∈ [−127, 127] with
    s = fl32(max_j |W_rj| / 127) (a zero row gets s = 1). Returns (q int8, s float32)."""
    w = weight.detach().to(torch.float64)
    amax = w.reshape(w.shape[0], -1).abs().amax(dim=1)
    scale = round_to(torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax)), "float32")
    shape = (-1,) + (1,) * (w.dim() - 1)
    q = torch.round(w / scale.reshape(shape)).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale.to(torch.float32)


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fl32(q·s), exactly what DequantizeLinear (float32 scale, zero point 0) computes; float64."""
    shape = (-1,) + (1,) * (q.dim() - 1)
    product = q.to(torch.float32) * scale.to(torch.float32).reshape(shape)  # one IEEE float32 multiply per entry
    return product.to(torch.float64)
