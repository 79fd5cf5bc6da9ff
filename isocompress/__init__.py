"""isocompress: exact and certified compression of isotropic neural networks."""

import os as _os

# onnxruntime writes a device id and a telemetry database under ~/.cache/Microsoft/DeveloperTools when it is
# imported unless this is set (issue 13). setdefault: a user who wants telemetry can still set it to 0.
_os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from isocompress.api import ShrinkOptions, shrink_exact, shrink_file
from isocompress.check import run_checks
from isocompress.config import ModelConfig
from isocompress.errors import CheckFailed, IsocompressError
from isocompress.io import load, save, save_pt, save_safetensors
from isocompress.layers import (
    alternate_diagonalise,
    diagonalise_full,
    diagonalise_left,
    remove_all_constant_directions,
    remove_constant_directions,
    rotate_hidden,
)
from isocompress.model import IsoMLP, Layer, random_model
from isocompress.onnx_export import export_onnx
from isocompress.convert import convert_file
from isocompress.grow import grow, neuroadapt
from isocompress.recipe import Recipe

__all__ = [
    "CheckFailed", "IsoMLP", "IsocompressError", "Layer", "ModelConfig", "Recipe", "ShrinkOptions", "alternate_diagonalise",
    "convert_file", "diagonalise_full", "diagonalise_left", "export_onnx", "grow", "load", "neuroadapt",
    "random_model", "remove_all_constant_directions", "remove_constant_directions", "rotate_hidden", "run_checks",
    "save", "save_pt", "save_safetensors", "shrink_exact", "shrink_file",
]
