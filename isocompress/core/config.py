"""`ModelConfig`: the shapes, layer kinds and geometry of an isotropic network; validates itself and round-trips through
JSON.

It is stored beside the weights (safetensors metadata, or the `.pt` dict) so that a shrunk model reloads by its shapes.
Version 1 (an MLP with tanh activations: widths, kinds, has_psi) is what isocompress writes for such a model, so
older readers keep reading it; version 2 adds each layer's geometry (how it reads its input map: positions, pooling,
kernel, stride, padding, dilation, flatten; `isocompress.core.geometry`) and each hidden layer's activation σ.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from isocompress.core.errors import IsocompressError

FORMAT_NAME = "isocompress"
FORMAT_VERSION = 2  # the newest version this isocompress reads (and writes where a model needs it)
VERSIONS = (1, 2)
LAYER_KINDS = ("dense", "diag")
ACTIVATIONS = ("tanh", "log1p")
KEYS = ("widths", "kinds", "has_psi", "format", "version", "geometry", "activations")


@dataclass(frozen=True)
class ModelConfig:
    """widths = (n_0, …, n_L); kinds[i] is "dense" or "diag" for weight layer i; has_psi[i] for layer i (never 0)."""

    widths: tuple[int, ...]
    kinds: tuple[str, ...]
    has_psi: tuple[bool, ...]
    format: str = FORMAT_NAME
    version: int = 1
    geometry: tuple[dict, ...] | None = None  # version 2: Geometry.to_dict() of every layer
    activations: tuple[str, ...] | None = None  # version 2: σ of every hidden layer

    def __post_init__(self) -> None:
        for name in ("widths", "kinds", "has_psi", "geometry", "activations"):
            if getattr(self, name) is not None and isinstance(getattr(self, name), (list, tuple)):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        self._validate()
        self._validate_v2()

    def _validate(self) -> None:
        if self.format != FORMAT_NAME:
            raise IsocompressError(f"config 'format' is {self.format!r}; expected {FORMAT_NAME!r}")
        if self.version not in VERSIONS or isinstance(self.version, bool):
            raise IsocompressError(
                f"config 'version' is {self.version!r}; this isocompress reads versions 1 and 2: upgrade isocompress"
            )
        if len(self.widths) < 2:
            raise IsocompressError(f"config 'widths' needs at least 2 entries (input and output), got {list(self.widths)}")
        if any(not isinstance(w, int) or isinstance(w, bool) or w < 1 for w in self.widths):
            raise IsocompressError(f"config 'widths' must be positive integers, got {list(self.widths)}")
        n_layers = len(self.widths) - 1
        if len(self.kinds) != n_layers:
            raise IsocompressError(f"config 'kinds' has {len(self.kinds)} entries; 'widths' implies {n_layers} layers")
        bad = [k for k in self.kinds if k not in LAYER_KINDS]
        if bad:
            raise IsocompressError(f"config 'kinds' has {bad[0]!r}; each kind must be one of {list(LAYER_KINDS)}")
        if len(self.has_psi) != n_layers:
            raise IsocompressError(f"config 'has_psi' has {len(self.has_psi)} entries; 'widths' implies {n_layers} layers")
        if any(not isinstance(p, bool) for p in self.has_psi):
            raise IsocompressError("config 'has_psi' must hold true/false values")
        if self.has_psi[0]:
            raise IsocompressError("config 'has_psi' is true for layer 0; the first layer has no previous activation")

    def _validate_v2(self) -> None:
        if self.version == 1:
            for key in ("geometry", "activations"):
                if getattr(self, key) is not None:
                    raise IsocompressError(f"config key {key!r} needs 'version': 2")
            return
        if self.geometry is None or len(self.geometry) != self.n_layers:
            raise IsocompressError(f"config 'geometry' must list one geometry per layer ({self.n_layers})")
        if self.activations is None or len(self.activations) != self.n_layers - 1:
            raise IsocompressError(f"config 'activations' must list one activation per hidden layer ({self.n_layers - 1})")
        bad = [a for a in self.activations if a not in ACTIVATIONS]
        if bad:
            raise IsocompressError(f"config 'activations' has {bad[0]!r}; each must be one of {list(ACTIVATIONS)}")
        if any(not isinstance(g, dict) for g in self.geometry):
            raise IsocompressError("config 'geometry' entries must be objects (kernel, stride, padding, …)")

    @property
    def n_layers(self) -> int:
        return len(self.widths) - 1

    def to_json(self) -> str:
        data = asdict(self)
        if self.version == 1:  # byte-for-byte what version-1 readers expect
            del data["geometry"], data["activations"]
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        from isocompress.core.limits import loads_json

        if not isinstance(text, str):
            raise IsocompressError("config must be a JSON string; re-save the model with isocompress")
        try:
            data = loads_json(text, "config", "model config")
        except (TypeError, ValueError) as exc:
            raise IsocompressError(f"config is not valid JSON ({exc}); re-save the model with isocompress") from None
        if not isinstance(data, dict):
            raise IsocompressError("config JSON must be an object with 'widths', 'kinds' and 'has_psi'")
        unknown = sorted(set(data) - set(KEYS))
        if unknown:
            raise IsocompressError(f"config has unknown key {unknown[0]!r}; allowed: {', '.join(KEYS)}")
        missing = [k for k in ("widths", "kinds", "has_psi") if k not in data]
        if missing:
            raise IsocompressError(f"config is missing key {missing[0]!r}")
        for key in ("widths", "kinds", "has_psi", "geometry", "activations"):
            if key in data and not isinstance(data[key], list):
                raise IsocompressError(f"config key {key!r} must be a list")
        return cls(**data)
