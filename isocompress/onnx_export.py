"""ONNX export of an `IsoMLP`, built node by node with `onnx.helper`, and its verification in onnxruntime.

Why `onnx.helper` and not torch.onnx: full control of the opset, the IR version and the node names; a diagonal layer
is written as an elementwise Mul of a 1-D initializer (a tracing exporter would happily bake `diag_to_dense` into a
matrix); no onnxscript at export time; no `.onnx.data` side file. The maths therefore lives twice (here and in
`IsoMLP.forward`), which is why every export is run in onnxruntime and compared with the torch forward.

Graph per layer i (names `layer{i}/...`), docs/math.md "Forward pass":
    dense:  z = Gemm(h, W, b, transB=1)
    diag:   z = Pad(Mul(Slice(h, :k), d), 0..n_out) + b     (Slice only if n_in > k, Pad only if n_out > k)
    psi:    z = z + psi · g_prev
    hidden: m2 = ReduceSumSquare(z) + o; small = m2 < 1e-8; m = Sqrt(Where(small, 1, m2))
            g = Where(small, 1 − m2/3 + 2m2²/15, Tanh(m)/m); h = z · g
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from isocompress import io
from isocompress.errors import CheckFailed, IsocompressError
from isocompress.layers import forward_float64
from isocompress.model import IsoMLP, Layer
from isocompress.primitives import SMALL_M2

# Opset 17 / IR 8 (onnx 1.12, 2022): every op used here exists in this form there (ReduceSumSquare still takes `axes`
# as an attribute), onnxruntime ≥ 1.13 loads it, and runtimes that reject IR 10 ("max supported IR version: 9")
# accept it. Nothing newer is needed.
DEFAULT_OPSET = 17
DEFAULT_IR_VERSION = 8
INPUT_NAME, OUTPUT_NAME, BATCH_DIM = "x", "y", "batch"
VERIFY_CHUNK = 256
ONNX_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


# --- graph building (pure) ---------------------------------------------------------------------------------------
class GraphBuilder:
    """Collects nodes and initializers; every value gets a readable, unique name."""

    def __init__(self, np_dtype):
        self.np_dtype = np_dtype
        self.nodes: list = []
        self.initializers: list = []

    def const(self, name: str, value) -> str:
        from onnx import numpy_helper

        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        dtype = np.int64 if array.dtype.kind in "iu" else self.np_dtype
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str, **attrs) -> str:
        from onnx import helper

        self.nodes.append(helper.make_node(op_type, inputs, [name], name=name, **attrs))
        return name


def weight_node(b: GraphBuilder, i: int, layer: Layer, h: str) -> str:
    """z = W h + b: Gemm for a dense layer; Slice/Mul/Pad/Add for a diagonal one (never a dense matrix)."""
    p = f"layer{i}"
    if layer.kind == "dense":
        return b.op("Gemm", [h, b.const(f"{p}.weight", layer.weight), b.const(f"{p}.bias", layer.bias)],
                    f"{p}/gemm", transB=1)
    k = int(layer.weight.shape[0])
    if layer.n_in > k:
        h = b.op("Slice", [h, b.const(f"{p}.slice_starts", [0]), b.const(f"{p}.slice_ends", [k]),
                           b.const(f"{p}.slice_axes", [1])], f"{p}/slice")
    z = b.op("Mul", [h, b.const(f"{p}.weight", layer.weight)], f"{p}/diag_mul")
    if layer.n_out > k:
        z = b.op("Pad", [z, b.const(f"{p}.pads", [0, 0, 0, layer.n_out - k])], f"{p}/pad")
    return b.op("Add", [z, b.const(f"{p}.bias", layer.bias)], f"{p}/add_bias")


def psi_node(b: GraphBuilder, i: int, layer: Layer, z: str, g_prev: str) -> str:
    p = f"layer{i}"
    scaled = b.op("Mul", [g_prev, b.const(f"{p}.psi", layer.psi)], f"{p}/psi_mul")
    return b.op("Add", [z, scaled], f"{p}/psi_add")


def activation_nodes(b: GraphBuilder, i: int, layer: Layer, z: str) -> tuple[str, str]:
    """h = g·z, g = tanh(m)/m, m² = o + |z|²; the series 1 − m²/3 + 2m⁴/15 below m² = SMALL_M2 (no NaN at 0)."""
    p = f"act{i}"
    m2 = b.op("Add", [b.op("ReduceSumSquare", [z], f"{p}/sum_sq", axes=[1], keepdims=1),
                      b.const(f"{p}.o", layer.o.reshape(()))], f"{p}/m2")
    small = b.op("Less", [m2, b.const(f"{p}.small_m2", np.array(SMALL_M2))], f"{p}/small")
    one = b.const(f"{p}.one", np.array(1.0))
    m = b.op("Sqrt", [b.op("Where", [small, one, m2], f"{p}/safe_m2")], f"{p}/m")
    ratio = b.op("Div", [b.op("Tanh", [m], f"{p}/tanh"), m], f"{p}/ratio")
    inner = b.op("Add", [b.const(f"{p}.c1", np.array(-1.0 / 3.0)),
                         b.op("Mul", [m2, b.const(f"{p}.c2", np.array(2.0 / 15.0))], f"{p}/series_m2")],
                 f"{p}/series_inner")
    series = b.op("Add", [one, b.op("Mul", [m2, inner], f"{p}/series_m2b")], f"{p}/series")
    g = b.op("Where", [small, series, ratio], f"{p}/g")
    return b.op("Mul", [z, g], f"{p}/h"), g


def check_representable(model: IsoMLP, dtype: torch.dtype) -> None:
    """Every weight must stay finite in the file's dtype (a float32 file cannot hold 1e39)."""
    limit = torch.finfo(dtype).max
    for i, layer in enumerate(model.layers):
        for name, value in (("weight", layer.weight), ("bias", layer.bias), ("psi", layer.psi), ("o", layer.o)):
            if value is not None and bool((value.abs() > limit).any()):
                raise IsocompressError(
                    f"layer {i} {name} has values beyond the {str(dtype).replace('torch.', '')} range (±{limit:.3g});"
                    " export in float64 (--dtype float64) or rescale the model"
                )


def build_onnx(model: IsoMLP, dtype: torch.dtype = torch.float32, opset: int = DEFAULT_OPSET,
               ir_version: int = DEFAULT_IR_VERSION, check: bool = True):
    """The model as an `onnx.ModelProto`: input x (batch × n_0, batch dynamic), output y (batch × n_L)."""
    import onnx
    from onnx import TensorProto, helper

    if dtype not in ONNX_DTYPES:
        raise IsocompressError(f"ONNX export in {dtype} is not supported; use float32 or float64")
    check_representable(model, dtype)
    b = GraphBuilder(ONNX_DTYPES[dtype])
    h, g_prev = INPUT_NAME, None
    for i, layer in enumerate(model.layers):
        z = weight_node(b, i, layer, h)
        if layer.psi is not None:
            z = psi_node(b, i, layer, z, g_prev)
        if layer.is_output:
            b.op("Identity", [z], OUTPUT_NAME)
            break
        h, g_prev = activation_nodes(b, i, layer, z)
    elem = TensorProto.FLOAT if dtype == torch.float32 else TensorProto.DOUBLE
    widths = model.widths
    graph = helper.make_graph(
        b.nodes, "isotropic_mlp",
        [helper.make_tensor_value_info(INPUT_NAME, elem, [BATCH_DIM, widths[0]])],
        [helper.make_tensor_value_info(OUTPUT_NAME, elem, [BATCH_DIM, widths[-1]])],
        initializer=b.initializers,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="isocompress",
                              doc_string=f"isotropic MLP, widths {list(widths)}")
    proto.ir_version = ir_version
    if check:
        onnx.checker.check_model(proto, full_check=True)
    return proto


# --- files -------------------------------------------------------------------------------------------------------
def export_onnx(model: IsoMLP, path: str | Path, dtype: torch.dtype = torch.float32, opset: int = DEFAULT_OPSET,
                ir_version: int = DEFAULT_IR_VERSION) -> Path:
    """Write the model as one self-contained ONNX file (atomically)."""
    proto = build_onnx(model, dtype, opset, ir_version)
    with io.atomic_path(path) as tmp:
        tmp.write_bytes(proto.SerializeToString())
    return Path(path)


def ort_session(path: str | Path, threads: int | None = None):
    import onnxruntime as ort

    ort.disable_telemetry_events()  # issue 13; see docs/onnx.md for what onnxruntime still writes under ~/.cache
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = threads
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(session, x: torch.Tensor, np_dtype, chunk: int = VERIFY_CHUNK) -> tuple[torch.Tensor, list[int]]:
    """Outputs for every row of x run in chunks, then the first row again alone (a batch of 1 from the same file);
    returns (outputs, n + 1 rows: the last one is row 0's batch-of-1 output) and the batch sizes run."""
    rows = x.detach().cpu().numpy().astype(np_dtype)
    batches = [rows[s:s + chunk] for s in range(0, len(rows), chunk)] + [rows[:1]]
    outputs = [session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0] for batch in batches]
    y = torch.from_numpy(np.concatenate(outputs).astype(np.float64))
    return y, sorted({len(batch) for batch in batches})


@torch.no_grad()
def compare(reference: torch.Tensor, candidate: torch.Tensor) -> tuple[float, float]:
    """max |Δy| (L2 over the output, worst input) and that relative to max |y|: the measure `api.output_difference`
    uses. NaN or Inf in the candidate gives NaN (which fails every tolerance)."""
    if not bool(torch.isfinite(candidate).all()):
        return float("nan"), float("nan")
    diff = torch.linalg.vector_norm(candidate - reference, dim=-1).max()
    scale = torch.linalg.vector_norm(reference, dim=-1).max().clamp_min(torch.finfo(torch.float64).tiny)
    return float(diff), float(diff / scale)


def torch_reference(model: IsoMLP, x: torch.Tensor) -> torch.Tensor:
    """The float64 torch forward: the function the file is meant to compute, independent of the file's precision."""
    return forward_float64(model, x, chunk=VERIFY_CHUNK)


def export_and_verify(model: IsoMLP, path: str | Path, probes: torch.Tensor, rtol: float = 1e-4,
                      dtype: torch.dtype = torch.float32, opset: int = DEFAULT_OPSET,
                      ir_version: int = DEFAULT_IR_VERSION) -> dict:
    """Export, run the file in onnxruntime (CPU) on `probes` and compare with the float64 torch forward.

    The file appears at `path` only if max_rel_diff ≤ rtol; otherwise any file at `path` is removed and CheckFailed
    is raised. Returns the verification record stored as report["onnx"]."""
    path = Path(path)
    if probes.dim() != 2 or probes.shape[0] == 0 or probes.shape[1] != model.widths[0]:
        raise IsocompressError(f"ONNX check needs probe inputs of shape n × {model.widths[0]}, got {tuple(probes.shape)}")
    try:
        proto = build_onnx(model, dtype, opset, ir_version)
    except CheckFailed:
        raise
    except IsocompressError as exc:
        raise IsocompressError(f"{path}: {exc}") from None
    try:
        with io.atomic_path(path) as tmp:
            tmp.write_bytes(proto.SerializeToString())
            record = verify_file(model, tmp, probes, ONNX_DTYPES[dtype])
            record.update(file=str(path), bytes=tmp.stat().st_size, dtype=str(dtype).replace("torch.", ""),
                          opset=opset, ir_version=ir_version, tolerance=rtol)
            if not record["max_rel_diff"] <= rtol:
                raise CheckFailed(
                    f"{path}: onnxruntime output differs from the torch forward by {record['max_rel_diff']:.3g}"
                    f" relative (max |Δy| {record['max_abs_diff']:.3g}) > tolerance {rtol:g}; the file was removed."
                    " Raise --onnx-tol if this is float32 rounding, else report a bug"
                )
    except CheckFailed:
        path.unlink(missing_ok=True)  # no stale file from an earlier run may stand beside a failed check
        raise
    return record


def verify_file(model: IsoMLP, path: Path, probes: torch.Tensor, np_dtype) -> dict:
    import onnxruntime as ort

    session = ort_session(path)
    y_onnx, batch_sizes = run_onnx(session, probes, np_dtype)
    reference = torch_reference(model, probes)
    max_abs, max_rel = compare(torch.cat([reference, reference[:1]]), y_onnx)
    return {
        "max_abs_diff": max_abs,
        "max_rel_diff": max_rel,
        "reference": "float64 torch forward",
        "runtime": f"onnxruntime {ort.__version__} CPUExecutionProvider",
        "n_probes": int(probes.shape[0]),
        "batch_sizes": batch_sizes,
    }
