"""Weights stored in another dtype than the graph computes in (docs/onnx.md, "Precision"): float16 initializers with a
Cast to the compute dtype, or per-output-channel symmetric int8 with float32 scales and a DequantizeLinear (axis 0,
zero point 0). onnxruntime folds the Cast into a constant when the session starts; it keeps DequantizeLinear (a QDQ
node) and runs it on every call (benchmarks/bench_quant.py measures the cost). The values it computes with are
fl32(q·s) (core.precision.dequantize_rows), which the certificate uses.
"""

from __future__ import annotations

import numpy as np
import torch

from isocompress.core import precision as P


def stored_weight(b, name: str, value: torch.Tensor, storage: str) -> str:
    """Adds the initializer(s) of `value` in `storage` to the builder and returns the name of the compute-dtype
    value; the node is named layerN/… so that node counts keep it with its layer."""
    from onnx import helper, numpy_helper

    layer = name.split(".")[0]
    if storage == "int8":
        q, scale = P.quantize_rows(value)
        b.initializers.append(numpy_helper.from_array(np.ascontiguousarray(q.numpy()), f"{name}_q"))
        b.initializers.append(numpy_helper.from_array(np.ascontiguousarray(scale.numpy()), f"{name}_scale"))
        out = f"{layer}/weight_dequantized"
        b.nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_scale"], [out], name=out, axis=0))
        return out
    array = value.detach().cpu().numpy().astype(P.NP[storage])
    b.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), f"{name}_{storage}"))
    out = f"{layer}/weight_cast"
    to = helper.np_dtype_to_tensor_dtype(np.dtype(b.np_dtype))
    b.nodes.append(helper.make_node("Cast", [f"{name}_{storage}"], [out], name=out, to=to))
    return out
