"""ONNX export of an `IsoMLP`, built node by node with `onnx.helper`, and its verification in onnxruntime.

Why `onnx.helper` and not torch.onnx: full control of the opset, the IR version and the node names; a diagonal layer
is written as an elementwise Mul of a 1-D initializer (a tracing exporter would happily bake `diag_to_dense` into a
matrix); no onnxscript at export time; no `.onnx.data` side file. The maths therefore lives twice (here and in
`IsoMLP.forward`), which is why every export is run in onnxruntime and compared with the torch forward.

Graph (docs/onnx.md, "Graph"), as few nodes per layer as the maths allows; the torch model is not changed, only
the tensors written for it:
  * o folded into the weights: where o_l ≥ 1e-12, hidden space l carries one extra coordinate, first, with the
    constant value a_l = sqrt(o_l) (a zero row of W_l with bias a_l), so that |z|² + o = |(a, z)|² and
    m = ReduceL2(z) (the exact inverse of removing a constant direction). Then m ≥ a > 0: no guard is needed.
  * psi folded into the next weight matrix: that coordinate of h is g·a, so psi·g = (psi/a)·(g·a) is one more column
    of W_{l+1} (a dense consumer only).
  * a diagonal layer that widens (n_out > n_in) reads a hidden space that its (dense) producer has widened with zero
    rows, so it is one elementwise Mul (no Pad); its vector gets a leading 0 for the carried coordinate.
  Per hidden layer, with o folded:   m = ReduceL2(z); g = Tanh(m) / m         (3 nodes)
                 otherwise:          m2 = ReduceSumSquare(z) [+ o, if o ≠ 0] [Abs, if o < 0] [Max(·, 1e-30), unless
                                     o ≥ 1e-30]; m = Sqrt(m2); g = Tanh(m) / m
  (o ≥ 1e-30 bounds m away from 0; otherwise the clamp keeps m > 0 where m2 reaches 0, at z = 0 for o = 0 or on the
  sphere |z|² = −o for o < 0, and changes g by < 1e-30 since g = 1 − m²/3 + …)
  Per weight layer, from the previous (z, g):
        dense (psi folded or absent):  Gemm(Mul(z, g), W, b, transB=1)
        dense + psi, not folded:       Add(Mul(Gemm(z, W, psi, transB=1), g), b)   (W h + psi g = g (W z + psi))
        diag:                          Add([Pad](Mul([Slice](Mul(z, g)), d)), b)
        diag + psi:                    Add(Mul(Add([Pad](Mul([Slice](z), d)), psi), g), b)
  The first layer reads x as its h; the last node writes y (no Identity).
  * a small diagonal layer (its dense matrix ≤ DIAG_AS_GEMM_MAX entries, 64 KiB in float32) is written as a Gemm:
    two nodes instead of three to five, and at that size a node costs more than the matrix (batch-1 latency of the
    exact-shrunk digits model: `benchmarks/bench_onnx.py`, docs/onnx.md). Larger diagonals stay 1-D vectors (the
    file then is about half the dense one's).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from isocompress.core.errors import CheckFailed, IsocompressError
from isocompress.core.layers import forward_float64
from isocompress.core.measure import sample_norms
from isocompress.core.model import IsoMLP, Layer
from isocompress.formats import io, publish

# Opset 17 / IR 8 (onnx 1.12, 2022): every op used here exists in this form there (ReduceSumSquare still takes `axes`
# as an attribute), onnxruntime ≥ 1.13 loads it, and runtimes that reject IR 10 ("max supported IR version: 9")
# accept it. Nothing newer is needed.
DEFAULT_OPSET = 17
DIAG_AS_GEMM_MAX = 16_384  # a diagonal layer with at most this many dense entries is written as a Gemm (see above)
DEFAULT_IR_VERSION = 8
INPUT_NAME, OUTPUT_NAME, BATCH_DIM = "x", "y", "batch"
VERIFY_CHUNK = 256
ONNX_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}
NP_OF = {"float32": np.float32, "float64": np.float64, "float16": np.float16, "int8": np.int8}
# Where m² = |o + |z|²| can reach 0, m = Sqrt(Max(m², M2_FLOOR)): g(m²) and g(M2_FLOOR) differ by < M2_FLOOR/3, far
# below either dtype's rounding of g ≈ 1, and M2_FLOOR is a normal float32, so Sqrt, Tanh and Div stay exact there.
M2_FLOOR = 1e-30


# --- graph building (pure) ---------------------------------------------------------------------------------------
class GraphBuilder:
    """Collects nodes and initializers; every value gets a readable, unique name."""

    def __init__(self, np_dtype, m2_floor: float = M2_FLOOR):
        self.np_dtype = np_dtype
        self.m2_floor = m2_floor
        self.nodes: list = []
        self.initializers: list = []
        self.widths: dict[str, int] = {}  # feature width of the values that diagonal layers read

    def const(self, name: str, value) -> str:
        from onnx import numpy_helper

        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        dtype = np.int64 if array.dtype.kind in "iu" else self.np_dtype
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype=dtype), name))
        return name

    def stored(self, name: str, value: torch.Tensor, storage: str) -> str:
        """A weight stored in `storage` (export.quantized): the initializer itself, or the node that casts or
        dequantises it to the compute dtype."""
        if storage is None or np.dtype(NP_OF[storage]) == np.dtype(self.np_dtype):
            return self.const(name, value)
        from isocompress.export import quantized

        return quantized.stored_weight(self, name, value, storage)

    def op(self, op_type: str, inputs: list[str], name: str, **attrs) -> str:
        from onnx import helper

        self.nodes.append(helper.make_node(op_type, inputs, [name], name=name, **attrs))
        if op_type == "Mul" and inputs[0] in self.widths:
            self.widths[name] = self.widths[inputs[0]]
        return name


# Fold o into a carried coordinate only where sqrt(o) is comfortably normal (psi/a stays far from overflow).
FOLD_MIN_O = 1e-12
PSI_FOLD_MAX = 1e30


@dataclass(frozen=True)
class Hidden:
    """How hidden space l is laid out in the graph: `lead` is the value of the carried first coordinate (sqrt(o) when
    o is folded, 0.0 when the coordinate only keeps a diagonal layer aligned, None when there is none); `tail` zero
    coordinates at the end (so a widening diagonal consumer needs no Pad); `o` as the file stores it."""

    lead: float | None
    tail: int
    o: float
    sigma: str = "tanh"

    @property
    def folded(self) -> bool:
        return self.lead is not None and self.lead > 0

    @property
    def n_lead(self) -> int:
        return 0 if self.lead is None else 1


def plan_hidden(model: IsoMLP, np_dtype) -> list[Hidden]:
    """The layout of every hidden space (see `Hidden`), first to last."""
    layers, plan = model.layers, []
    for l, layer in enumerate(layers[:-1]):
        o = float(np.asarray(float(layer.o), dtype=np_dtype))
        prev_lead = plan[-1].lead if plan else None
        can_lead = layer.kind == "dense" or prev_lead is not None
        consumer = layers[l + 1]
        psi_ok = consumer.psi is None or o <= 0 or float(consumer.psi.abs().max()) / o**0.5 < PSI_FOLD_MAX
        if can_lead and o >= FOLD_MIN_O and psi_ok:
            lead = float(np.sqrt(np.asarray(o, dtype=np_dtype)))
        else:
            lead = 0.0 if (layer.kind == "diag" and prev_lead is not None) else None
        widen = consumer.kind == "diag" and layer.kind == "dense" and consumer.n_out > consumer.n_in
        plan.append(Hidden(lead=lead, tail=consumer.n_out - consumer.n_in if widen else 0, o=o, sigma=layer.sigma))
    return plan


def _embed(vector: torch.Tensor, lead, tail: int) -> torch.Tensor:
    """[lead] + vector + [0]*tail (lead None: no leading entry)."""
    head = [] if lead is None else [torch.tensor([float(lead)], dtype=vector.dtype)]
    return torch.cat(head + [vector, torch.zeros(tail, dtype=vector.dtype)])


def graph_tensors(layer: Layer, before: Hidden | None, after: Hidden | None, fold_psi: bool = True) -> dict:
    """The layer's tensors laid out for the graph: weight (with the carried/tail coordinates), bias, psi (None when
    folded into the weight or absent)."""
    lead_out = None if after is None else (after.lead if after.lead is not None else None)
    tail_out = 0 if after is None else after.tail
    lead_in_n, tail_in = (0, 0) if before is None else (before.n_lead, before.tail)
    bias = _embed(layer.bias, lead_out, tail_out)
    psi = layer.psi
    if layer.weight.dim() > 2:
        return _kernel_tensors(layer, before, lead_out, bias, fold_psi)
    if layer.kind == "dense":
        w = layer.weight
        lead_col = torch.zeros(w.shape[0], lead_in_n, dtype=w.dtype)
        if psi is not None and before is not None and before.folded and fold_psi:
            lead_col, psi = (psi / before.lead)[:, None], None
        w = torch.cat([lead_col, w, torch.zeros(w.shape[0], tail_in, dtype=w.dtype)], dim=1)
        rows = [torch.zeros(1 if lead_out is not None else 0, w.shape[1], dtype=w.dtype), w,
                torch.zeros(tail_out, w.shape[1], dtype=w.dtype)]
        w = torch.cat(rows, dim=0)
    else:
        n_in, n_out = lead_in_n + layer.n_in + tail_in, (lead_out is not None) + layer.n_out + tail_out
        k = min(n_in, n_out)
        w = _embed(layer.weight, 0.0 if lead_out is not None else None, k - layer.weight.shape[0] - (lead_out is not None))
    if psi is not None:
        psi = _embed(psi, 0.0 if lead_out is not None else None, tail_out)
    return {"weight": w, "bias": bias, "psi": psi}


def _kernel_tensors(layer: Layer, before: Hidden | None, lead_out, bias: torch.Tensor, fold_psi: bool = True) -> dict:
    """A convolution's kernel laid out for the graph: the carried channel of its input (sqrt(o) g at every position,
    zero-padded like g) takes the psi kernel divided by sqrt(o) as one more input channel; the carried channel of its
    output is a zero kernel with bias sqrt(o). Without a fold, psi stays a kernel of its own (a second Conv on g)."""
    w, psi = layer.weight, layer.psi
    if before is not None and before.n_lead:
        lead = torch.zeros(w.shape[0], 1, *w.shape[2:], dtype=w.dtype)
        if psi is not None and before.folded and fold_psi:
            lead, psi = (psi / before.lead)[:, None], None
        w = torch.cat([lead, w], dim=1)
    if lead_out is not None:
        w = torch.cat([torch.zeros(1, *w.shape[1:], dtype=w.dtype), w], dim=0)
        psi = None if psi is None else torch.cat([torch.zeros(1, *psi.shape[1:], dtype=psi.dtype), psi])
    return {"weight": w, "bias": bias, "psi": psi}


def weight_node(b: GraphBuilder, i: int, layer: Layer, t: dict, h: str | None, z_prev: str | None = None,
                g_prev: str | None = None) -> str:
    """(t["storage"]: the dtype the layer's weight is stored in, None for the graph's own.)"""
    """z of layer i from its input h (the network input), or from the previous layer's (z, g) with h = g·z."""
    if layer.geometry.in_spatial or layer.geometry.kernel:
        if h is None:
            h = b.op("Mul", [z_prev, g_prev], f"act{i - 1}/h")
        return _map_node(b, i, layer, t, h, g_prev)
    if h is None and t["psi"] is None:
        h = b.op("Mul", [z_prev, g_prev], f"act{i - 1}/h")
    if t["weight"].dim() == 2:
        return _dense_node(b, i, t, h, z_prev, g_prev)
    return _diag_node(b, i, t, h, z_prev, g_prev)


def _map_node(b: GraphBuilder, i: int, layer: Layer, t: dict, h: str, g_prev: str | None) -> str:
    """A layer that reads a map: [pooling], then Conv (a kernel), Flatten + Gemm (a flatten head) or Gemm (after
    global pooling); psi not folded into the weight is a Conv (or Gemm) of the pooled g map, added."""
    p, geometry = f"layer{i}", layer.geometry
    h = _pool_node(b, p, geometry, h, "pool")
    z = _linear_node(b, p, geometry, h, t["weight"], t["bias"], "")
    if t["psi"] is None:
        return z
    g = _pool_node(b, p, geometry, g_prev, "pool_g")
    psi = t["psi"] if not geometry.kernel else t["psi"][:, None]
    return b.op("Add", [z, _linear_node(b, p, geometry, g, psi, None, "psi_")], f"{p}/add_psi")


def _pool_node(b: GraphBuilder, p: str, geometry, x: str, name: str) -> str:
    pool = geometry.pool
    if pool is None:
        return x
    d = len(geometry.in_spatial)
    if pool.is_global:
        return b.op("ReduceMean", [x], f"{p}/{name}", axes=list(range(2, 2 + d)), keepdims=0)
    return b.op("AveragePool", [x], f"{p}/{name}", kernel_shape=list(pool.kernel), strides=list(pool.stride),
                pads=list(pool.padding) * 2, count_include_pad=1)


def _linear_node(b: GraphBuilder, p: str, geometry, x: str, weight: torch.Tensor, bias, prefix: str) -> str:
    inputs = [x, b.const(f"{p}.{prefix}weight", weight if not geometry.flatten else weight.reshape(weight.shape[0], -1))]
    if bias is not None:
        inputs.append(b.const(f"{p}.{prefix}bias", bias))
    if not geometry.kernel:
        return b.op("Gemm", inputs, f"{p}/{prefix}gemm", transB=1)
    if geometry.flatten:
        inputs[0] = b.op("Flatten", [x], f"{p}/{prefix}flatten", axis=1)
        return b.op("Gemm", inputs, f"{p}/{prefix}gemm", transB=1)
    return b.op("Conv", inputs, f"{p}/{prefix}conv", kernel_shape=list(geometry.kernel), strides=list(geometry.stride),
                pads=list(geometry.padding) * 2, dilations=list(geometry.dilation))


def _dense_node(b: GraphBuilder, i: int, t: dict, h, z_prev, g_prev) -> str:
    p = f"layer{i}"
    weight = b.stored(f"{p}.weight", t["weight"], t.get("storage"))
    if h is not None:
        return b.op("Gemm", [h, weight, b.const(f"{p}.bias", t["bias"])], f"{p}/gemm", transB=1)
    inner = b.op("Gemm", [z_prev, weight, b.const(f"{p}.psi", t["psi"])], f"{p}/gemm", transB=1)
    scaled = b.op("Mul", [inner, g_prev], f"{p}/times_g")
    return b.op("Add", [scaled, b.const(f"{p}.bias", t["bias"])], f"{p}/add_bias")


def _diag_node(b: GraphBuilder, i: int, t: dict, h, z_prev, g_prev) -> str:
    """Slice/Mul/Pad with a 1-D diagonal (never a dense matrix); with psi, g multiplies after the psi Add."""
    p = f"layer{i}"
    x = h if h is not None else z_prev
    k, n_out = int(t["weight"].shape[0]), int(t["bias"].shape[0])
    n_in = b.widths[x]
    if n_in > k:
        x = b.op("Slice", [x, b.const(f"{p}.slice_starts", [0]), b.const(f"{p}.slice_ends", [k]),
                           b.const(f"{p}.slice_axes", [1])], f"{p}/slice")
    z = b.op("Mul", [x, b.stored(f"{p}.weight", t["weight"], t.get("storage"))], f"{p}/diag_mul")
    if n_out > k:
        z = b.op("Pad", [z, b.const(f"{p}.pads", [0, 0, 0, n_out - k])], f"{p}/pad")
    if h is None:
        z = b.op("Mul", [b.op("Add", [z, b.const(f"{p}.psi", t["psi"])], f"{p}/psi_add"), g_prev], f"{p}/times_g")
    return b.op("Add", [z, b.const(f"{p}.bias", t["bias"])], f"{p}/add_bias")


def activation_nodes(b: GraphBuilder, i: int, hidden: Hidden, z: str) -> str:
    """g = tanh(m)/m, m² = |o + |z|²| (module docstring): 3 nodes with o folded, one more per guard otherwise."""
    p = f"act{i}"
    if hidden.folded:
        m = b.op("ReduceL2", [z], f"{p}/m", axes=[1], keepdims=1)
    else:
        o = hidden.o
        m2 = b.op("ReduceSumSquare", [z], f"{p}/sum_sq", axes=[1], keepdims=1)
        if o != 0:
            m2 = b.op("Add", [m2, b.const(f"{p}.o", np.array(o))], f"{p}/m2")
        if o < 0:
            m2 = b.op("Abs", [m2], f"{p}/abs")
        if not o >= b.m2_floor:
            m2 = b.op("Max", [m2, b.const(f"{p}.m2_floor", np.array(b.m2_floor))], f"{p}/m2_floor")
        m = b.op("Sqrt", [m2], f"{p}/m")
    if hidden.sigma == "log1p":  # ONNX has no Log1p: log(1 + m)
        sigma = b.op("Log", [b.op("Add", [m, b.const(f"{p}.one", np.array(1.0))], f"{p}/one_plus_m")], f"{p}/log1p")
    else:
        sigma = b.op("Tanh", [m], f"{p}/tanh")
    return b.op("Div", [sigma, m], f"{p}/g")


def node_counts(proto) -> list[int]:
    """Nodes per weight layer (its weight nodes plus the activation after it), from the graph's node names."""
    counts: dict[int, int] = {}
    for node in proto.graph.node:
        head = node.name.split("/")[0]
        if not head.startswith(("layer", "act")):  # the float16 graph's casts of x and y
            continue
        index = int(head.removeprefix("layer").removeprefix("act"))
        index = index + 1 if node.name.endswith("/h") else index  # h = g·z belongs to the layer that reads it
        counts[index] = counts.get(index, 0) + 1
    return [counts.get(i, 0) for i in range(max(counts) + 1)]


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
               ir_version: int = DEFAULT_IR_VERSION, check: bool = True, plan=None):
    """The model as an `onnx.ModelProto`: input x (batch × n_0, batch dynamic), output y (batch × n_L). `plan`
    (core.precision.Plan, None: everything in `dtype`): the dense weights' storage and the compute dtype; a float16
    compute graph casts x to float16 and y back to float32 (docs/onnx.md, "Precision")."""
    import onnx
    from onnx import TensorProto, helper

    if dtype not in ONNX_DTYPES:
        raise IsocompressError(f"ONNX export in {dtype} is not supported; use float32 or float64")
    if dtype == torch.float64 and not model.is_mlp:
        raise IsocompressError("ONNX export of a convolutional network in float64 is not supported (onnxruntime's CPU"
                               " provider has no float64 Conv or AveragePool); export it in float32")
    check_representable(model, torch.float16 if plan is not None and "float16" in (plan.weights, plan.compute)
                        else dtype)
    compute = NP_OF[plan.compute] if plan is not None else ONNX_DTYPES[dtype]
    b = GraphBuilder(compute, m2_floor=2.0 ** -24 if compute == np.float16 else M2_FLOOR)
    first = _graph_nodes(b, model, plan)
    elem = TensorProto.DOUBLE if compute == np.float64 else TensorProto.FLOAT
    if compute == np.float16:
        b.nodes.insert(0, helper.make_node("Cast", [INPUT_NAME], [first], name=first, to=TensorProto.FLOAT16))
        b.op("Cast", [b.nodes[-1].output[0]], OUTPUT_NAME, to=TensorProto.FLOAT)
    else:
        b.nodes[-1].output[0] = OUTPUT_NAME  # the output layer's last node writes y directly
    widths, input_shape, output_shape = model.widths, model.input_shape, model.output_shape
    kind = "isotropic MLP" if model.is_mlp else f"isotropic CNN, input {list(input_shape)}"
    graph = helper.make_graph(
        b.nodes, "isotropic_mlp" if model.is_mlp else "isotropic_cnn",
        [helper.make_tensor_value_info(INPUT_NAME, elem, [BATCH_DIM, *input_shape])],
        [helper.make_tensor_value_info(OUTPUT_NAME, elem, [BATCH_DIM, *output_shape])],
        initializer=b.initializers,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="isocompress",
                              doc_string=f"{kind}, widths {list(widths)}")
    proto.ir_version = ir_version
    if check:
        onnx.checker.check_model(proto, full_check=True)
    return proto


def _graph_nodes(b: GraphBuilder, model: IsoMLP, plan) -> str:
    """Every layer's nodes; returns the name the first layer reads x as (x itself, or its float16 cast)."""
    storage = [None if plan is None else (plan.weights if layer.kind == "dense" else plan.others)
               for layer in model.layers]
    fold_psi = plan is None or plan.weights in ("float32", "float64")  # a folded psi column would share W's dtype
    if plan is None or plan.weights in ("float32", "float64"):  # float16/int8: a diagonal stays a vector (bytes)
        model = IsoMLP([small_diagonals_dense(layer) for layer in model.layers])
    first = INPUT_NAME if b.np_dtype != np.float16 else "x/cast"
    b.widths[first] = model.widths[0]
    hidden = plan_hidden(model, b.np_dtype)
    z, g = None, None
    for i, layer in enumerate(model.layers):
        before, after = (hidden[i - 1] if i > 0 else None), (None if layer.is_output else hidden[i])
        tensors = {**graph_tensors(layer, before, after, fold_psi), "storage": storage[i]}
        z = weight_node(b, i, layer, tensors, first if i == 0 else None, z, g)
        b.widths[z] = int(tensors["bias"].shape[0])
        if not layer.is_output:
            g = activation_nodes(b, i, after, z)
    return first


def small_diagonals_dense(layer: Layer) -> Layer:
    """The layer as written to ONNX: a diagonal layer of at most DIAG_AS_GEMM_MAX dense entries becomes dense, and so
    does a diagonal 1×1 convolution (a Conv node; its file bytes are then those of the dense kernel)."""
    if layer.kind == "diag" and (layer.geometry.kernel or layer.n_out * layer.n_in <= DIAG_AS_GEMM_MAX):
        return layer.as_dense()
    return layer


# --- files -------------------------------------------------------------------------------------------------------
def write_onnx(model: IsoMLP, path: str | Path, dtype: torch.dtype = torch.float32, opset: int = DEFAULT_OPSET,
               ir_version: int = DEFAULT_IR_VERSION) -> Path:
    """Write the model as one self-contained ONNX file (atomically), without running it (see `export_onnx`)."""
    proto = build_onnx(model, dtype, opset, ir_version)
    with io.atomic_path(path) as tmp:
        tmp.write_bytes(proto.SerializeToString())
    return Path(path)


def export_onnx(model: IsoMLP, path: str | Path, probes: torch.Tensor | None = None, *, rtol: float = 1e-4,
                dtype: torch.dtype = torch.float32, opset: int = DEFAULT_OPSET,
                ir_version: int = DEFAULT_IR_VERSION, precision: str | None = None) -> dict:
    """`isocompress export --format onnx` in Python: write `path` and verify it in onnxruntime against the float64
    torch forward on `probes` (default: 1,024 Gaussian inputs at scales 0.01–1000, as the CLI). Returns the
    verification record (max_abs_diff, max_rel_diff, …, as report.json's "onnx"); raises CheckFailed, leaving no
    file, if max_rel_diff > rtol. `precision`: float32, float16 or int8-weights (docs/onnx.md, "Precision"): also
    verified against the certified rounding bound over |x| ≤ the largest probe norm (docs/bounds.md §5b)."""
    if not isinstance(model, IsoMLP):
        raise IsocompressError(f"export_onnx needs an IsoMLP (isocompress.load(path)), got {type(model).__name__}")
    if not (isinstance(rtol, (int, float)) and 0 < rtol < float("inf")):
        raise IsocompressError(f"export_onnx: rtol {rtol!r} must be a positive finite number")
    if probes is None:
        from isocompress.core.measure import probe_inputs

        probes = probe_inputs(model.input_shape)
    plan = None
    if precision is not None:  # float32 | float16 | int8-weights (docs/onnx.md, "Precision")
        from isocompress.bounds import deployed
        from isocompress.core.precision import parse_precision

        probes = torch.as_tensor(probes)
        plan = deployed.choose_plan(model, parse_precision(precision), float(sample_norms(probes).max()))
    return export_and_verify(model, path, torch.as_tensor(probes), rtol=rtol, dtype=dtype, opset=opset,
                             ir_version=ir_version, plan=plan)


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
    diff = sample_norms(candidate - reference).max()
    scale = sample_norms(reference).max().clamp_min(torch.finfo(torch.float64).tiny)
    return float(diff), float(diff / scale)


def torch_reference(model: IsoMLP, x: torch.Tensor) -> torch.Tensor:
    """The float64 torch forward: the function the file is meant to compute, independent of the file's precision."""
    return forward_float64(model, x, chunk=VERIFY_CHUNK)


def export_and_verify(model: IsoMLP, path: str | Path, probes: torch.Tensor, rtol: float = 1e-4,
                      dtype: torch.dtype = torch.float32, opset: int = DEFAULT_OPSET,
                      ir_version: int = DEFAULT_IR_VERSION, plan=None) -> dict:
    """Export, run the file in onnxruntime (CPU) on `probes` and compare with the float64 torch forward.

    The file appears at `path` only if max_rel_diff ≤ rtol (float32 and float64 files) and, with a `plan`
    (core.precision), max |Δy| ≤ the certified rounding term of bounds.deployed over |x| ≤ the largest probe norm (the
    tolerance of float16 and int8 files); otherwise any file at `path` is removed and CheckFailed is raised. Returns
    the verification record stored as report["onnx"]."""
    path = Path(path)
    shape = tuple(model.input_shape)
    if probes.dim() != 1 + len(shape) or probes.shape[0] == 0 or tuple(probes.shape[1:]) != shape:
        raise IsocompressError(f"ONNX check needs probe inputs of shape n × {' × '.join(map(str, shape))}, got"
                               f" {tuple(probes.shape)}")
    try:
        proto = build_onnx(model, dtype, opset, ir_version, plan=plan)
    except CheckFailed:
        raise
    except IsocompressError as exc:
        raise IsocompressError(f"{path}: {exc}") from None
    data = None
    try:
        with io.atomic_path(path) as tmp:
            data = serialize(proto, tmp, path)
            record = verify_file(model, tmp, probes, ONNX_DTYPES[dtype] if plan is None else input_dtype(plan))
            record.update(file=str(path), bytes=tmp.stat().st_size, dtype=str(dtype).replace("torch.", ""),
                          opset=opset, ir_version=ir_version, tolerance=rtol)
            if data is not None:
                record.update(external_data=data.name, external_data_bytes=data.stat().st_size)
            check_tolerances(model, path, record, probes, rtol, plan)
    except CheckFailed:
        for stale in (path, data):
            if stale is not None and stale.exists():  # no stale file from an earlier run may stand beside a failed
                publish.discard(stale)  # check (retried while in use on Windows, where a failed unlink would hide it)
        raise
    return record


EXTERNAL_DATA_BYTES = 2 ** 31 - 2 ** 24  # protobuf's 2 GiB limit on one message, less room for the graph


def serialize(proto, tmp: Path, final: Path) -> Path | None:
    """The model into `tmp`; one over EXTERNAL_DATA_BYTES keeps its tensors in FINAL.data beside it (ONNX external
    data, located by that name relative to the .onnx file, so it is written under its final name: within a run's
    private stage directory, published with the rest). Returns the data file's path, or None."""
    if proto.ByteSize() <= EXTERNAL_DATA_BYTES:
        tmp.write_bytes(proto.SerializeToString())
        return None
    import onnx

    data = final.with_name(final.name + ".data")
    if data.exists():
        publish.discard(data)
    onnx.save_model(proto, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name,
                    size_threshold=0)
    return data if data.exists() else None


def input_dtype(plan):
    """The graph's input dtype: float32, or float64 for a float64 graph (a float16 graph casts x inside)."""
    return np.float64 if plan.compute == "float64" else np.float32


def check_tolerances(model: IsoMLP, path: Path, record: dict, probes: torch.Tensor, rtol: float, plan) -> None:
    """The relative tolerance (float32/float64 files) and the certified rounding term (any file with a plan)."""
    from isocompress.bounds import deployed

    relative = plan is None or plan.precision in ("float32", "float64")
    if plan is not None and deployed.supported(model):
        x_norm = float(sample_norms(probes).max())
        bound = deployed.deployed_bound(model, plan, x_norm)["bound"]
        record.update(precision=plan.describe(), certified_rounding=bound, certified_rounding_input_norm=x_norm)
        if not record["max_abs_diff"] <= bound:
            raise CheckFailed(
                f"{path}: onnxruntime output differs from the float64 model by {record['max_abs_diff']:.3g}, above"
                f" the certified rounding bound {bound:.3g} of {plan.precision} (|x| ≤ {x_norm:.4g}); the file was"
                " removed; please report this model")
    elif plan is not None and not relative:
        raise IsocompressError(f"{path}: --precision {plan.precision} is available for tanh MLPs only yet; use"
                               " --precision float32 for this network")
    if relative and not record["max_rel_diff"] <= rtol:
        raise CheckFailed(
            f"{path}: onnxruntime output differs from the torch forward by {record['max_rel_diff']:.3g}"
            f" relative (max |Δy| {record['max_abs_diff']:.3g}) > tolerance {rtol:g}; the file was removed."
            " Raise --onnx-tol if this is float32 rounding, else report a bug"
        )


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
