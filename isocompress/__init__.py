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
    "ShrinkOptions": "api.shrink", "shrink_exact": "exact.shrink", "shrink_file": "api.shrink",
    "run_checks": "check.run",
    "ModelConfig": "core.config",
    "CheckFailed": "core.errors", "IsocompressError": "core.errors",
    "load": "formats.io", "save": "formats.io", "save_pt": "formats.io", "save_safetensors": "formats.io",
    "alternate_diagonalise": "exact.shrink", "diagonalise_full": "core.layers", "diagonalise_left": "core.layers",
    "remove_all_constant_directions": "exact.constants", "remove_constant_directions": "core.layers",
    "rotate_hidden": "core.layers",
    "IsoMLP": "core.model", "IsoNet": "core.model", "Layer": "core.model", "random_model": "core.model",
    "random_cnn": "core.model", "Geometry": "core.geometry", "Pool": "core.geometry",
    "from_module": "formats.modules",
    "Recipe": "api.recipe", "sweep": "api.sweep", "SweepLimits": "api.sweep",
    "export_onnx": "export.onnx_export",
    "convert_file": "formats.convert",
    "grow": "train.grow", "neuroadapt": "train.grow",
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
