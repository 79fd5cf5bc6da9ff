"""Loading and saving isotropic MLP checkpoints.

Layouts read (from `.pt`/`.pth` via `torch.load(weights_only=True)`, or `.safetensors`):
  * isocompress's own: tensors `layers.{i}.weight` (n_out×n_in, or its diagonal), `layers.{i}.bias`,
    `layers.{i}.psi` (optional, i ≥ 1), `layers.{i}.o` (hidden layers), plus the `ModelConfig` as JSON under the key
    `isocompress_config` (a `.pt` holds {"isocompress_config": str, "state_dict": {...}}; a safetensors file keeps
    it in its metadata). A bare state_dict of `layers.*` tensors also loads (the config is inferred from shapes).
  * the reference code's `IsotropicTanhMLP` state_dict: `weight_parameters.N`, `bias_parameters.N`, optional
    `psi_parameters.N` (psi of weight layer N+1), `activation.N.intrinsic_length` (log o when the reference was
    built with positive_intrinsic_length=True, its default; o itself, possibly negative, when False: choose with
    `ref_intrinsic_length="log"|"raw"`) or `activation.N.o_const` (o). A `.pt` whose dict nests the state_dict under
    "state_dict" or "model_state_dict" also loads.
Pickled modules (a notebook's `pickle.dump({'model': net}, f)`) are never unpickled here; `isocompress convert FILE
--trust-pickle` (isocompress.formats.convert) is the explicit way out.
Everything is validated before a model is returned; every problem is an `IsocompressError` naming the file.
"""

from __future__ import annotations

import os
import pickle
import re
import sys
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch

from isocompress.core.config import ModelConfig
from isocompress.core.errors import IsocompressError
from isocompress.core.geometry import Geometry
from isocompress.core.model import DENSE, IsoMLP, Layer, validate_layers

CONFIG_KEY = "isocompress_config"
SUFFIXES = (".pt", ".pth", ".safetensors")
LAYOUT_HELP = (
    "expected isocompress keys (layers.N.weight, layers.N.bias, layers.N.o, …) or the reference IsotropicTanhMLP "
    "keys (weight_parameters.N, bias_parameters.N, psi_parameters.N, activation.N.intrinsic_length|o_const)"
)
OWN_KEY = re.compile(r"^layers\.(\d+)\.(weight|bias|psi|o)$")
REF_WEIGHT_KEY = re.compile(r"^weight_parameters\.(\d+)$")
REF_MODES = ("log", "raw")
REF_FLAG = "--ref-intrinsic-length"
PICKLE_SUFFIXES = (".pkl", ".pickle", ".p")
PICKLE_HELP = (
    "convert it in an environment where the reference code is importable with 'isocompress convert FILE"
    " --trust-pickle' (unpickling runs code from the file: only for files you trust), or with the script in the"
    " README, 'Notebook caches'"
)
PLAIN_KEY = re.compile(r"^(?:[A-Za-z_]\w*\.)*\d+\.(weight|bias)$")
NOT_ISOTROPIC = (
    "isocompress handles isotropic networks only (IsotropicTanh activations with an intrinsic length o, as in"
    " IsotropicTanhMLP or isocompress.train.nn.IsotropicMLP)"
)
REF_KEY = re.compile(r"^(weight_parameters|bias_parameters|psi_parameters)\.(\d+)$|^activation\.(\d+)\.(intrinsic_length|o_const)$")


# --- reading files ---------------------------------------------------------------------------------------------
def read_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str | None]:
    """The flat tensor dict of a checkpoint and its stored config JSON (or None). Raises IsocompressError."""
    path = Path(path)
    if not input_exists(path):
        raise IsocompressError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise IsocompressError(f"{path}: is a directory; pass a model file (.pt, .pth or .safetensors)")
    if not path.is_file():  # a FIFO, a socket, a device: reading could block forever
        raise IsocompressError(f"{path}: is not a regular file (a pipe or device?); pass a model file")
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise IsocompressError(
            f"{path}: a pickle file (a notebook cache of a whole module?) is never unpickled by default, since that"
            f" could run code; {PICKLE_HELP}"
        )
    if suffix not in SUFFIXES:
        raise IsocompressError(f"{path}: unsupported file type {suffix or '(none)'!r}; use .pt, .pth or .safetensors")
    from isocompress.core.limits import check_memory

    # the float64 copy alone is at least twice a float32 file: refuse early rather than fail in an allocation
    check_memory(2 * path.stat().st_size, f"{path}: loading this model", "free memory or raise the limit")
    tensors, config = _read_safetensors(path) if suffix == ".safetensors" else _read_torch(path)
    check_tensor_kinds(tensors, path)
    return tensors, config


def input_exists(path: Path) -> bool:
    """Whether an input path exists; an OS error other than "missing" (a name too long, no permission) is one
    IsocompressError naming the path (issue 13)."""
    import errno as _errno

    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as exc:
        if exc.errno == _errno.ELOOP:
            raise IsocompressError(f"{path}: too many levels of symbolic links; check the path") from None
        raise IsocompressError(f"{path}: cannot be read ({exc.strerror}); check the path and its permissions") from None
    except ValueError:  # an embedded NUL byte
        raise IsocompressError(f"{path}: is not a valid path (it contains a NUL byte)") from None
    return True


READABLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.int16, torch.int32,
                   torch.int64, torch.uint8)
INDEX_KEY = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def check_tensor_kinds(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """Dense tensors of ordinary dtypes, no zero-size dimension, no two keys naming one index (layers.0/layers.00)."""
    for key, t in tensors.items():
        shown = key if key.isprintable() else repr(key)
        if t.layout != torch.strided:
            raise IsocompressError(f"{path}: tensor {shown[:80]!r} is {str(t.layout).replace('torch.', '')}; store it"
                                   " dense (tensor.to_dense())")
        if t.dtype not in READABLE_DTYPES:
            raise IsocompressError(f"{path}: tensor {shown[:80]!r} has dtype {str(t.dtype).replace('torch.', '')};"
                                   " convert the model to float32, float64, float16 or bfloat16")
        if t.numel() == 0:
            raise IsocompressError(f"{path}: tensor {shown[:80]!r} has shape {tuple(t.shape)}: a zero-size layer;"
                                   " every layer needs at least one neuron")
        for digits in INDEX_KEY.findall(key):
            if len(digits) > 1 and digits.startswith("0") or len(digits) > 9:
                raise IsocompressError(f"{path}: key {shown[:80]!r} writes an index as {digits[:12]!r}; write it"
                                       " without leading zeros (layers.0, not layers.00)")


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    from safetensors.torch import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except MemoryError:
        raise
    except Exception as exc:  # SafetensorError, OSError, ValueError, …: whatever a corrupted file makes it raise
        raise IsocompressError(
            f"{path}: not a readable safetensors file ({first_line(exc)}); is it truncated or corrupted?"
        ) from None
    return dequantize_int8(tensors, path), metadata.get(CONFIG_KEY)


def dequantize_int8(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """An int8-weights file (`--precision int8-weights`): each int8 `layers.N.weight` with its float32
    `layers.N.weight_scale` (one per output channel) becomes the float32 weight fl32(q·s) that onnxruntime's
    DequantizeLinear computes too (core.precision.dequantize_rows): the deployed network's weights, exactly."""
    from isocompress.core.precision import dequantize_rows

    for key in [k for k in tensors if k.endswith(".weight_scale")]:
        weight_key = key.removesuffix("_scale")
        q, scale = tensors.get(weight_key), tensors.pop(key)
        if q is None or q.dtype != torch.int8 or scale.dim() != 1 or scale.shape[0] != q.shape[0]:
            raise IsocompressError(f"{path}: {key!r} needs an int8 {weight_key!r} with one scale per output channel;"
                                   " re-export the model with isocompress shrink/export --precision int8-weights")
        tensors[weight_key] = dequantize_rows(q, scale).to(torch.float32)
    stray = [k for k, t in tensors.items() if t.dtype == torch.int8]
    if stray:
        raise IsocompressError(f"{path}: int8 tensor {stray[0]!r} has no {stray[0]}_scale; re-export it with"
                               " --precision int8-weights")
    return tensors


def safe_torch_load(path: Path, what: str, resave: str):
    """torch.load(weights_only=True): tensors and containers only, never code. Every failure is one line naming the
    file: `what` is the kind of file expected ("checkpoint"), `resave` says how to write it without Python objects."""
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on stderr; our one line says enough
            warnings.simplefilter("ignore")
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except pickle.UnpicklingError as exc:
        kind = pickle_kind(path) if "GLOBAL" not in str(exc) else "code"
        if kind == "not-pickle":
            raise IsocompressError(
                f"{path}: not a PyTorch {what} (neither a torch.save zip archive nor a pickle stream); is it the"
                " right file?") from None
        if kind == "corrupt":
            raise IsocompressError(f"{path}: not a readable PyTorch {what} (a malformed pickle stream); is it truncated"
                                   " or corrupted?") from None
        if kind == "code" and ("weights only" in str(exc).lower() or "weights_only" in str(exc)):
            raise IsocompressError(
                f"{path}: refused: the {what} holds Python objects, not just tensors, and unpickling it could run"
                f" code; {resave}, or {PICKLE_HELP}"
            ) from None
        if "invalid load key" in str(exc).lower():  # a plain pickle (pickle.dump), not a torch.save zip file
            raise IsocompressError(
                f"{path}: a plain pickle, not a torch.save file; it is never unpickled by default, since that could"
                f" run code; {PICKLE_HELP}"
            ) from None
        raise IsocompressError(f"{path}: not a readable PyTorch {what} ({first_line(exc)})") from None
    except Exception as exc:  # RuntimeError, EOFError, BadZipFile, struct.error, …: a corrupted file raises anything
        raise IsocompressError(
            f"{path}: not a readable PyTorch {what} ({first_line(exc)}); is it truncated or corrupted?"
        ) from None


CODE_OPCODES = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX", "BUILD"}


def pickle_kind(path: Path) -> str:
    """'code' (the pickle stream calls or builds objects), 'data' (plain containers), 'corrupt' or 'not-pickle',
    from a static scan of the opcodes (pickletools; nothing is executed). A zip archive's data.pkl is scanned."""
    import pickletools
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                names = [n for n in archive.namelist() if n.endswith("data.pkl")]
                if not names:
                    return "corrupt"
                stream = archive.read(names[0])
        else:
            with open(path, "rb") as handle:
                stream = handle.read(64 << 20)
            if not stream.startswith(b"\x80"):
                return "not-pickle"
        ops = {op.name for op, _, _ in pickletools.genops(stream)}
    except Exception:  # noqa: BLE001 - a malformed stream: whatever the scanner raises
        return "corrupt"
    return "code" if ops & CODE_OPCODES else "data"


def _read_torch(path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    obj = safe_torch_load(path, "checkpoint",
                          "re-save it as a plain state_dict (torch.save(model.state_dict(), ...))")
    return _flatten_torch_object(path, obj)


def _flatten_torch_object(path: Path, obj) -> tuple[dict[str, torch.Tensor], str | None]:
    if not isinstance(obj, Mapping):
        raise IsocompressError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors; {LAYOUT_HELP}")
    config = obj.get(CONFIG_KEY)
    if config is not None and not isinstance(config, str):
        raise IsocompressError(f"{path}: key {CONFIG_KEY!r} must be a JSON string")
    for nest in ("state_dict", "model_state_dict"):
        if isinstance(obj.get(nest), Mapping):
            obj = obj[nest]
            break
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    return tensors, config


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


# --- interpreting tensors --------------------------------------------------------------------------------------
def load(path: str | os.PathLike, ref_intrinsic_length: str | None = None,
         notify: Callable[[str], None] | None = None) -> IsoMLP:
    """Load any supported checkpoint as a float64 `IsoMLP`. Raises IsocompressError naming the file.

    ref_intrinsic_length: how a reference checkpoint's `activation.N.intrinsic_length` is read: "log" (log o, the
    reference default positive_intrinsic_length=True) or "raw" (o itself, positive_intrinsic_length=False). None:
    "log", and `notify` (default: one line on stderr) is told that this was assumed."""
    tensors, config_json = read_tensors(path)
    return model_from_tensors(consume_as_float64(tensors), config_json, where=str(path),
                              ref_intrinsic_length=ref_intrinsic_length, notify=notify)


def check_ref_mode(mode: str | None, what: str = "ref_intrinsic_length") -> str | None:
    if mode is not None and mode not in REF_MODES:
        raise IsocompressError(f"{what} {mode!r}: choose log (stored log o) or raw (stored o itself)")
    return mode


def assumed_log_note(where: str) -> str:
    """The one line said when a reference checkpoint's intrinsic_length is read as log o without being told."""
    return (
        f"isocompress: note: {where}: read activation.N.intrinsic_length as log o (the reference default,"
        f" positive_intrinsic_length=True); if it was trained with positive_intrinsic_length=False, pass"
        f" {REF_FLAG} raw (ref_intrinsic_length='raw' in Python, ref-intrinsic-length in a recipe or check)"
    )


def print_note(text: str) -> None:
    print(text, file=sys.stderr)


def consume_as_float64(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same tensors in float64, emptying `tensors` one entry at a time so that the stored copy and the float64
    copy of the whole model never coexist (peak memory ≈ the float64 model, not float32 + float64)."""
    converted = {}
    for key in list(tensors):
        value = tensors.pop(key)
        converted[key] = value.to(torch.float64) if value.is_floating_point() else value
        del value
    return converted


def stored_dtype(path: str | os.PathLike) -> torch.dtype:
    """The floating dtype a checkpoint's weights are stored in (what a saved output keeps by default)."""
    tensors, _ = read_tensors(path)
    for t in tensors.values():
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def model_from_tensors(tensors: Mapping[str, torch.Tensor], config_json: str | None, where: str,
                       ref_intrinsic_length: str | None = None,
                       notify: Callable[[str], None] | None = None) -> IsoMLP:
    """The model the tensors describe (layouts: module docstring). `ref_intrinsic_length`, `notify`: as `load`."""
    check_ref_mode(ref_intrinsic_length)
    keys = set(tensors)
    if keys and all(OWN_KEY.match(k) for k in keys):
        return _own_layout(tensors, config_json, where)
    if keys and any(REF_KEY.match(k) for k in keys):
        mode = ref_intrinsic_length
        if mode is None and any(k.endswith(".intrinsic_length") for k in keys):
            (notify or print_note)(assumed_log_note(where))
        return _reference_layout(tensors, where, mode or "log")
    shown = ", ".join(k if k.isprintable() else repr(k) for k in sorted(keys)[:5]) or "none"  # one line, always
    if keys and all(PLAIN_KEY.match(k) for k in keys):
        raise IsocompressError(
            f"{where}: a plain (non-isotropic) network's weights, e.g. an nn.Sequential of nn.Linear (found keys:"
            f" {shown}); {NOT_ISOTROPIC}"
        )
    raise IsocompressError(f"{where}: unrecognised layout (found keys: {shown}); {LAYOUT_HELP}")


def needs_ref_mode(tensors: Mapping[str, torch.Tensor]) -> bool:
    """Whether these tensors are a reference checkpoint whose intrinsic_length could be read two ways."""
    keys = set(tensors)
    return not all(OWN_KEY.match(k) for k in keys) and any(k.endswith(".intrinsic_length") and REF_KEY.match(k)
                                                           for k in keys)


def _float64(tensors: Mapping[str, torch.Tensor], key: str, where: str) -> torch.Tensor:
    t = tensors[key]
    if not (t.is_floating_point() or t.dtype in (torch.int64, torch.int32)):
        raise IsocompressError(f"{where}: tensor {key!r} has dtype {t.dtype}; expected a floating-point tensor")
    t = t.detach().to(torch.float64)
    if t.device.type != "meta" and not all_finite(t):  # meta: a streamed shrink's skeleton (exact.stream)
        raise IsocompressError(f"{where}: tensor {key!r} contains NaN or Inf; fix or retrain the model")
    if t.device.type != "meta" and t.data_ptr() % 64:
        # a tensor inside a file's buffer (safetensors): BLAS rounds differently by alignment; an aligned copy makes
        # the streamed and in-memory shrinks compute bit for bit the same
        t = t.clone()
    return t


def all_finite(t: torch.Tensor) -> bool:
    """torch.isfinite(t).all() without its temporaries: min and max propagate NaN and are ±inf where any value is,
    so both are finite exactly when every value is (one pass, nothing of t's size allocated: the peak of reading a
    wide layer, which a streamed shrink reads one at a time, stays the layer)."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t.reshape(-1))
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def _indices(keys: set[str], pattern: re.Pattern, group: int) -> list[int]:
    return sorted({int(m.group(group)) for k in keys if (m := pattern.match(k)) and m.group(group) is not None})


def _require_contiguous(found: list[int], what: str, where: str) -> int:
    if not found or found != list(range(len(found))):
        raise IsocompressError(f"{where}: {what} indices are {found or 'missing'}; expected 0..N-1 with none missing")
    return len(found)


def _own_layout(tensors, config_json, where) -> IsoMLP:
    keys = set(tensors)
    n = _require_contiguous(_indices(keys, OWN_KEY, 1), "layers.N", where)
    config = None
    if config_json is not None:
        try:
            config = ModelConfig.from_json(config_json)
        except IsocompressError as exc:
            raise IsocompressError(f"{where}: {exc}") from None
        if config.n_layers != n:
            raise IsocompressError(f"{where}: config says {config.n_layers} layers but the file has {n}")
    layers, n_in = [], None
    for i in range(n):
        get = lambda name: _float64(tensors, f"layers.{i}.{name}", where) if f"layers.{i}.{name}" in keys else None
        weight, bias, psi, o = get("weight"), get("bias"), get("psi"), get("o")
        if weight is None or bias is None:
            missing = "weight" if weight is None else "bias"
            raise IsocompressError(f"{where}: missing tensor 'layers.{i}.{missing}'")
        if i == 0 or config is not None:
            n_in = config.widths[i] if config is not None else _infer_n_in(weight, where, i)
        if weight.dim() >= 2 and weight.shape[1] != n_in:
            raise IsocompressError(
                f"{where}: 'layers.{i}.weight' has {weight.shape[1]} columns; the previous layer gives {n_in}"
            )
        o = o.reshape(()) if o is not None and o.numel() == 1 else o
        geometry, sigma = _config_geometry(config, i, where)
        layers.append(Layer(weight=weight, bias=bias, n_in=int(n_in), psi=psi, o=o, geometry=geometry, sigma=sigma))
        n_in = bias.shape[0] if bias.dim() == 1 else n_in
    if config is not None:
        _check_against_config(layers, config, where)
    if len(layers) > 1 and all(layer.o is None for layer in layers):
        raise IsocompressError(
            f"{where}: no hidden layer has an intrinsic length (no layers.N.o): not an isotropic network;"
            f" {NOT_ISOTROPIC}. If it is one with o = 0, add a scalar layers.N.o = 0 for each hidden layer"
        )
    validate_layers(layers, where)
    return IsoMLP(layers)


def _config_geometry(config: ModelConfig | None, i: int, where: str) -> tuple[Geometry, str]:
    """Layer i's geometry and activation from a version-2 config (a dense tanh layer otherwise)."""
    if config is None or config.version == 1:
        return DENSE, "tanh"
    geometry = Geometry.from_dict(config.geometry[i], f"{where}: config layer {i}")
    sigma = config.activations[i] if i < config.n_layers - 1 else "tanh"
    return geometry, sigma


def _infer_n_in(weight: torch.Tensor, where: str, i: int) -> int:
    if weight.dim() > 2:
        raise IsocompressError(
            f"{where}: 'layers.{i}.weight' is a convolution kernel but the file has no {CONFIG_KEY!r} to give its"
            " geometry; save it with isocompress (isocompress.save, or isocompress.from_module for a live module)"
        )
    if weight.dim() != 2:
        raise IsocompressError(
            f"{where}: 'layers.{i}.weight' is a diagonal but the file has no {CONFIG_KEY!r} to give the input width;"
            " save it with isocompress"
        )
    return int(weight.shape[1])


def _check_against_config(layers: list[Layer], config: ModelConfig, where: str) -> None:
    for i, layer in enumerate(layers):
        if layer.kind != config.kinds[i]:
            raise IsocompressError(f"{where}: 'layers.{i}.weight' is {layer.kind} but the config says {config.kinds[i]}")
        if (layer.psi is not None) != config.has_psi[i]:
            raise IsocompressError(f"{where}: 'layers.{i}.psi' presence disagrees with the config's has_psi")
        if layer.bias.dim() == 1 and layer.n_out != config.widths[i + 1]:
            raise IsocompressError(
                f"{where}: 'layers.{i}.bias' has {layer.n_out} entries; the config says {config.widths[i + 1]}"
            )


def _reference_layout(tensors, where, mode: str) -> IsoMLP:
    keys = set(tensors)
    unknown = sorted(k for k in keys if not REF_KEY.match(k))
    if unknown:
        raise IsocompressError(f"{where}: unexpected key {unknown[0]!r} in a reference-layout checkpoint; {LAYOUT_HELP}")
    n = _require_contiguous(_indices(keys, REF_WEIGHT_KEY, 1), "weight_parameters.N", where)
    layers = []
    for i in range(n):
        weight = _float64(tensors, f"weight_parameters.{i}", where)
        if f"bias_parameters.{i}" not in keys:
            raise IsocompressError(f"{where}: missing tensor 'bias_parameters.{i}'")
        bias = _float64(tensors, f"bias_parameters.{i}", where)
        if weight.dim() != 2 or bias.dim() != 1 or weight.shape[0] != bias.shape[0]:
            raise IsocompressError(
                f"{where}: 'weight_parameters.{i}' {tuple(weight.shape)} and 'bias_parameters.{i}' {tuple(bias.shape)}"
                " do not fit (expected out×in and out)"
            )
        psi_key = f"psi_parameters.{i - 1}"
        psi = _float64(tensors, psi_key, where) if i > 0 and psi_key in keys else None
        o = _reference_o(tensors, keys, i, where, mode) if i < n - 1 else None
        layers.append(Layer(weight=weight, bias=bias, n_in=int(weight.shape[1]), psi=psi, o=o))
    extra_psi = [k for k in keys if k.startswith("psi_parameters.") and int(k.split(".")[1]) >= n - 1]
    if extra_psi:
        raise IsocompressError(f"{where}: {sorted(extra_psi)[0]!r} has no weight layer to belong to")
    extra_act = [k for k in keys if k.startswith("activation.") and int(k.split(".")[1]) >= n - 1]
    if extra_act:
        raise IsocompressError(f"{where}: {sorted(extra_act)[0]!r} has no hidden layer to belong to")
    validate_layers(layers, where)
    return IsoMLP(layers)


def _scalar(tensors, key: str, where: str) -> torch.Tensor:
    value = _float64(tensors, key, where)
    if value.numel() != 1:
        raise IsocompressError(f"{where}: {key!r} has shape {tuple(value.shape)}; expected a single number")
    return value.reshape(())


def _reference_o(tensors, keys, i, where, mode: str) -> torch.Tensor:
    """o of hidden layer i: intrinsic_length is log o (mode "log") or o itself (mode "raw", any sign: the
    reference computes m = sqrt(|o + |z|²|)); o_const is o; absent is 0."""
    log_key, const_key = f"activation.{i}.intrinsic_length", f"activation.{i}.o_const"
    if log_key in keys:
        value = _scalar(tensors, log_key, where)
        return torch.exp(value) if mode == "log" else value
    if const_key in keys:
        return _scalar(tensors, const_key, where)
    return torch.zeros((), dtype=torch.float64)


# --- writing ---------------------------------------------------------------------------------------------------
@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside `target`; on success renames it onto `target`, on failure removes it. Where a file
    in use cannot be replaced (Windows), the rename is retried for a few seconds (formats/publish.py, "Platforms")
    and then fails naming `target`, which is left as it was."""
    from isocompress.formats import publish

    target = Path(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates the file as 0600; give the output the permissions a plain open() would (0666 & ~umask).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        publish.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            publish.discard(tmp_path)


def model_tensors(model: IsoMLP, dtype: torch.dtype | None = None, where: str = "model") -> dict[str, torch.Tensor]:
    out = {}
    for key, value in model.state_dict().items():
        value = value.detach()
        if dtype is not None:
            cast = value.to(dtype)
            if not bool(torch.isfinite(cast).all()) and bool(torch.isfinite(value).all()):
                raise IsocompressError(
                    f"{where}: {key} has values beyond the {str(dtype).replace('torch.', '')} range; save in float64"
                    " (--dtype float64) or rescale the model"
                )
            value = cast
        out[key] = value.contiguous().clone()
    return out


def reference_state_dict(model: IsoMLP, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The model in the reference code's IsotropicTanhMLP state_dict layout (dense weights; o stored as
    activation.N.o_const, which every reading mode takes as o itself) — what `load` reads back unchanged. MLPs with
    tanh activations only: the reference layout has no convolutions."""
    if not model.is_mlp or any(layer.sigma != "tanh" for layer in model.layers):
        raise IsocompressError("the reference IsotropicTanhMLP layout holds tanh MLPs only; save this model with"
                               " isocompress.save (its own format)")
    tensors = {}
    for i, layer in enumerate(model.layers):
        tensors[f"weight_parameters.{i}"] = layer.dense_weight().to(dtype)
        tensors[f"bias_parameters.{i}"] = layer.bias.to(dtype)
        if layer.psi is not None:
            tensors[f"psi_parameters.{i - 1}"] = layer.psi.to(dtype)
        if layer.o is not None:
            tensors[f"activation.{i}.o_const"] = layer.o.reshape(1).to(dtype)
    return tensors


def save_safetensors(model: IsoMLP, path: str | os.PathLike, dtype: torch.dtype | None = None, plan=None) -> Path:
    """Tensors + the config JSON in the metadata; diagonal layers stored as vectors. Atomic. `plan`
    (core.precision.Plan): dense weights in float16, or int8 + float32 scales (`layers.N.weight_scale`), the rest
    in float32 (what bounds.deployed certifies)."""
    from safetensors.torch import save_file

    metadata = {CONFIG_KEY: model.config.to_json()}
    if plan is not None and plan.weights in ("float16", "int8"):
        tensors = model_tensors(model, torch.float32, where=str(path))
        for i, layer in enumerate(model.layers):
            if layer.kind == "dense":
                tensors.update(stored_weight(layer.weight, f"layers.{i}.weight", plan.weights, str(path)))
        metadata[PRECISION_KEY] = plan.precision
    else:
        tensors = model_tensors(model, dtype, where=str(path))
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


PRECISION_KEY = "isocompress_precision"


def stored_weight(weight: torch.Tensor, key: str, storage: str, where: str) -> dict[str, torch.Tensor]:
    from isocompress.core.precision import quantize_rows

    if storage == "int8":
        q, scale = quantize_rows(weight)
        return {key: q.contiguous(), f"{key}_scale": scale.contiguous()}
    cast = weight.to(torch.float16)
    if not bool(torch.isfinite(cast).all()):
        raise IsocompressError(f"{where}: {key} has values beyond the float16 range (±65504); use --precision"
                               " int8-weights or float32")
    return {key: cast.contiguous()}


def save_pt(model: IsoMLP, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """isocompress's `.pt` format: a plain dict {"isocompress_config": json, "state_dict": tensors}. Atomic."""
    tensors = model_tensors(model, dtype, where=str(path))
    with atomic_path(path) as tmp:
        torch.save({CONFIG_KEY: model.config.to_json(), "state_dict": tensors}, str(tmp))
    return Path(path)


def save(model: IsoMLP, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    suffix = Path(path).suffix.lower()
    if suffix == ".safetensors":
        return save_safetensors(model, path, dtype)
    if suffix in (".pt", ".pth"):
        return save_pt(model, path, dtype)
    raise IsocompressError(f"{path}: cannot save as {suffix or '(none)'!r}; use .safetensors or .pt")
