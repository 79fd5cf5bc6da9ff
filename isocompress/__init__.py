"""isocompress: exact and certified compression of isotropic neural networks."""

from isocompress.api import shrink_exact, shrink_file
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

__all__ = [
    "CheckFailed", "IsoMLP", "IsocompressError", "Layer", "ModelConfig", "alternate_diagonalise",
    "diagonalise_full", "diagonalise_left", "load", "random_model", "remove_all_constant_directions",
    "remove_constant_directions", "rotate_hidden", "save", "save_pt", "save_safetensors", "shrink_exact",
    "shrink_file",
]
