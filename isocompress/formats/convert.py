"""`isocompress convert`: a pickled checkpoint (a notebook cache such as `pickle.dump({'model': net}, f)`, or a
`torch.save(net)` of a whole module) → isocompress's safetensors format.

Unpickling runs code named by the file, so this happens only here, and only when the caller passes
`trust_pickle=True` (`--trust-pickle` on the command line). Everything else in isocompress reads tensors only.
The code the pickle names must be importable. A module is then *run*: `isocompress.formats.modules.from_module` reads
its layers and recognises its activations by their behaviour, so every intrinsic length o is measured, never read
from a flag (the reference activation keeps its flag as `positive`, and a module trained with
positive_intrinsic_length=False was once read as log o). A pickled dict of tensors is read as a state_dict.
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


def example_input(module: torch.nn.Module, input_shape: tuple[int, ...] | None, path: Path) -> torch.Tensor:
    """A batch of 2 random inputs for running the module: of `input_shape`, or of its first layer's width when that
    is a Linear (or the reference layout's first weight); a convolutional module needs its input shape given."""
    if input_shape is not None:
        return torch.randn(2, *input_shape, dtype=torch.float64)
    state = module.state_dict()
    if "weight_parameters.0" in state:
        return torch.randn(2, state["weight_parameters.0"].shape[1], dtype=torch.float64)
    first = next((m for m in module.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d))),
                 None)
    if isinstance(first, torch.nn.Linear):
        return torch.randn(2, first.in_features, dtype=torch.float64)
    raise IsocompressError(f"{path}: a convolutional module needs the shape of one input to run it: give"
                           " --input-shape C,L or C,H,W (e.g. --input-shape 1,8,8)")


def convert_file(path: str | os.PathLike, out: str | os.PathLike | None = None, *, trust_pickle: bool = False,
                 ref_intrinsic_length: str | None = None, dtype: torch.dtype | None = None,
                 input_shape: tuple[int, ...] | None = None) -> dict:
    """Unpickle `path` (only with trust_pickle=True): a module is run and read by `from_module` (`input_shape`: one
    input's shape, needed for a convolutional module); a dict of tensors is read as a state_dict
    (`ref_intrinsic_length` as for `load`). Saves isocompress's safetensors at `out` (default: <stem>.safetensors in
    the working directory). Returns a report dict."""
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
    found = find_module(unpickle(path), path)
    if isinstance(found, torch.nn.Module):
        report = _convert_module(found, path, out, input_shape, dtype)
        if ref_intrinsic_length is not None:
            report["notes"].append(f"{TRUST_FLAG}: --ref-intrinsic-length {ref_intrinsic_length} was not needed and not"
                                   " used: the module was run and its intrinsic lengths measured")
        return report
    tensors = {k: v.detach() for k, v in dict(found).items() if isinstance(v, torch.Tensor)}
    stored = next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32)
    model: IsoMLP = io.model_from_tensors(io.consume_as_float64(tensors), None, where=str(path),
                                          ref_intrinsic_length=ref_intrinsic_length)
    io.save(model, out, dtype=dtype or stored)
    return {"model": str(path), "file": str(out), "input_shape": list(model.input_shape), "widths": list(model.widths),
            "params": model.num_params(), "intrinsic_length": "read from a state_dict as "
            + (ref_intrinsic_length or "log o (the reference default)"), "notes": []}


def _convert_module(module: torch.nn.Module, path: Path, out: Path, input_shape, dtype) -> dict:
    """Run the module (from_module) and save what it computes."""
    from isocompress.formats.modules import from_module

    stored = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
    notes: list[str] = []
    model = from_module(module, example_input(module, input_shape, path), notify=notes.append)
    io.save(model, out, dtype=dtype or stored)
    return {"model": str(path), "file": str(out), "input_shape": list(model.input_shape), "widths": list(model.widths),
            "params": model.num_params(), "intrinsic_length": "measured by running the module's activations",
            "notes": notes}
