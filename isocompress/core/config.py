"""`ModelConfig`: the shapes and layer kinds of an isotropic MLP; validates itself and round-trips through JSON.

It is stored beside the weights (safetensors metadata, or the `.pt` dict) so that a shrunk model reloads by its shapes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from isocompress.core.errors import IsocompressError

FORMAT_NAME = "isocompress"
FORMAT_VERSION = 1
LAYER_KINDS = ("dense", "diag")


@dataclass(frozen=True)
class ModelConfig:
    """widths = (n_0, …, n_L); kinds[i] is "dense" or "diag" for weight layer i; has_psi[i] for layer i (never 0)."""

    widths: tuple[int, ...]
    kinds: tuple[str, ...]
    has_psi: tuple[bool, ...]
    format: str = FORMAT_NAME
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(self.widths))
        object.__setattr__(self, "kinds", tuple(self.kinds))
        object.__setattr__(self, "has_psi", tuple(self.has_psi))
        self._validate()

    def _validate(self) -> None:
        if self.format != FORMAT_NAME:
            raise IsocompressError(f"config 'format' is {self.format!r}; expected {FORMAT_NAME!r}")
        if self.version != FORMAT_VERSION:
            raise IsocompressError(
                f"config 'version' is {self.version!r}; this isocompress reads version {FORMAT_VERSION}: upgrade isocompress"
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

    @property
    def n_layers(self) -> int:
        return len(self.widths) - 1

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

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
        unknown = sorted(set(data) - {"widths", "kinds", "has_psi", "format", "version"})
        if unknown:
            raise IsocompressError(f"config has unknown key {unknown[0]!r}; allowed: widths, kinds, has_psi, format, version")
        missing = [k for k in ("widths", "kinds", "has_psi") if k not in data]
        if missing:
            raise IsocompressError(f"config is missing key {missing[0]!r}")
        for key in ("widths", "kinds", "has_psi"):
            if not isinstance(data[key], list):
                raise IsocompressError(f"config key {key!r} must be a list")
        return cls(**data)
