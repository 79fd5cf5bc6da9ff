"""isocompress: exact and certified compression of isotropic neural networks.

The top-level names are loaded on first use (PEP 562), so that `import isocompress.cli` (and `isocompress --help`)
does not import torch; `isocompress.shrink_file`, `from isocompress import load`, … work as before.
"""

from __future__ import annotations

import importlib
import os as _os

# onnxruntime writes a device id and a telemetry database under ~/.cache/Microsoft/DeveloperTools when it is
# imported unless this is set (issue 13). setdefault: a user who wants telemetry can still set it to 0.
_os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

_WHERE = {
    "ShrinkOptions": "api", "shrink_exact": "api", "shrink_file": "api",
    "run_checks": "check",
    "ModelConfig": "config",
    "CheckFailed": "errors", "IsocompressError": "errors",
    "load": "io", "save": "io", "save_pt": "io", "save_safetensors": "io",
    "alternate_diagonalise": "layers", "diagonalise_full": "layers", "diagonalise_left": "layers",
    "remove_all_constant_directions": "layers", "remove_constant_directions": "layers", "rotate_hidden": "layers",
    "IsoMLP": "model", "Layer": "model", "random_model": "model",
    "Recipe": "recipe",
    "export_onnx": "onnx_export",
    "convert_file": "convert",
    "grow": "grow", "neuroadapt": "grow",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'isocompress' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"isocompress.{_WHERE[name]}"), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
