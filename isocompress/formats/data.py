"""Reading calibration inputs and labels safely: .npy, .npz, .safetensors or .pt (never unpickling code)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from isocompress.core.errors import IsocompressError
from isocompress.formats import io
from isocompress.formats.io import first_line

ARRAY_SUFFIXES = (".npy", ".npz", ".safetensors", ".pt", ".pth")


def load_array(path: str | Path, expect_columns: int | None = None, labels: bool = False,
               what: str = "calibration data") -> torch.Tensor:
    """One array from a file: inputs as float64 (n × expect_columns), or labels as int64 (n,). `what` names the data
    in messages ("calibration data", "certify data (--certify-data)", ...)."""
    path = Path(path)
    if not io.input_exists(path) or not path.is_file():
        raise IsocompressError(f"{path}: no such file; check the path")
    suffix = path.suffix.lower()
    if suffix not in ARRAY_SUFFIXES:
        raise IsocompressError(f"{path}: unsupported array file {suffix or '(none)'!r}; use .npy, .npz, .safetensors or .pt")
    array = _read(path, suffix, labels)
    return _as_labels(path, array) if labels else _as_inputs(path, array, expect_columns, what)


INPUT_NAMES = ("x", "X", "inputs", "data", "calibration")
LABEL_NAMES = ("y", "Y", "labels", "targets")


def has_labels(path: str | Path) -> bool:
    """Whether an input file also holds its labels: an .npz, .safetensors or .pt dict with both an inputs array
    (x, X, inputs, …) and a labels array (y, Y, labels, targets), as the shipped models/M.test.npz (x and y)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.is_file() or suffix not in (".npz", ".safetensors", ".pt", ".pth"):
        return False
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                names = set(archive.files)
        elif suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                names = set(f.keys())
        else:
            obj = io.safe_torch_load(path, "tensor file", "save the arrays with numpy.savez (.npz) or safetensors")
            names = set(obj) if isinstance(obj, dict) else set()
    except IsocompressError:
        raise
    except Exception:  # noqa: BLE001  (unreadable: the inputs' own loader names the problem)
        return False
    return bool(names & set(INPUT_NAMES)) and bool(names & set(LABEL_NAMES))


def _read(path: Path, suffix: str, labels: bool = False) -> torch.Tensor:
    try:
        if suffix == ".npy":
            return torch.from_numpy(np.load(path, allow_pickle=False))
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                return torch.from_numpy(_single(path, {k: archive[k] for k in archive.files}, labels))
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return _single(path, load_file(str(path)), labels)
    except IsocompressError:
        raise
    except Exception as exc:  # every reader's own failure becomes one clear line
        raise IsocompressError(f"{path}: cannot read an array ({first_line(exc)}); is it truncated?") from None
    obj = io.safe_torch_load(path, "tensor file", "save the array with numpy.save (.npy) or safetensors")
    if isinstance(obj, dict):
        obj = _single(path, {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, labels)
    if not isinstance(obj, torch.Tensor):
        raise IsocompressError(f"{path}: holds a {type(obj).__name__}; expected one tensor")
    return obj


def _single(path: Path, arrays: dict, labels: bool = False):
    """The one array in a container; with several, the one named x/X/inputs/data (or y/labels for labels)."""
    if len(arrays) == 1:
        return next(iter(arrays.values()))
    for name in LABEL_NAMES if labels else INPUT_NAMES:
        if name in arrays:
            return arrays[name]
    names = ", ".join(sorted(arrays)) or "none"
    what = "the labels 'y'" if labels else "the inputs 'x'"
    raise IsocompressError(f"{path}: holds several arrays ({names}); keep one, or name {what}")


def _as_inputs(path: Path, array: torch.Tensor, expect_columns: int | None, what: str) -> torch.Tensor:
    if array.dtype.is_complex or array.dtype == torch.bool:
        raise IsocompressError(f"{path}: has dtype {array.dtype}; expected real numbers")
    array = array.to(torch.float64)
    if array.dim() == 1:  # one point or n scalars? never guessed: every input file is samples × features
        raise IsocompressError(f"{path}: has shape {tuple(array.shape)}, a 1-D array; {what} must be 2-D (samples ×"
                               " features, or samples × the model's input shape); for one point save x[None, :]")
    if array.dim() > 2:
        array = array.reshape(array.shape[0], -1)
    if array.dim() != 2 or array.shape[0] == 0:
        raise IsocompressError(f"{path}: has shape {tuple(array.shape)}; expected a non-empty 2-D array (samples × features)")
    if expect_columns is not None and array.shape[1] != expect_columns:
        raise IsocompressError(f"{path}: has {array.shape[1]} features per sample; the model takes {expect_columns}")
    if not bool(torch.isfinite(array).all()):
        raise IsocompressError(f"{path}: contains NaN or Inf; clean the {what}")
    return array


def _as_labels(path: Path, array: torch.Tensor) -> torch.Tensor:
    if array.is_floating_point():
        if not bool(torch.isfinite(array).all()) or not bool((array == array.round()).all()):
            raise IsocompressError(f"{path}: labels must be whole numbers (class indices)")
    array = array.reshape(-1).to(torch.int64)
    if array.numel() == 0 or bool((array < 0).any()):
        raise IsocompressError(f"{path}: labels must be a non-empty vector of class indices ≥ 0")
    return array


def check_label_count(labels: torch.Tensor, inputs: torch.Tensor, labels_path, inputs_path) -> None:
    """Labels must match their inputs one to one (issue 10: a mismatch was silently ignored)."""
    if len(labels) != len(inputs):
        raise IsocompressError(f"{labels_path}: has {len(labels)} labels but {inputs_path} has {len(inputs)} inputs;"
                               " give one label per input row")
