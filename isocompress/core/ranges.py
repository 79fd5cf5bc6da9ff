"""Do a run's values fit the dtypes it computes and saves in? Checked before any work (issue 13).

A run computes in float64 (the reference forward, shrinking, bounds), verifies its ONNX file in float32 (unless the
weights are saved in float64) and saves in the chosen dtype. The activation squares its pre-activation
(m² = o + |z|²), so what must fit is m², not just the stored numbers: a model or an input that pushes m² beyond
HEADROOM × the largest finite value of a dtype would overflow there (inf/NaN, numpy overflow warnings, a parity
failure that says nothing about the input). Such inputs are input errors (exit 2) naming the file and what to do.
"""

from __future__ import annotations

import math

import torch

from isocompress.core.errors import IsocompressError
from isocompress.core.model import IsoMLP

HEADROOM = 1e-3  # m² (and every stored value) must stay below this fraction of the dtype's largest finite value


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def largest_stored(model: IsoMLP) -> tuple[float, str]:
    """The largest |value| of any parameter, and its name."""
    best, name = 0.0, ""
    for key, value in model.state_dict().items():
        top = float(value.detach().abs().max()) if value.numel() else 0.0
        if top > best or not math.isfinite(top):
            best, name = top, key
    return best, name


@torch.no_grad()
def largest_m2(model: IsoMLP, x: torch.Tensor) -> tuple[float, int, float]:
    """(max over x and hidden spaces of m² = o + |z|², the hidden space where it is reached, max |y|), in float64."""
    model = model if model.dtype == torch.float64 else model.cast(torch.float64)
    worst, where, y_max = 0.0, 0, 0.0
    for part in x.to(torch.float64).split(256):
        y, zs, _ = model.forward_with_hidden(part)
        for i, (z, layer) in enumerate(zip(zs, model.layers)):
            m2 = float(((z * z).sum(dim=-1) + layer.o).max())
            if not math.isfinite(m2) or m2 > worst:
                worst, where = (math.inf if not math.isfinite(m2) else m2), i
        y_max = max(y_max, float(torch.linalg.vector_norm(y, dim=-1).max()))
    return worst, where, y_max


def check_saved_dtype(model: IsoMLP, saved: torch.dtype, where: str) -> None:
    check_stored(largest_stored(model), saved, where)


def check_stored(largest: tuple[float, str], saved: torch.dtype, where: str) -> None:
    """`check_saved_dtype` from (largest |value|, its name) measured elsewhere (a streamed shrink, layer by layer)."""
    top, name = largest
    limit = torch.finfo(saved).max
    if top > limit:
        raise IsocompressError(
            f"{where}: {name} holds values up to {top:.3g}, beyond the {dtype_name(saved)} range (max {limit:.3g});"
            " save in a wider dtype (--dtype float32 or float64), or rescale the model")


def check_compute(model: IsoMLP, x: torch.Tensor, compute: torch.dtype, where: str, what: str, advice: str) -> None:
    """m² on the inputs x must fit `compute`. `where` names the culprit (the model or the calibration file)."""
    check_measured(largest_m2(model, x), compute, where, what, advice)


def check_measured(measured: tuple[float, int, float], compute: torch.dtype, where: str, what: str,
                   advice: str) -> None:
    """`check_compute` from (max m², its hidden space, max |y|) measured elsewhere."""
    limit = torch.finfo(compute).max * HEADROOM
    m2, space, y_max = measured
    if m2 > limit or y_max > math.sqrt(limit):
        value = f"m² = o + |z|² reaches {m2:.3g} in hidden space {space}" if m2 > limit else f"|y| reaches {y_max:.3g}"
        raise IsocompressError(f"{where}: on {what}, {value}, beyond the {dtype_name(compute)} range"
                               f" ({limit:.3g} with headroom); {advice}")


def check_run(model: IsoMLP, probes: torch.Tensor, calibration: torch.Tensor | None, saved: torch.dtype,
              onnx: bool, model_path: str, calibration_path: str | None) -> None:
    """Every check for one run: stored values fit the saved dtype; m² fits float64 (the reference) on the probe
    inputs; with an ONNX file verified in float32, m² fits float32 on the inputs that check uses (the calibration
    inputs if given, else the probe inputs). A failure on the probe inputs is the model's; on the calibration inputs
    the calibration file's."""
    check_run_measured(largest_stored(model), (probes, largest_m2(model, probes)),
                       None if calibration is None else (calibration, largest_m2(model, calibration)),
                       saved, onnx, model_path, calibration_path)


def check_run_measured(largest: tuple[float, str], probes: tuple, calibration: tuple | None, saved: torch.dtype,
                       onnx: bool, model_path: str, calibration_path: str | None) -> None:
    """`check_run` from measured values: `probes` and `calibration` are (inputs, largest_m2 on them)."""
    check_stored(largest, saved, model_path)
    computes = [torch.float64] + ([torch.float32] if onnx and saved != torch.float64 else [])
    for compute in computes:
        if compute == torch.float64 or calibration is None:
            fix = ("rescale the model" if compute == torch.float64 else
                   "rescale the model, or use --dtype float64 (a float64 ONNX file) or --format safetensors")
            check_measured(probes[1], compute, model_path, f"the probe inputs (values up to {_top(probes[0]):.3g})",
                           fix)
        if calibration is not None:
            fix = ("rescale the calibration inputs" if compute == torch.float64 else
                   "rescale the calibration inputs, or use --dtype float64 (a float64 ONNX file) or --format"
                   " safetensors")
            check_measured(calibration[1], compute, calibration_path, f"its inputs (values up to"
                           f" {_top(calibration[0]):.3g})", fix)


def _top(x: torch.Tensor) -> float:
    return float(x.abs().max())
