"""The exact shrink one layer at a time: peak memory near one layer, not the model.

`open_source` checks a file's stored shapes as io.load does (a skeleton model on the meta device) and then reads layer
i on demand, in float64, in every layout io reads: isocompress's own (with or without a config) and the reference
state_dict; safetensors through its header and plain reads (no mapping of the whole file stays resident), .pt through
`torch.load(mmap=True, weights_only=True)`. Pass 0 (`constant_rule`) runs the rule's inputs through the original in
the coordinates of its reachable subspaces and takes the norms of the constant-direction rule there (docs/bounds.md
§6); `shrink_exact_to_file` then runs remove_all_constant_directions (pass 1, layer pairs, results in float64
temporary files) and alternate_diagonalise (pass 2, layer triples) as the in-memory verbs do, writes the output
safetensors incrementally (`TensorWriter`: header first, then each tensor as it is final) and runs the probe inputs
through the float64 result and the saved result on the way. The shrunk model (small) is returned for the ONNX file.
CNNs, log1p networks and lossy runs use the in-memory path.
"""

from __future__ import annotations

import json
import math
import struct
import tempfile
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch

from isocompress.core.config import ModelConfig
from isocompress.core.errors import IsocompressError
from isocompress.core.layers import _left_mul, _right_mul, producer_basis, remove_constant_pair
from isocompress.core.model import IsoMLP, Layer
from isocompress.core.primitives import isotropic_tanh, svd64
from isocompress.exact.constants import (
    constant_floor,
    constant_record,
    is_constant_space,
    layer_input_bound,
    layer_norms,
    lipschitz_after,
    reachable_step,
)
from isocompress.exact.shrink import choose_alternating_layers
from isocompress.formats import io

F64 = torch.float64
ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


# --- reading one layer at a time --------------------------------------------------------------------------------
@dataclass
class LayerSource:
    """Layer i of a checkpoint in any layout the loaders read, read when asked (float64, checked as io.load checks).
    `skeleton` is the model on the meta device, built and validated by io.model_from_tensors from the stored shapes
    alone (the same checks and messages as loading the whole file); `read` gives stored tensors by name."""

    path: Path
    skeleton: IsoMLP
    dtype: torch.dtype
    read: Callable[[list[str]], dict[str, torch.Tensor]]
    keys: set[str]
    mapped: bool = False
    reference: str | None = None  # the reference layout's intrinsic-length mode (log | raw); None: the own layout
    notes: list[str] = field(default_factory=list)

    @property
    def n_layers(self) -> int:
        return len(self.skeleton.layers)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.skeleton.input_shape)

    @property
    def config(self) -> ModelConfig:
        return self.skeleton.config

    def names(self, i: int) -> list[str]:
        """The stored names of layer i's tensors."""
        if self.reference is None:
            wanted = [f"layers.{i}.{n}" for n in ("weight", "bias", "psi", "o")]
        else:
            wanted = [f"weight_parameters.{i}", f"bias_parameters.{i}", f"psi_parameters.{i - 1}",
                      f"activation.{i}.intrinsic_length", f"activation.{i}.o_const"]
        return [k for k in wanted if k in self.keys]

    def layer(self, i: int) -> Layer:
        """Layer i in float64; for a memory-mapped .pt the layer's file pages are dropped again afterwards."""
        raw = self.read(self.names(i))
        try:
            return self._layer(i, raw)
        finally:
            if self.mapped:
                for t in raw.values():
                    drop_pages(t, self.path)

    def _layer(self, i: int, raw: dict[str, torch.Tensor]) -> Layer:
        where, shape = str(self.path), self.skeleton.layers[i]
        hidden = i < self.n_layers - 1
        if self.reference is None:
            get = lambda n: io._float64(raw, f"layers.{i}.{n}", where) if f"layers.{i}.{n}" in raw else None  # noqa: E731
            weight, bias, psi, o = get("weight"), get("bias"), get("psi"), get("o")
            o = None if o is None else o.reshape(())
        else:
            weight = io._float64(raw, f"weight_parameters.{i}", where)
            bias = io._float64(raw, f"bias_parameters.{i}", where)
            key = f"psi_parameters.{i - 1}"
            psi = io._float64(raw, key, where) if key in raw else None
            o = io._reference_o(raw, set(raw), i, where, self.reference) if hidden else None
        return Layer(weight=weight, bias=bias, n_in=shape.n_in, psi=psi, o=o, geometry=shape.geometry,
                     sigma=shape.sigma)


def read_safetensors(path: Path, names: list[str], missing_ok: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file read with plain reads (no mapping: only what is asked for becomes resident);
    `missing_ok`: names the file does not hold are left out."""
    table = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32}
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
        out = {}
        for name in names:
            if missing_ok and name not in header:
                continue
            entry = header[name]
            dtype, (start, end) = table.get(entry["dtype"]), entry["data_offsets"]
            if dtype is None:  # int8, bool, …: read as stored by safetensors; the layer's check then names the problem
                out[name] = _read_as_stored(path, name)
                continue
            handle.seek(8 + length + start)
            out[name] = _read_as_float64(handle, dtype, end - start, path, name).reshape(entry["shape"])
    return out


def _read_as_stored(path: Path, name: str) -> torch.Tensor:
    from safetensors.torch import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.get_tensor(name)


def _read_as_float64(handle, dtype: torch.dtype, size: int, path: Path, name: str, chunk: int = 1 << 22):
    """`size` bytes of `dtype` values from the file's position, as float64 (floating dtypes; others as stored),
    read `chunk` bytes at a time so that the stored copy never exists whole beside the float64 one."""
    count = size // dtype.itemsize
    out = torch.empty(count, dtype=torch.float64 if dtype.is_floating_point else dtype)
    buffer = torch.empty(chunk - chunk % dtype.itemsize, dtype=torch.uint8)
    done = 0
    while done < count:
        n = min(count - done, buffer.numel() // dtype.itemsize)
        view = buffer[: n * dtype.itemsize]
        if handle.readinto(view.numpy()) != view.numel():
            raise IsocompressError(f"{path}: tensor {name!r} is cut short; is the file truncated?")
        out[done:done + n] = view.view(dtype)
        done += n
    return out


def _file_mapped(first: int, last: int, path: Path) -> bool:
    """Whether [first, last) lies inside one mapping of `path` (/proc/self/maps): only then may its pages be dropped
    (on anonymous memory MADV_DONTNEED would zero them)."""
    target = str(Path(path).resolve())
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                lo, hi = (int(v, 16) for v in fields[0].split("-"))
                if lo <= first and last <= hi:
                    return len(fields) == 6 and fields[5].strip() == target
    except (OSError, ValueError):
        return False
    return False


def drop_pages(tensor: torch.Tensor, path: Path) -> None:
    """madvise(MADV_DONTNEED) on the whole pages of a memory-mapped tensor's bytes: the kernel drops them (clean file
    pages: read again if ever touched), so a .pt read layer by layer does not stay resident. Best effort."""
    import ctypes
    import mmap

    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        page = mmap.PAGESIZE
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        first, last = (start + page - 1) // page * page, end // page * page  # pages wholly inside the tensor
        if last > first and _file_mapped(first, last, path):
            libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), 4)  # MADV_DONTNEED
    except (OSError, AttributeError):
        pass


ST_READ = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def open_source(path: str | Path, ref_intrinsic_length: str | None = None) -> LayerSource | None:
    """A LayerSource for a dense tanh MLP in any layout io reads (own .pt/.safetensors with or without a config,
    the reference state_dict), or None where the in-memory path must read it (a CNN or log1p network, an unusual
    container, a file that does not open: that path then reports any problem). A file whose stored shapes io would
    refuse raises the same IsocompressError io.load raises, before any tensor is read."""
    path = Path(path)
    try:
        opened = _open_tensors(path)
    except Exception:  # noqa: BLE001  (anything unusual: the in-memory path reads the file and says what is wrong)
        return None
    if opened is None:
        return None
    meta, config_json, read, mapped = opened
    io.check_tensor_kinds(meta, path)
    notes: list[str] = []
    skeleton = io.model_from_tensors(meta, config_json, str(path), ref_intrinsic_length, notify=notes.append)
    if not skeleton.is_mlp or any(layer.sigma != "tanh" for layer in skeleton.layers):
        return None
    keys = set(meta)
    own = all(io.OWN_KEY.match(k) for k in keys)
    mode = None if own else (ref_intrinsic_length or "log")
    dtype = next((t.dtype for t in meta.values() if t.is_floating_point()), torch.float32)
    return LayerSource(path, skeleton, dtype, read, keys, mapped, mode, notes)


def _open_tensors(path: Path):
    """(tensors on the meta device in stored order, config JSON, read(names), memory-mapped?) or None."""
    suffix = path.suffix.lower()
    if not path.is_file():
        return None
    if suffix == ".safetensors":
        from safetensors.torch import safe_open

        with safe_open(str(path), framework="pt") as handle:
            config_json = (handle.metadata() or {}).get(io.CONFIG_KEY)
            meta = {}
            for key in handle.keys():
                entry = handle.get_slice(key)
                dtype = ST_READ.get(str(entry.get_dtype()))
                if dtype is None:
                    return None
                meta[key] = torch.empty(entry.get_shape(), dtype=dtype, device="meta")
        return meta, config_json, lambda names: read_safetensors(path, names), False
    if suffix not in (".pt", ".pth"):
        return None
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(obj, Mapping) or not isinstance(obj.get(io.CONFIG_KEY, ""), str):
        return None
    config_json = obj.get(io.CONFIG_KEY)
    for nest in ("state_dict", "model_state_dict"):
        if isinstance(obj.get(nest), Mapping):
            obj = obj[nest]
            break
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if any(t.layout != torch.strided for t in tensors.values()):
        return None
    meta = {k: torch.empty(t.shape, dtype=t.dtype, device="meta") for k, t in tensors.items()}
    return meta, config_json, lambda names: {k: tensors[k] for k in names}, True


# --- writing one tensor at a time ---------------------------------------------------------------------------------
class NullWriter:
    """A TensorWriter that writes nothing."""

    def write(self, name: str, tensor: torch.Tensor) -> None:
        pass

    def close(self, complete: bool = True) -> None:
        pass


class TensorWriter:
    """A safetensors file written incrementally: the header (every name, dtype, shape) first, then each tensor's
    bytes in header order as it becomes available. Write into an io.atomic_path."""

    def __init__(self, path: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]):
        header, offset = {}, 0
        for name, dtype, shape in specs:
            size = dtype.itemsize
            for d in shape:
                size *= d
            header[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        header["__metadata__"] = metadata
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self._order = [name for name, _, _ in specs]
        self._dtypes = {name: dtype for name, dtype, _ in specs}
        self._handle = open(path, "wb")
        self._handle.write(struct.pack("<Q", len(text)) + text)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if not self._order or self._order[0] != name:
            raise AssertionError(f"tensor {name!r} written out of order")
        self._order.pop(0)
        data = tensor.detach().to(self._dtypes[name]).contiguous().reshape(-1)
        self._handle.write(memoryview(data.view(torch.uint8).numpy()))

    def close(self, complete: bool = True) -> None:
        self._handle.close()
        if complete and self._order:
            raise AssertionError(f"tensors never written: {self._order[:3]}")


def layer_tensors(i: int, layer: Layer) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of layer i in isocompress's state_dict order."""
    out = [(f"layers.{i}.weight", layer.weight), (f"layers.{i}.bias", layer.bias)]
    if layer.psi is not None:
        out.append((f"layers.{i}.psi", layer.psi))
    if layer.o is not None:
        out.append((f"layers.{i}.o", layer.o))
    return out


def checked_cast(name: str, value: torch.Tensor, dtype: torch.dtype, where: str) -> torch.Tensor:
    """value in dtype, refusing overflow to inf (as io.model_tensors)."""
    cast = value.to(dtype)
    if not bool(torch.isfinite(cast).all()) and bool(torch.isfinite(value).all()):
        raise IsocompressError(f"{where}: {name} has values beyond the {str(dtype).replace('torch.', '')} range; save"
                               " in float64 (--dtype float64) or rescale the model")
    return cast


# --- the forward, one layer at a time -------------------------------------------------------------------------------
@dataclass
class Forward:
    """Inputs x carried through layers fed in order: after the output layer, `y` holds the outputs (float64); `m2`
    and `m2_space` hold, per input, the largest m² = o + |z|² over the hidden spaces so far and where it was reached
    (core.ranges' checks)."""

    h: torch.Tensor
    g: torch.Tensor | None = None
    y: torch.Tensor | None = None
    m2: torch.Tensor | None = None
    m2_space: torch.Tensor | None = None
    fed: int = 0

    @torch.no_grad()
    def feed(self, layer: Layer, chunk: int = 128, image: torch.Tensor | None = None,
             basis: torch.Tensor | None = None) -> None:
        """One layer, `chunk` rows at a time (the temporaries of a wide layer stay small). In reduced coordinates
        (docs/bounds.md §6, "Reachable subspaces"): with `image` = W Q, `h` holds the coordinates c of the previous
        activations in the basis Q (h = Q c), so W h = image·c costs n·r per row instead of n²; with `basis` Q' of
        this layer's reachable subspace, the new activations are kept as their coordinates Q'ᵀh."""
        layer = layer.cast(F64)
        n = self.h.shape[0]
        out = torch.empty(n, layer.n_out if basis is None else basis.shape[1], dtype=F64)
        gains = None if layer.is_output else torch.empty(n, 1, dtype=F64)
        m2 = None if layer.is_output else torch.empty(n, dtype=F64)
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            z = (layer.apply_weight(self.h[rows]) if image is None else self.h[rows] @ image.T) + layer.bias
            if layer.psi is not None:
                z = z + layer.psi * self.g[rows]
            if gains is None:
                out[rows] = z
            else:
                m2[rows] = (z * z).sum(dim=-1) + layer.o
                h, gains[rows] = isotropic_tanh(z, layer.o)
                out[rows] = h if basis is None else h @ basis
        if gains is None:
            self.y = out
        else:
            self.h, self.g = out, gains
            self._track(m2)
        self.fed += 1

    def _track(self, m2: torch.Tensor) -> None:
        m2 = torch.where(torch.isfinite(m2), m2, torch.full_like(m2, math.inf))
        if self.m2 is None:
            self.m2, self.m2_space = m2, torch.zeros(m2.shape[0], dtype=torch.int64)
            return
        larger = m2 > self.m2
        self.m2 = torch.where(larger, m2, self.m2)
        self.m2_space = torch.where(larger, torch.full_like(self.m2_space, self.fed), self.m2_space)


def summary(i: int, layer: Layer) -> dict:
    """One row of api.layer_summary."""
    return layer.record(i)


# --- the two passes ---------------------------------------------------------------------------------------------------
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def return_freed_memory_to_the_system() -> None:
    """Fix glibc's mmap threshold at 1 MiB (it otherwise rises to 32 MiB after the first large free, so every freed
    layer-sized buffer stays in the heap and the process's memory grows like the model instead of one layer). A
    process-wide allocator setting, harmless elsewhere; ignored where there is no glibc."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):
        pass


def _contiguous(layer: Layer) -> Layer:
    def c(t):
        return None if t is None else t.contiguous()

    return replace(layer, weight=c(layer.weight), bias=c(layer.bias), psi=c(layer.psi), o=c(layer.o))


def _save_layer(layer: Layer, path: Path) -> None:
    """A float64 temporary of one layer (plain writes: a full disk or a file-size limit is an OSError naming it)."""
    tensors = [(k.split(".")[-1], v) for k, v in layer_tensors(0, layer)]
    writer = TensorWriter(path, [(k, F64, tuple(v.shape)) for k, v in tensors], {})
    try:
        for k, v in tensors:
            writer.write(k, v)
    finally:
        writer.close(complete=False)


def _load_layer(path: Path, n_in: int) -> Layer:
    t = read_safetensors(path, ["weight", "bias", "psi", "o"], missing_ok=True)
    return Layer(weight=t["weight"], bias=t["bias"], n_in=n_in, psi=t.get("psi"), o=t.get("o"))


def constant_rule(src: LayerSource, x: torch.Tensor, probes: torch.Tensor | None = None) -> SimpleNamespace:
    """Pass 0 of a streamed exact shrink: what layers.remove_constant_directions_accounted needs before it visits a
    hidden space (issue 13's output-relative rule): after[i] = L_{i+1}, the Lipschitz constant of everything after
    hidden space i (from every original layer's norm on its reachable subspace, constants.reachable_step, |psi| and
    o), the output scale Y = max |y| on x and R = max |x|; and y_probes, the original's outputs on `probes` (default
    x) from the same forward (no second forward of the original is held beside its wide layers later)."""
    rows, joint = _probe_rows(x, probes)
    fwd, norms, o, basis, largest = Forward(joint.to(F64)), [], [], None, (0.0, "")
    for i in range(src.n_layers):
        layer = src.layer(i)
        o.append(None if layer.is_output else float(layer.o))
        layer_norm, next_basis, image = reachable_step(layer, basis, with_image=True)
        fwd.feed(layer, image=None if basis is None else image, basis=next_basis)
        basis = next_basis
        norms.append(layer_norm)
        del image
        for name, value in layer_tensors(i, layer):  # as ranges.largest_stored, in state_dict order
            top = abs_max(value)
            if top > largest[0]:
                largest = (top, name)
        del layer
    scale = max(float(torch.linalg.vector_norm(fwd.y[: x.shape[0]], dim=-1).max()), torch.finfo(F64).tiny)
    return SimpleNamespace(after=lipschitz_after(norms, o), norms=norms, o=o, scale=scale, forward=fwd,
                           radius=float(torch.linalg.vector_norm(x, dim=-1).max()), y_probes=fwd.y[rows],
                           largest=largest)


def abs_max(t: torch.Tensor) -> float:
    """max |t| from one min/max pass (no |t|-sized temporary beside a wide layer); 0 for an empty tensor."""
    if t.numel() == 0:
        return 0.0
    lo, hi = torch.aminmax(t.reshape(-1))
    return max(-float(lo), float(hi))


def measured_m2(fwd: Forward, rows: slice) -> tuple[float, int, float]:
    """ranges.largest_m2 of the rows fed through `fwd`: (max m², its hidden space, max |y|)."""
    y_max = float(torch.linalg.vector_norm(fwd.y[rows], dim=-1).max())
    if fwd.m2 is None:
        return 0.0, 0, y_max
    m2 = fwd.m2[rows]
    at = int(torch.argmax(m2))
    return float(m2[at]), int(fwd.m2_space[rows][at]), y_max


def _probe_rows(x: torch.Tensor, probes: torch.Tensor | None) -> tuple[slice, torch.Tensor]:
    """(rows of the probes' outputs, the inputs to run): x alone when the probes are x or its last rows (the rule's
    inputs are the probes, or the probes plus calibration data with the calibration data last), else x then probes."""
    n = x.shape[0]
    if probes is None:
        return slice(0, n), x
    p = probes.shape[0]
    if p <= n and torch.equal(x[n - p:].to(F64), probes.to(F64)):
        return slice(n - p, n), x
    return slice(n, n + p), torch.cat([x.to(F64), probes.to(F64)])


def whole_space_chain(src: LayerSource, rule: SimpleNamespace, i: int) -> None:
    """rule.after with whole-space norms for layers i+2, … (read again): hidden space i is constant, and the chain
    after it is not taken on reachable subspaces (docs/bounds.md §6, "Reachable subspaces")."""
    for k in range(i + 2, src.n_layers):
        rule.norms[k] = layer_norms(src.layer(k))
    rule.after = lipschitz_after(rule.norms, rule.o)


def remove_constants_pass(src: LayerSource, tmp: Path, step: Callable[[str], None],
                          rule: SimpleNamespace) -> tuple[list[dict], list[SimpleNamespace], dict]:
    """remove_all_constant_directions, one pair of layers at a time, with the rule and record of
    layers.remove_constant_directions_accounted; layer i of the result goes to tmp/i. The producer's SVD runs before
    its consumer is read (one wide layer and the SVD's workspace are never resident together). Returns (summaries of the original layers, shapes of the result's layers, the record)."""
    before, shapes, pending, o_before = [], [], None, None
    record = constant_record(None, rule.scale, rule.radius)
    for i in range(src.n_layers):
        if pending is not None:
            if i + 1 < src.n_layers and is_constant_space(pending):
                whole_space_chain(src, rule, i - 1)
            b = layer_input_bound(i - 1, rule.radius, o_before, pending.psi is not None)
            basis = producer_basis(pending, sigma_floor=constant_floor(b, rule.after[i - 1], rule.scale))
        original = src.layer(i)
        before.append(summary(i, original))
        if pending is not None:
            pair, sigma = remove_constant_pair(pending, original, basis=basis)
            del basis
            kept, original = (pending, original) if pair is None else pair
            original = _contiguous(original)  # as an IsoMLP stores it: the same float64 rounding as the in-memory path
            record["dropped"].append(pending.n_out - kept.n_out)
            record["largest_dropped_sigma"].append(sigma)
            record["bound"] += sigma * b * rule.after[i - 1]
            o_before = float(kept.o)
            _save_layer(kept, tmp / f"{i - 1}")
            shapes.append(SimpleNamespace(n_out=kept.n_out, n_in=kept.n_in, kind=kept.kind, psi=kept.psi is not None,
                                          geometry=kept.geometry))
            step(f"remove constant directions, hidden space {i - 1}")
        pending = original
    _save_layer(pending, tmp / f"{src.n_layers - 1}")
    shapes.append(SimpleNamespace(n_out=pending.n_out, n_in=pending.n_in, kind=pending.kind, psi=pending.psi is not None,
                                  geometry=pending.geometry))
    return before, shapes, record


def final_specs(shapes: list[SimpleNamespace], chosen: set[int], dtype: torch.dtype):
    """(name, dtype, shape) of every output tensor and the output's ModelConfig, after diagonalising `chosen`."""
    specs, kinds = [], []
    for j, s in enumerate(shapes):
        kind = "diag" if j in chosen else ("dense" if {j - 1, j + 1} & chosen else s.kind)
        kinds.append(kind)
        specs.append((f"layers.{j}.weight", dtype, (s.n_out, s.n_in) if kind == "dense" else (min(s.n_out, s.n_in),)))
        specs.append((f"layers.{j}.bias", dtype, (s.n_out,)))
        if s.psi:
            specs.append((f"layers.{j}.psi", dtype, (s.n_out,)))
        if j < len(shapes) - 1:
            specs.append((f"layers.{j}.o", dtype, ()))
    config = ModelConfig(widths=(shapes[0].n_in,) + tuple(s.n_out for s in shapes), kinds=tuple(kinds),
                         has_psi=tuple(s.psi for s in shapes))
    return specs, config


def diagonalise_pass(shapes: list[SimpleNamespace], tmp: Path, emit: Callable[[int, Layer], None],
                     step: Callable[[str], None]) -> None:
    """alternate_diagonalise, reading tmp/j in order; every final layer goes to emit(j, layer) in order."""
    chosen = set(choose_alternating_layers(SimpleNamespace(layers=shapes)))
    pending, u_prev = None, None
    for j, s in enumerate(shapes):
        layer = _load_layer(tmp / f"{j}", s.n_in)
        if j - 1 in chosen:
            layer = _right_mul(layer, u_prev)
        if j in chosen:
            u, sv, vh = svd64(layer.dense_weight(), full=True)
            pending = _left_mul(vh, pending)
            layer = Layer(weight=sv, bias=u.T @ layer.bias, n_in=layer.n_in,
                          psi=None if layer.psi is None else u.T @ layer.psi, o=layer.o)
            u_prev = u
            step(f"diagonalise layer {j}")
        if pending is not None:
            emit(j - 1, pending)
        pending = layer
    emit(len(shapes) - 1, pending)


def shrink_exact_to_file(src: LayerSource, out_path: Path, dtype: torch.dtype, probes: torch.Tensor,
                         step: Callable[[str], None], rule_inputs: torch.Tensor | None = None,
                         check: Callable[[SimpleNamespace], None] | None = None, work_dir: Path | None = None) -> dict:
    """shrink_exact of src's model written to out_path (safetensors, `dtype`), one layer in memory at a time, with
    the constant-direction rule of layers.remove_constant_directions_accounted set on `rule_inputs` (default: the
    probes); out_path None: no file (the caller writes only ONNX); the temporaries go to `work_dir` (default: beside
    out_path). `check(rule)` runs after the rule's pass over the original (ranges' checks), before anything is
    written. Returns layer summaries before/after, the probe outputs of the original, the float64 result and the
    saved file, the rule's record (report.json's constant_directions) and the float64 result as a model."""
    return_freed_memory_to_the_system()
    work_dir = work_dir if work_dir is not None else out_path.parent
    rule = constant_rule(src, probes if rule_inputs is None else rule_inputs, probes)
    if check is not None:
        check(rule)
    fwd64, fwd_saved, after, kept = Forward(probes.to(F64)), Forward(probes.to(F64)), [], []
    with tempfile.TemporaryDirectory(prefix=".isocompress-stream-", dir=work_dir) as tmp_name:
        before, shapes, record = remove_constants_pass(src, Path(tmp_name), step, rule)
        chosen = set(choose_alternating_layers(SimpleNamespace(layers=shapes)))
        specs, config = final_specs(shapes, chosen, dtype)
        with io.atomic_path(out_path) if out_path is not None else nullcontext() as tmp_out:
            writer = NullWriter() if out_path is None else TensorWriter(tmp_out, specs, {io.CONFIG_KEY: config.to_json()})

            def emit(j: int, layer: Layer) -> None:
                after.append(summary(j, layer))
                kept.append(layer)
                fwd64.feed(layer)
                cast = {}
                for name, value in layer_tensors(j, layer):
                    cast[name.split(".")[-1]] = checked_cast(name, value, dtype, str(out_path or "model"))
                    writer.write(name, cast[name.split(".")[-1]])
                fwd_saved.feed(replace(layer, **cast))

            try:
                diagonalise_pass(shapes, Path(tmp_name), emit, step)
            except BaseException:
                writer.close(complete=False)
                raise
            writer.close()
    return {"layers_before": before, "layers": after, "widths_before": list(src.config.widths),
            "widths_after": list(config.widths), "y": rule.y_probes, "y_float64": fwd64.y, "y_saved": fwd_saved.y,
            "constant_directions": record, "model": IsoMLP(kept)}
