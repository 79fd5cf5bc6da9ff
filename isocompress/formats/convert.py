"""`isocompress convert`: a pickled checkpoint (a notebook cache such as `pickle.dump({'model': net}, f)`, or a
`torch.save(net)` of a whole module) → isocompress's safetensors format.

Unpickling runs code named by the file, so this happens only here, and only when the caller passes
`trust_pickle=True` (`--trust-pickle` on the command line). Everything else in isocompress reads tensors only.
The reference code must be importable (the pickle names its classes); the module's own
`positive_intrinsic_length` attribute, where it has one, decides how `intrinsic_length` is read.
"""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path
from typing import Mapping

import torch

from isocompress.core.errors import IsocompressError
from isocompress.core.model import IsoMLP
from isocompress.formats import io

TRUST_FLAG = "--trust-pickle"


def unpickle(path: Path):
    """The object in a pickle or torch.save file. Runs code from the file: call only when the user trusts it."""
    try:
        if path.suffix.lower() in io.PICKLE_SUFFIXES:
            with open(path, "rb") as handle:
                return pickle.load(handle)  # noqa: S301 (explicitly trusted by the caller)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(str(path), map_location="cpu", weights_only=False)
    except (ModuleNotFoundError, AttributeError) as exc:
        raise IsocompressError(
            f"{path}: the pickle refers to code that is not importable here ({io.first_line(exc)}); run convert"
            " where the reference code is importable (e.g. PYTHONPATH=path/to/Isotropic-Adaptive-MLPs)"
        ) from None
    except Exception as exc:  # UnpicklingError, EOFError, …: whatever a foreign or corrupted file raises
        raise IsocompressError(f"{path}: not a readable pickle ({io.first_line(exc)})") from None


def find_module(obj, path: Path):
    """The network inside: the object itself, or the value under 'model' (or the only module) of a dict."""
    if isinstance(obj, torch.nn.Module) or _is_tensor_dict(obj):
        return obj
    if isinstance(obj, Mapping):
        if "model" in obj and isinstance(obj["model"], torch.nn.Module):
            return obj["model"]
        modules = [v for v in obj.values() if isinstance(v, torch.nn.Module)]
        if len(modules) == 1:
            return modules[0]
        for nest in ("state_dict", "model_state_dict"):
            if _is_tensor_dict(obj.get(nest)):
                return obj[nest]
    raise IsocompressError(
        f"{path}: holds a {type(obj).__name__} with no network in it; expected an nn.Module, or a dict with the module"
        " under 'model'"
    )


def _is_tensor_dict(obj) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def module_ref_mode(module) -> str | None:
    """"log"/"raw" from the module's activations' `positive_intrinsic_length` attribute; None if it has none."""
    if not isinstance(module, torch.nn.Module):
        return None
    flags = {bool(m.positive_intrinsic_length) for m in module.modules()
             if isinstance(getattr(m, "positive_intrinsic_length", None), bool)}
    if len(flags) != 1:
        return None
    return "log" if flags.pop() else "raw"


def convert_file(path: str | os.PathLike, out: str | os.PathLike | None = None, *, trust_pickle: bool = False,
                 ref_intrinsic_length: str | None = None, dtype: torch.dtype | None = None) -> dict:
    """Unpickle `path` (only with trust_pickle=True), take its network's tensors and save them as isocompress's
    safetensors at `out` (default: <stem>.safetensors in the working directory). Returns a report dict."""
    path = Path(path)
    io.check_ref_mode(ref_intrinsic_length)
    if not trust_pickle:
        raise IsocompressError(
            f"{path}: convert unpickles the file, which runs code named in it; pass {TRUST_FLAG} (trust_pickle=True)"
            " only for a file you trust, e.g. one your own notebook wrote"
        )
    if not path.is_file():
        raise IsocompressError(f"{path}: no such file; check the path")
    out = Path(out) if out is not None else Path.cwd() / f"{path.stem}.safetensors"
    if out.suffix.lower() not in (".safetensors", ".pt", ".pth"):
        raise IsocompressError(f"{out}: use a .safetensors, .pt or .pth output file name")
    if out.exists() and out.resolve() == path.resolve():
        raise IsocompressError(f"{out} is the input file; choose another output (the input is never overwritten)")
    module = find_module(unpickle(path), path)
    found = module_ref_mode(module)
    if found is not None and ref_intrinsic_length is not None and found != ref_intrinsic_length:
        raise IsocompressError(
            f"{path}: the module says positive_intrinsic_length={found == 'log'} (intrinsic_length is {found}), but"
            f" {ref_intrinsic_length} was asked for; drop the option"
        )
    mode = ref_intrinsic_length or found
    tensors = module.state_dict() if isinstance(module, torch.nn.Module) else dict(module)
    tensors = {k: v.detach() for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    stored = next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32)
    model: IsoMLP = io.model_from_tensors(io.consume_as_float64(tensors), None, where=str(path),
                                          ref_intrinsic_length=mode)
    io.save(model, out, dtype=dtype or stored)
    return {"model": str(path), "file": str(out), "widths": list(model.widths), "params": model.num_params(),
            "ref_intrinsic_length": mode, "ref_intrinsic_length_source": "module" if found else
            ("option" if ref_intrinsic_length else "default")}
